/*
 * blk_ring.c -- the virtio-blk backend on the shared io_uring engine (csrc/uring/ring.c).
 *
 * Mapping: a READ/WRITE of k host iovecs becomes k ring requests (the ring's allow-list has
 * READ/WRITE, not READV/WRITEV), each at most 1 GiB (the ring's per-request limit), all
 * carrying the dvs_blk_io pointer as user_data; the operation completes when the last piece
 * does, with the byte total -- or the first error, or -EIO if a read came up short (the ring
 * only ends a read short at end of file). FLUSH is one FDATASYNC. DISCARD/WRITE_ZEROES run
 * synchronously with fallocate, as in the file backend: fallocate is not on the allow-list.
 *
 * Capacity: the ring accepts at most max_in_flight requests. An operation is taken only if
 * all its pieces fit next to what is in flight or queued here; otherwise submit() hands it
 * back with -EAGAIN (the device retries after a completion). Pieces the ring does not take
 * at once wait in a local FIFO and go in from the next submit() or poll(). An operation too
 * big for the ring even when it is empty is done synchronously.
 *
 * Buffered writes: on a file opened without O_DIRECT, a WRITE is done inline with pwritev
 * (DVS_BLK_RING_WRITES_INLINE, the default). io_uring can only start a buffered write
 * without blocking where the filesystem supports it (FMODE_BUF_WASYNC; ext4 on 6.18 does
 * not), so the ring punts every such write to an io-wq worker: the same page-cache copy,
 * plus a thread hop per request. On a loaded 2-vCPU host running a TCG guest that hop cost
 * 30-50 % of sequential write throughput (benchmarks/RESULTS.md); reads (served inline from
 * the page cache) and flushes (which block for real) stay on the ring.
 *
 * Threads: the ring is single-issuer; it is enabled lazily by the first thread that submits
 * or polls (the vhost-user serving thread), and only that thread may use it afterwards.
 * Completions are noticed through the ring fd, which polls readable when CQEs are waiting.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uring/uring.h"
#include "virtio/blk_backend.h"

#define PIECE_MAX (1u << 30)

struct ring_backend {
	struct dvs_blk_backend base;
	struct dvs_ring *ring;
	int fd;
	int enabled;
	int writes_inline;
	uint32_t max_in_flight;
	uint32_t in_flight;      /* pieces the ring has accepted */
	struct dvs_io *queued;   /* pieces waiting for the ring, FIFO */
	uint32_t q_head, q_count, q_cap;
	struct dvs_io_done *done;
	struct dvs_io scratch[64];
};

static int ensure_enabled(struct ring_backend *rb)
{
	if (rb->enabled)
		return 0;
	int err = dvs_ring_enable(rb->ring);
	if (err)
		return err;
	rb->enabled = 1;
	return 0;
}

/* Hand queued pieces to the ring while it takes them. */
static int flush_queued(struct ring_backend *rb)
{
	while (rb->q_count) {
		uint32_t n = 0;
		while (n < rb->q_count && n < 64) {
			rb->scratch[n] = rb->queued[(rb->q_head + n) % rb->q_cap];
			n++;
		}
		int took = dvs_ring_submit(rb->ring, rb->scratch, n);
		if (took < 0)
			return took;
		rb->q_head = (rb->q_head + (uint32_t)took) % rb->q_cap;
		rb->q_count -= (uint32_t)took;
		rb->in_flight += (uint32_t)took;
		if ((uint32_t)took < n)
			break; /* ring full: the rest waits for completions */
	}
	return 0;
}

static void enqueue(struct ring_backend *rb, const struct dvs_io *io)
{
	rb->queued[(rb->q_head + rb->q_count) % rb->q_cap] = *io;
	rb->q_count++;
}

static uint32_t pieces_of(const struct dvs_blk_io *io)
{
	if (io->op == DVS_BLK_IO_FLUSH)
		return 1;
	uint32_t n = 0;
	for (uint32_t i = 0; i < io->iovcnt; i++)
		n += (uint32_t)((io->iov[i].iov_len + PIECE_MAX - 1) / PIECE_MAX);
	return n;
}

static int ring_submit(struct dvs_blk_backend *be, struct dvs_blk_io *io)
{
	struct ring_backend *rb = (struct ring_backend *)be;
	int err = ensure_enabled(rb);
	if (err)
		return err;
	if (io->op == DVS_BLK_IO_DISCARD || io->op == DVS_BLK_IO_WRITE_ZEROES) {
		io->done(io, dvs_blk_file_dealloc(rb->fd, io));
		return 0;
	}
	if (io->op != DVS_BLK_IO_READ && io->op != DVS_BLK_IO_WRITE && io->op != DVS_BLK_IO_FLUSH)
		return -EOPNOTSUPP;
	if (io->op == DVS_BLK_IO_WRITE && rb->writes_inline) {
		io->done(io, dvs_blk_file_rw(rb->fd, 1, io->iov, io->iovcnt, io->offset, io->len));
		return 0;
	}
	uint32_t k = pieces_of(io);
	if (k == 0) { /* an empty transfer */
		io->done(io, 0);
		return 0;
	}
	if (k > rb->max_in_flight) { /* never fits: do it the synchronous way */
		io->done(io, dvs_blk_file_rw(rb->fd, io->op == DVS_BLK_IO_WRITE, io->iov, io->iovcnt,
					     io->offset, io->len));
		return 0;
	}
	if (rb->in_flight + rb->q_count + k > rb->max_in_flight)
		return -EAGAIN; /* full: the device keeps the request and retries */
	io->pieces = k;
	io->progress = 0;
	struct dvs_io piece = { .user_data = (uintptr_t)io, .buf = DVS_IO_NO_BUF, .file = 0 };
	if (io->op == DVS_BLK_IO_FLUSH) {
		piece.opcode = DVS_OP_FDATASYNC;
		enqueue(rb, &piece);
	} else {
		piece.opcode = io->op == DVS_BLK_IO_READ ? DVS_OP_READ : DVS_OP_WRITE;
		uint64_t offset = io->offset;
		for (uint32_t i = 0; i < io->iovcnt; i++) {
			uint64_t addr = (uintptr_t)io->iov[i].iov_base, left = io->iov[i].iov_len;
			while (left) {
				uint32_t len = left < PIECE_MAX ? (uint32_t)left : PIECE_MAX;
				piece.addr = addr;
				piece.offset = offset;
				piece.len = len;
				enqueue(rb, &piece);
				addr += len;
				offset += len;
				left -= len;
			}
		}
	}
	return flush_queued(rb);
}

static int ring_poll(struct dvs_blk_backend *be, int wait)
{
	struct ring_backend *rb = (struct ring_backend *)be;
	int err = ensure_enabled(rb);
	if (err)
		return err;
	err = flush_queued(rb);
	if (err)
		return err;
	if (rb->in_flight == 0)
		return 0;
	int n = dvs_ring_reap(rb->ring, rb->done, rb->max_in_flight, wait ? 1 : 0);
	if (n < 0)
		return n;
	int completed = 0;
	for (int i = 0; i < n; i++) {
		struct dvs_blk_io *io = (struct dvs_blk_io *)(uintptr_t)rb->done[i].user_data;
		int32_t res = rb->done[i].res;
		rb->in_flight--;
		if (res < 0) {
			if (io->progress >= 0)
				io->progress = res; /* the first error is the operation's */
		} else if (io->progress >= 0) {
			io->progress += res;
		}
		if (--io->pieces == 0) {
			int64_t result = io->progress;
			if (result >= 0 && io->op != DVS_BLK_IO_FLUSH && (uint64_t)result != io->len)
				result = -EIO; /* a read that met end of file inside the request */
			io->done(io, result);
			completed++;
		}
	}
	err = flush_queued(rb);
	return err ? err : completed;
}

static int ring_event_fd(struct dvs_blk_backend *be)
{
	return dvs_ring_fd(((struct ring_backend *)be)->ring);
}

static int64_t ring_size(struct dvs_blk_backend *be)
{
	return dvs_blk_file_size(((struct ring_backend *)be)->fd);
}

static void ring_destroy(struct dvs_blk_backend *be)
{
	struct ring_backend *rb = (struct ring_backend *)be;
	if (rb->ring)
		dvs_ring_destroy(rb->ring); /* waits for what is in flight */
	free(rb->queued);
	free(rb->done);
	free(rb);
}

static const struct dvs_blk_backend_ops ring_ops = {
	.name = "io_uring",
	.submit = ring_submit,
	.poll = ring_poll,
	.event_fd = ring_event_fd,
	.size = ring_size,
	.destroy = ring_destroy,
};

int dvs_blk_backend_ring(int fd, uint32_t entries, uint32_t options,
			 struct dvs_blk_backend **out)
{
	if (fd < 0)
		return -EBADF;
	int64_t size = dvs_blk_file_size(fd);
	if (size < 0)
		return (int)size;
	struct ring_backend *rb = calloc(1, sizeof(*rb));
	if (!rb)
		return -ENOMEM;
	rb->base.ops = &ring_ops;
	rb->fd = fd;
	int fl = fcntl(fd, F_GETFL);
	rb->writes_inline = !(options & DVS_BLK_RING_WRITES_ON_RING) && fl >= 0 && !(fl & O_DIRECT);
	struct dvs_ring_params params = {
		.entries = entries ? entries : 256,
		.flags = DVS_RING_SINGLE_ISSUER,
		.sq_cpu = -1,
	};
	int err = dvs_ring_create(&params, &rb->ring);
	if (!err)
		err = dvs_ring_register_files(rb->ring, &rb->fd, 1);
	struct dvs_ring_info info;
	if (!err)
		err = dvs_ring_info(rb->ring, &info);
	if (!err) {
		rb->max_in_flight = info.max_in_flight;
		rb->q_cap = info.max_in_flight;
		rb->queued = calloc(rb->q_cap, sizeof(*rb->queued));
		rb->done = calloc(rb->max_in_flight, sizeof(*rb->done));
		if (!rb->queued || !rb->done)
			err = -ENOMEM;
	}
	if (err) {
		ring_destroy(&rb->base);
		return err;
	}
	*out = &rb->base;
	return 0;
}
