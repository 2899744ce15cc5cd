/*
 * blk_backend.h -- the seam between the virtio-blk device model and the storage behind it.
 *
 * The device parses and validates a guest request, then hands the backend one `dvs_blk_io`:
 * an operation on byte offsets of the backing store with host iovecs (pointing straight into
 * guest RAM for the local guest-memory backend, or into a bounce buffer otherwise). The
 * backend either accepts it -- and calls io->done(io, result) exactly once, possibly before
 * submit() returns (synchronous backends) or later from poll() (io_uring) -- or hands it
 * back with -EAGAIN when it is full, which is not a failure: the device retries after the
 * next completion. Any other negative return means the operation failed and done() will
 * not be called. `result` is the byte count (reads/writes) or 0, or -errno.
 *
 * Backends: a plain file or block device with synchronous preadv/pwritev (blk_file.c); the
 * same file through the shared io_uring engine of csrc/uring (blk_ring.c); a sealed
 * (shielded) volume of csrc/shield (blk_shield.c).
 */
#ifndef DVS_BLK_BACKEND_H
#define DVS_BLK_BACKEND_H

#include <stdint.h>
#include <sys/uio.h>

/* cffi:begin */
#define DVS_BLK_IO_READ 0
#define DVS_BLK_IO_WRITE 1
#define DVS_BLK_IO_FLUSH 2
#define DVS_BLK_IO_DISCARD 3
#define DVS_BLK_IO_WRITE_ZEROES 4
#define DVS_BLK_IO_F_UNMAP 1 /* write-zeroes may deallocate */

#define DVS_BLK_FILE_DIRECT 1 /* the fd was opened with O_DIRECT (alignment is the caller's) */

struct dvs_blk_backend;

/* A backend over an open file or block device; the fd stays the caller's. */
int dvs_blk_backend_file(int fd, uint32_t flags, struct dvs_blk_backend **out);
/* The same file I/O with the completion model of an asynchronous engine: submit() queues
 * (at most `depth` operations, then -EAGAIN), an eventfd fires, poll() performs the queued
 * operations and completes them. Exercises the device's asynchronous paths (deferral,
 * completion from poll, draining) until the shared io_uring engine plugs in. */
int dvs_blk_backend_file_deferred(int fd, uint32_t depth, struct dvs_blk_backend **out);
/* The file through the shared io_uring ring (csrc/uring): reads and flushes (and writes to
 * an O_DIRECT fd, or with DVS_BLK_RING_WRITES_ON_RING) are ring requests (one per iovec,
 * fixed file, opcode allow-list), completed from poll() when the ring fd turns readable;
 * buffered writes and discard/write-zeroes run inline (see blk_ring.c for why). The ring
 * is single-issuer: the first thread that submits becomes its issuer. */
#define DVS_BLK_RING_WRITES_ON_RING 1
int dvs_blk_backend_ring(int fd, uint32_t entries, uint32_t options,
			 struct dvs_blk_backend **out);
/* A sealed volume of csrc/shield (which stays the caller's and must outlive the backend;
 * serve the device from the thread that opened the volume). See blk_shield.c. */
struct dvs_shield_volume;
int dvs_blk_backend_shield(struct dvs_shield_volume *vol, struct dvs_blk_backend **out);
/* Size of the backing store in bytes. */
int64_t dvs_blk_backend_size(struct dvs_blk_backend *be);
const char *dvs_blk_backend_name(const struct dvs_blk_backend *be);
void dvs_blk_backend_destroy(struct dvs_blk_backend *be);
/* cffi:end */

struct dvs_blk_io;
typedef void (*dvs_blk_io_done_fn)(struct dvs_blk_io *io, int64_t result);

struct dvs_blk_io {
	uint32_t op;
	uint32_t flags;
	uint64_t offset;
	uint64_t len;
	struct iovec *iov; /* READ/WRITE: covers exactly len bytes */
	uint32_t iovcnt;
	dvs_blk_io_done_fn done;
	/* backend scratch, the backend's while the operation is in flight */
	uint32_t pieces;
	int64_t progress;
};

struct dvs_blk_backend_ops {
	const char *name;
	int (*submit)(struct dvs_blk_backend *be, struct dvs_blk_io *io);
	/* Reap finished operations (calling their done()); wait for at least one if `wait`.
	 * Returns how many completed. NULL for backends that complete inside submit(). */
	int (*poll)(struct dvs_blk_backend *be, int wait);
	/* An fd that becomes readable when poll() has work, or -1. */
	int (*event_fd)(struct dvs_blk_backend *be);
	int64_t (*size)(struct dvs_blk_backend *be);
	void (*destroy)(struct dvs_blk_backend *be);
};

struct dvs_blk_backend {
	const struct dvs_blk_backend_ops *ops;
};

/* Shared by the file-based backends (blk_file.c). */
int64_t dvs_blk_file_size(int fd);
/* All of iov at offset, looping over short transfers: bytes moved or -errno. */
int64_t dvs_blk_file_rw(int fd, int write, const struct iovec *iov, uint32_t cnt,
			uint64_t offset, uint64_t total);
/* DISCARD / WRITE_ZEROES with fallocate (and fallbacks): 0 or -errno. */
int dvs_blk_file_dealloc(int fd, const struct dvs_blk_io *io);

#endif
