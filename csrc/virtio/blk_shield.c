/*
 * blk_shield.c -- a sealed (shielded) volume as the storage behind virtio-blk.
 *
 * The volume (csrc/shield/volume.c) stores authenticated-encrypted 4 KiB blocks and offers
 * byte-granular pread/pwrite over them, flush as an atomic durable commit, and
 * authentication failures as -EBADMSG (the destination wiped, nothing unauthenticated
 * returned). Mapping: the disk's capacity is the volume's capacity; a READ beyond the
 * volume's logical size (never written) reads zeroes; FLUSH commits (the guest's FLUSH is
 * exactly the durability point the volume offers); DISCARD is a no-op (a hint the volume
 * cannot use: sealed blocks are not deallocated); WRITE_ZEROES writes sealed zero blocks.
 * Every operation completes inside submit(): the volume drives its own I/O engine, which
 * belongs to the thread that opened the volume -- the device must be served from it.
 * A failed authentication reaches the guest as VIRTIO_BLK_S_IOERR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "shield/shield.h"
#include "virtio/blk_backend.h"

struct shield_backend {
	struct dvs_blk_backend base;
	struct dvs_shield_volume *vol;
	uint64_t capacity;
};

static int64_t shield_read(struct shield_backend *sb, struct dvs_blk_io *io)
{
	uint64_t off = io->offset;
	for (uint32_t i = 0; i < io->iovcnt; i++) {
		uint8_t *p = io->iov[i].iov_base;
		uint64_t len = io->iov[i].iov_len;
		int64_t got = dvs_shield_pread(sb->vol, p, len, off);
		if (got < 0)
			return got;
		if ((uint64_t)got < len)
			memset(p + got, 0, len - (uint64_t)got); /* beyond the written data */
		off += len;
	}
	return (int64_t)io->len;
}

static int64_t shield_write(struct shield_backend *sb, struct dvs_blk_io *io)
{
	uint64_t off = io->offset;
	for (uint32_t i = 0; i < io->iovcnt; i++) {
		int64_t put = dvs_shield_pwrite(sb->vol, io->iov[i].iov_base, io->iov[i].iov_len, off);
		if (put < 0)
			return put;
		if ((uint64_t)put != io->iov[i].iov_len)
			return -EIO;
		off += io->iov[i].iov_len;
	}
	return (int64_t)io->len;
}

static int64_t shield_zeroes(struct shield_backend *sb, uint64_t off, uint64_t len)
{
	static const uint8_t zeros[65536];
	while (len) {
		uint64_t step = len < sizeof(zeros) ? len : sizeof(zeros);
		int64_t put = dvs_shield_pwrite(sb->vol, zeros, step, off);
		if (put < 0)
			return put;
		if ((uint64_t)put != step)
			return -EIO;
		off += step;
		len -= step;
	}
	return 0;
}

static int shield_submit(struct dvs_blk_backend *be, struct dvs_blk_io *io)
{
	struct shield_backend *sb = (struct shield_backend *)be;
	int64_t result;
	switch (io->op) {
	case DVS_BLK_IO_READ:
		result = shield_read(sb, io);
		break;
	case DVS_BLK_IO_WRITE:
		result = shield_write(sb, io);
		break;
	case DVS_BLK_IO_FLUSH:
		result = dvs_shield_flush(sb->vol);
		break;
	case DVS_BLK_IO_DISCARD:
		result = 0;
		break;
	case DVS_BLK_IO_WRITE_ZEROES:
		result = shield_zeroes(sb, io->offset, io->len);
		break;
	default:
		return -EOPNOTSUPP;
	}
	io->done(io, result);
	return 0;
}

static int shield_event_fd(struct dvs_blk_backend *be)
{
	return -1;
}

static int64_t shield_size(struct dvs_blk_backend *be)
{
	return (int64_t)((struct shield_backend *)be)->capacity;
}

static void shield_destroy(struct dvs_blk_backend *be)
{
	free(be); /* the volume is the caller's */
}

static const struct dvs_blk_backend_ops shield_ops = {
	.name = "sealed-volume",
	.submit = shield_submit,
	.poll = NULL,
	.event_fd = shield_event_fd,
	.size = shield_size,
	.destroy = shield_destroy,
};

int dvs_blk_backend_shield(struct dvs_shield_volume *vol, struct dvs_blk_backend **out)
{
	if (!vol)
		return -EINVAL;
	struct dvs_shield_status status;
	int err = dvs_shield_status(vol, &status);
	if (err)
		return err;
	struct shield_backend *sb = calloc(1, sizeof(*sb));
	if (!sb)
		return -ENOMEM;
	sb->base.ops = &shield_ops;
	sb->vol = vol;
	sb->capacity = status.capacity_blocks * DVS_SHIELD_BLOCK;
	*out = &sb->base;
	return 0;
}
