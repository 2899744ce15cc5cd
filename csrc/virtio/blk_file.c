/*
 * blk_file.c -- the synchronous block backend: preadv/pwritev/fdatasync/fallocate on a file
 * or block device, completing every operation inside submit().
 *
 * Kernel semantics relied on: preadv/pwritev may transfer less than asked (signals, or a
 * file shortened under us), so both loop until done; a read that hits end-of-file before the
 * end of the request fails with -EIO rather than handing the guest stale buffer contents.
 * fdatasync makes completed writes stable (virtio-blk FLUSH). FALLOC_FL_PUNCH_HOLE |
 * FALLOC_FL_KEEP_SIZE deallocates and reads back zeroes (files on ext4/xfs/tmpfs, and block
 * devices since 4.9); FALLOC_FL_ZERO_RANGE zeroes without necessarily deallocating. Where the
 * filesystem lacks them (-EOPNOTSUPP) discard is a hint and succeeds, and write-zeroes falls
 * back to writing zero pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "virtio/blk_backend.h"

#define DEFERRED_MAX 256

struct file_backend {
	struct dvs_blk_backend base;
	int fd;
	uint32_t flags;
	/* deferred mode: a FIFO of accepted, not yet performed operations */
	int efd;
	uint32_t depth;
	uint32_t head, count;
	struct dvs_blk_io *pending[DEFERRED_MAX];
};

/* Transfer all of iov[0..cnt) at offset; advances a private copy of the iovecs on short
 * transfers. Returns bytes moved (== total) or -errno. */
int64_t dvs_blk_file_rw(int fd, int write, const struct iovec *iov, uint32_t cnt, uint64_t offset,
			uint64_t total)
{
	struct iovec local[64];
	uint64_t done = 0;
	uint32_t i = 0;
	size_t skip = 0; /* bytes of iov[i] already moved */
	while (done < total) {
		uint32_t n = 0;
		for (uint32_t j = i; j < cnt && n < 64 && n < IOV_MAX; j++, n++) {
			local[n] = iov[j];
			if (j == i) {
				local[n].iov_base = (char *)local[n].iov_base + skip;
				local[n].iov_len -= skip;
			}
		}
		ssize_t r = write ? pwritev(fd, local, (int)n, (off_t)(offset + done))
				  : preadv(fd, local, (int)n, (off_t)(offset + done));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EIO; /* end of file (or no space) inside the request */
		done += (uint64_t)r;
		size_t left = (size_t)r;
		while (left && i < cnt) {
			size_t rest = iov[i].iov_len - skip;
			if (left < rest) {
				skip += left;
				left = 0;
			} else {
				left -= rest;
				skip = 0;
				i++;
			}
		}
	}
	return (int64_t)done;
}

static int write_zero_pages(int fd, uint64_t offset, uint64_t len)
{
	static const char zeros[65536];
	while (len) {
		size_t step = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
		ssize_t r = pwrite(fd, zeros, step, (off_t)offset);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EIO;
		offset += (uint64_t)r;
		len -= (uint64_t)r;
	}
	return 0;
}

static int try_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
{
	if (fallocate(fd, mode, (off_t)offset, (off_t)len) == 0)
		return 0;
	return -errno;
}

int dvs_blk_file_dealloc(int fd, const struct dvs_blk_io *io)
{
	int err;
	if (io->op == DVS_BLK_IO_DISCARD) {
		err = try_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, io->offset,
				    io->len);
		return err == -EOPNOTSUPP ? 0 : err; /* discard is only a hint */
	}
	if (io->op != DVS_BLK_IO_WRITE_ZEROES)
		return -EINVAL;
	if (io->flags & DVS_BLK_IO_F_UNMAP) {
		err = try_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, io->offset,
				    io->len);
		if (err != -EOPNOTSUPP)
			return err;
	}
	err = try_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, io->offset, io->len);
	if (err != -EOPNOTSUPP)
		return err;
	return write_zero_pages(fd, io->offset, io->len);
}

static int64_t file_do(struct file_backend *fb, struct dvs_blk_io *io)
{
	switch (io->op) {
	case DVS_BLK_IO_READ:
		return dvs_blk_file_rw(fb->fd, 0, io->iov, io->iovcnt, io->offset, io->len);
	case DVS_BLK_IO_WRITE:
		return dvs_blk_file_rw(fb->fd, 1, io->iov, io->iovcnt, io->offset, io->len);
	case DVS_BLK_IO_FLUSH:
		return fdatasync(fb->fd) ? -errno : 0;
	case DVS_BLK_IO_DISCARD:
	case DVS_BLK_IO_WRITE_ZEROES:
		return dvs_blk_file_dealloc(fb->fd, io);
	default:
		return -EOPNOTSUPP;
	}
}

static int file_submit(struct dvs_blk_backend *be, struct dvs_blk_io *io)
{
	struct file_backend *fb = (struct file_backend *)be;
	io->done(io, file_do(fb, io));
	return 0;
}

int64_t dvs_blk_file_size(int fd)
{
	struct stat st;
	if (fstat(fd, &st))
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		uint64_t bytes;
		if (ioctl(fd, BLKGETSIZE64, &bytes))
			return -errno;
		return (int64_t)bytes;
	}
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	return st.st_size;
}

static int64_t file_size(struct dvs_blk_backend *be)
{
	return dvs_blk_file_size(((struct file_backend *)be)->fd);
}

static int file_event_fd(struct dvs_blk_backend *be)
{
	return -1;
}

static void file_destroy(struct dvs_blk_backend *be)
{
	struct file_backend *fb = (struct file_backend *)be;
	if (fb->efd >= 0)
		close(fb->efd);
	free(be);
}

static int deferred_submit(struct dvs_blk_backend *be, struct dvs_blk_io *io)
{
	struct file_backend *fb = (struct file_backend *)be;
	if (fb->count == fb->depth)
		return -EAGAIN; /* full: the device keeps the request and retries */
	fb->pending[(fb->head + fb->count) % DEFERRED_MAX] = io;
	fb->count++;
	uint64_t one = 1;
	if (write(fb->efd, &one, sizeof(one)) < 0)
		return -errno;
	return 0;
}

static int deferred_poll(struct dvs_blk_backend *be, int wait)
{
	struct file_backend *fb = (struct file_backend *)be;
	uint64_t ignored;
	(void)!read(fb->efd, &ignored, sizeof(ignored)); /* non-blocking: clears the signal */
	/* Only what was queued on entry: done() may submit follow-up operations. */
	uint32_t n = fb->count;
	for (uint32_t i = 0; i < n; i++) {
		struct dvs_blk_io *io = fb->pending[fb->head];
		fb->head = (fb->head + 1) % DEFERRED_MAX;
		fb->count--;
		io->done(io, file_do(fb, io));
	}
	return (int)n;
}

static int deferred_event_fd(struct dvs_blk_backend *be)
{
	return ((struct file_backend *)be)->efd;
}

static const struct dvs_blk_backend_ops file_ops = {
	.name = "file-sync",
	.submit = file_submit,
	.poll = NULL,
	.event_fd = file_event_fd,
	.size = file_size,
	.destroy = file_destroy,
};

static const struct dvs_blk_backend_ops deferred_ops = {
	.name = "file-deferred",
	.submit = deferred_submit,
	.poll = deferred_poll,
	.event_fd = deferred_event_fd,
	.size = file_size,
	.destroy = file_destroy,
};

int dvs_blk_backend_file(int fd, uint32_t flags, struct dvs_blk_backend **out)
{
	if (fd < 0)
		return -EBADF;
	struct file_backend *fb = calloc(1, sizeof(*fb));
	if (!fb)
		return -ENOMEM;
	fb->base.ops = &file_ops;
	fb->fd = fd;
	fb->flags = flags;
	fb->efd = -1;
	int64_t size = file_size(&fb->base);
	if (size < 0) {
		free(fb);
		return (int)size;
	}
	*out = &fb->base;
	return 0;
}

int dvs_blk_backend_file_deferred(int fd, uint32_t depth, struct dvs_blk_backend **out)
{
	if (depth == 0 || depth > DEFERRED_MAX)
		return -EINVAL;
	int err = dvs_blk_backend_file(fd, 0, out);
	if (err)
		return err;
	struct file_backend *fb = (struct file_backend *)*out;
	fb->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (fb->efd < 0) {
		err = -errno;
		free(fb);
		return err;
	}
	fb->base.ops = &deferred_ops;
	fb->depth = depth;
	return 0;
}

int64_t dvs_blk_backend_size(struct dvs_blk_backend *be)
{
	return be->ops->size(be);
}

const char *dvs_blk_backend_name(const struct dvs_blk_backend *be)
{
	return be->ops->name;
}

void dvs_blk_backend_destroy(struct dvs_blk_backend *be)
{
	if (be)
		be->ops->destroy(be);
}
