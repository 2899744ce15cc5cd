/*
 * uring.h -- the dvs I/O engines: an io_uring ring over liburing 2.3, a thread-pool
 * fallback with pread/pwrite, and a fault-injecting in-memory disk, behind one request
 * format. Include this header from any C code of the core (the virtio-blk device uses the
 * ring as its backing-file engine; the sealed volume uses the engine facade).
 *
 * Kernel semantics relied on:
 * - io_uring_setup(IORING_SETUP_R_DISABLED) creates a ring that accepts no SQEs until
 *   IORING_REGISTER_ENABLE_RINGS; before that, IORING_REGISTER_RESTRICTIONS may limit it
 *   to an allow-list of opcodes and SQE flags (5.10). dvs allows NOP, READ(_FIXED),
 *   WRITE(_FIXED) and FSYNC, allows IOSQE_IO_LINK/IO_DRAIN/ASYNC and *requires*
 *   IOSQE_FIXED_FILE, so an enabled ring can only touch the files registered before.
 * - SINGLE_ISSUER (6.0): only the task (thread) that enabled the ring may submit; another
 *   thread gets -EEXIST. COOP_TASKRUN + TASKRUN_FLAG (5.19): completions that need task
 *   work do not interrupt the submitter; the kernel raises IORING_SQ_TASKRUN in the SQ
 *   flags and the next io_uring_enter(GETEVENTS) runs them. SQPOLL: a kernel thread
 *   consumes the SQ; the submitter enters only to wake it (IORING_SQ_NEED_WAKEUP) or to
 *   sleep on completions. COOP_TASKRUN is invalid together with SQPOLL.
 * - IORING_FEAT_NODROP: with at most cq_entries requests in flight the CQ never
 *   overflows; the ring never accepts more (the rest is handed back as "queue full").
 * - The CQE res of a buffered READ may be short (signal, page-cache races, EOF); the ring
 *   resubmits the remainder and completes the request once, with the total.
 *
 * Conventions: every function returns >= 0 or -errno. A request is 40 bytes, a completion
 * 16, so callers (and numpy) fill and read whole arrays; submit and reap take arrays and
 * cross the cffi boundary once per batch. An engine belongs to one caller thread.
 * The hot path (SQ tail, CQ head, io_uring_enter) is driven here, not through liburing's
 * submit/peek helpers, so every io_uring_enter the engine makes is counted exactly.
 */
#ifndef DVS_URING_H
#define DVS_URING_H

#include <stdint.h>

/* cffi:begin */
/* request opcodes (struct dvs_io.opcode) */
#define DVS_OP_NOP 0
#define DVS_OP_READ 1
#define DVS_OP_WRITE 2
#define DVS_OP_FSYNC 3
#define DVS_OP_FDATASYNC 4

/* request flags (struct dvs_io.flags) */
#define DVS_IO_LINK 1  /* the next request starts after this one succeeded (else -ECANCELED) */
#define DVS_IO_DRAIN 2 /* starts after every earlier request completed; later ones wait */
#define DVS_IO_ASYNC 4 /* hand it to a kernel worker at once (IOSQE_ASYNC): lets a page-cache
			* copy run on another CPU while the submitter works */

#define DVS_IO_NO_BUF 0xffff /* buf: the address is plain memory, not a registered buffer */

struct dvs_io {
	uint64_t user_data; /* returned untouched in the completion */
	uint64_t addr;      /* buffer address (inside registered buffer `buf` unless NO_BUF) */
	uint64_t offset;    /* file offset in bytes */
	uint32_t len;       /* bytes */
	int32_t file;       /* index into the registered files */
	uint16_t buf;       /* registered buffer index or DVS_IO_NO_BUF */
	uint8_t opcode;     /* DVS_OP_* */
	uint8_t flags;      /* DVS_IO_* */
	uint32_t reserved;  /* must be 0 */
};

struct dvs_io_done {
	uint64_t user_data;
	int32_t res;   /* bytes transferred (reads: short only at end of file) or -errno */
	uint32_t flags;
};

/* Counters. "syscalls" counts every syscall the engine's I/O threads make on the data
 * path (io_uring_enter for the ring; pread/pwrite/fsync and futex waits/wakes for the
 * thread pool, split into worker and submitter); setup and teardown are not included. */
struct dvs_io_stats {
	uint64_t submitted;      /* requests accepted */
	uint64_t completed;      /* completions handed to the caller */
	uint64_t queue_full;     /* times submit handed requests back because the queue was full */
	uint64_t requeued;       /* short transfers resubmitted for the remainder */
	uint64_t syscalls;       /* all data-path syscalls of the engine's I/O threads */
	uint64_t enters;         /* io_uring_enter calls (ring only) */
	uint64_t wakeups;        /* SQPOLL wake-ups (ring) or futex wakes (threads) */
	uint64_t waits;          /* times the caller slept for completions */
	uint64_t worker_syscalls;    /* thread pool: made by worker threads */
	uint64_t submitter_syscalls; /* made by the caller's thread */
	uint64_t bogus_completions;  /* CQEs naming no request in flight (ignored) */
	uint64_t bytes_read;
	uint64_t bytes_written;
	uint64_t in_flight;      /* requests accepted and not yet completed (gauge) */
};

/* ---- the io_uring ring: the shared piece ---- */
#define DVS_RING_SQPOLL 1           /* kernel SQ polling thread (off by default: see note) */
#define DVS_RING_SINGLE_ISSUER 2    /* IORING_SETUP_SINGLE_ISSUER */
#define DVS_RING_COOP_TASKRUN 4     /* IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG */
#define DVS_RING_NO_RESTRICTIONS 8  /* skip IORING_REGISTER_RESTRICTIONS (for comparisons) */
#define DVS_RING_ALLOW_FILE_UPDATE 16 /* allow dvs_ring_update_files after enabling */
#define DVS_RING_DEFAULT_FLAGS 6    /* SINGLE_ISSUER | COOP_TASKRUN */

struct dvs_ring_params {
	uint32_t entries;     /* SQ entries (rounded up to a power of two; CQ gets twice) */
	uint32_t flags;       /* DVS_RING_* */
	uint32_t sq_idle_ms;  /* SQPOLL: idle time before the kernel thread sleeps */
	int32_t sq_cpu;       /* SQPOLL: pin the kernel thread to this CPU; -1: no pinning */
};

struct dvs_ring_info {
	uint32_t sq_entries;
	uint32_t cq_entries;
	uint32_t max_in_flight; /* requests accepted at once before "queue full" */
	uint32_t features;      /* io_uring_params.features */
	uint32_t setup_flags;   /* IORING_SETUP_* actually used */
	uint32_t restricted;    /* 1 when the opcode allow-list is active */
	uint32_t n_files;
	uint32_t n_bufs;
};

struct dvs_ring;
struct dvs_buf {
	uint64_t addr;
	uint64_t len;
};

/* Create a disabled ring. Register files and buffers, then dvs_ring_enable. */
int dvs_ring_create(const struct dvs_ring_params *params, struct dvs_ring **out);
int dvs_ring_register_files(struct dvs_ring *ring, const int32_t *fds, uint32_t n);
int dvs_ring_register_buffers(struct dvs_ring *ring, const struct dvs_buf *bufs, uint32_t n);
/* Apply the opcode restrictions and enable; the calling thread becomes the issuer. */
int dvs_ring_enable(struct dvs_ring *ring);
/* Replace registered files [first, first+n) (fd -1 clears a slot); needs ALLOW_FILE_UPDATE
 * once enabled. */
int dvs_ring_update_files(struct dvs_ring *ring, uint32_t first, const int32_t *fds, uint32_t n);
/* Accept up to n requests; returns how many were accepted (the rest: queue full, hand
 * them in again after reaping), or -errno when ios[0] itself is invalid. Submits them to
 * the kernel with one io_uring_enter. */
int dvs_ring_submit(struct dvs_ring *ring, const struct dvs_io *ios, uint32_t n);
/* Move up to max completions into out; sleeps until at least min_wait are available
 * (min_wait is capped at what is in flight). Returns the number written. */
int dvs_ring_reap(struct dvs_ring *ring, struct dvs_io_done *out, uint32_t max,
		  uint32_t min_wait);
/* Both at once, with one io_uring_enter (to_submit + GETEVENTS) where one is needed. */
int dvs_ring_submit_and_reap(struct dvs_ring *ring, const struct dvs_io *ios, uint32_t n,
			     uint32_t *accepted, struct dvs_io_done *out, uint32_t max,
			     uint32_t min_wait);
int dvs_ring_stats(struct dvs_ring *ring, struct dvs_io_stats *out);
int dvs_ring_info(struct dvs_ring *ring, struct dvs_ring_info *out);
/* The ring fd (for tests that poke the kernel object directly). */
int dvs_ring_fd(struct dvs_ring *ring);
/* Test hook: queue one raw SQE (any opcode/flags/fd/user_data) past the engine's own
 * checks, as a buggy or hostile submitter would, and submit it. wait=1 (nothing else in
 * flight): wait for its CQE, consume it and store its res in *res -- shows that the
 * kernel-side restrictions hold on their own. wait=0: leave the CQE to the normal reap
 * path, where a user_data naming no request in flight is counted as bogus and dropped. */
int dvs_ring_inject_raw(struct dvs_ring *ring, uint8_t opcode, uint8_t sqe_flags, int32_t fd,
			uint64_t user_data, int32_t wait, int32_t *res);
/* Waits for requests in flight, then unmaps and closes. */
int dvs_ring_destroy(struct dvs_ring *ring);

/* ---- the engine facade: one interface over ring, thread pool and memory disk ---- */
#define DVS_ENGINE_RING 1
#define DVS_ENGINE_THREADS 2
#define DVS_ENGINE_MEMDISK 3

struct dvs_engine_params {
	uint32_t kind;        /* DVS_ENGINE_* */
	uint32_t entries;     /* queue depth the engine must sustain */
	uint32_t ring_flags;  /* ring: DVS_RING_* */
	uint32_t threads;     /* thread pool: worker threads (0: 2) */
	uint32_t sq_idle_ms;
	int32_t sq_cpu;
};

struct dvs_engine;
int dvs_engine_create(const struct dvs_engine_params *params, struct dvs_engine **out);
/* memdisk: fds are ignored; n empty in-memory files are created at those indices. */
int dvs_engine_register_files(struct dvs_engine *e, const int32_t *fds, uint32_t n);
int dvs_engine_register_buffers(struct dvs_engine *e, const struct dvs_buf *bufs, uint32_t n);
int dvs_engine_enable(struct dvs_engine *e);
/* Point registered file `index` at another fd (-1: none), e.g. to reuse an engine for the
 * next file; a ring needs DVS_RING_ALLOW_FILE_UPDATE. */
int dvs_engine_update_file(struct dvs_engine *e, uint32_t index, int32_t fd);
int dvs_engine_submit(struct dvs_engine *e, const struct dvs_io *ios, uint32_t n);
int dvs_engine_reap(struct dvs_engine *e, struct dvs_io_done *out, uint32_t max,
		    uint32_t min_wait);
/* Both in one crossing: submit what fits, then reap; *accepted gets the count taken. */
int dvs_engine_submit_and_reap(struct dvs_engine *e, const struct dvs_io *ios, uint32_t n,
			       uint32_t *accepted, struct dvs_io_done *out, uint32_t max,
			       uint32_t min_wait);
int dvs_engine_stats(struct dvs_engine *e, struct dvs_io_stats *out);
int dvs_engine_kind(struct dvs_engine *e);
int dvs_engine_max_in_flight(struct dvs_engine *e);
struct dvs_ring *dvs_engine_ring(struct dvs_engine *e); /* NULL unless kind RING */
int dvs_engine_destroy(struct dvs_engine *e);

/* ---- memory-disk fault injection (DVS_ENGINE_MEMDISK only) ----
 * The memory disk models a device with a volatile write cache: a write is visible to reads
 * at once but durable only after a later FSYNC/FDATASYNC of that file completes. I/O must
 * be in whole 4 KiB pages. */
#define DVS_CRASH_DROP_ALL 0    /* every unflushed write is lost */
#define DVS_CRASH_KEEP_SOME 1   /* a random subset survives, applied in issue order */
#define DVS_CRASH_REORDER 2     /* a random subset survives, applied in random order */
#define DVS_CRASH_TEAR 3        /* REORDER, and kept pages may be torn at 512-byte sectors */
/* After `ops` more requests, every request fails with -EIO and changes nothing (the
 * writer "died" there); a negative value disarms. */
int dvs_memdisk_fail_after(struct dvs_engine *e, int64_t ops);
/* Power loss: keep a subset of unflushed writes according to mode and seed; afterwards the
 * disk holds only durable data and accepts requests again. Returns the pages kept. */
int dvs_memdisk_crash(struct dvs_engine *e, uint32_t mode, uint64_t seed);
/* Raw page access for tamper tests: copy page `page` of `file` out of / into the disk
 * (into: both the visible and the durable copy). */
int dvs_memdisk_peek(struct dvs_engine *e, uint32_t file, uint64_t page, uint8_t *out4k);
int dvs_memdisk_poke(struct dvs_engine *e, uint32_t file, uint64_t page, const uint8_t *in4k);
/* Pages stored in file (durable view), and the unflushed writes pending. */
int64_t dvs_memdisk_pages(struct dvs_engine *e, uint32_t file, uint64_t *out, uint64_t max);
int64_t dvs_memdisk_unflushed(struct dvs_engine *e);
/* Snapshot/restore the durable image of a file (whole-file rollback tests). */
int dvs_memdisk_snapshot(struct dvs_engine *e, uint32_t file, uint32_t into_file);
/* cffi:end */

#endif /* DVS_URING_H */
