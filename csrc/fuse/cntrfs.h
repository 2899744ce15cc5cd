/*
 * cntrfs.h -- CntrFS, the FUSE proxy filesystem: a multi-threaded C server that speaks the
 * /dev/fuse protocol itself (no libfuse, no Python on the request path).
 *
 * Protocol facts this API relies on (include/uapi/linux/fuse.h, Linux 6.18, protocol 7.45):
 * - A FUSE connection is one open of /dev/fuse handed to the kernel at mount time ("fd=N").
 *   FUSE_DEV_IOC_CLONE gives further descriptors on the same connection; each has its own
 *   processing queue, so a request must be answered on the descriptor it was read from.
 *   Every worker thread owns one such descriptor.
 * - The kernel sends FUSE_INIT as soon as the filesystem is mounted; nothing else is served
 *   until it is answered. Capabilities are negotiated there (dvs_fuse_negotiated).
 * - When the last descriptor of a connection is closed (server stopped or killed) the kernel
 *   aborts the connection: waiting and later callers get ENOTCONN, nobody hangs. When the
 *   filesystem is unmounted, reads on the device return ENODEV and the workers end.
 * - FUSE over io_uring (Linux 6.14, uring.c): with FUSE_OVER_IO_URING granted at INIT,
 *   ordinary requests travel through ring entries instead of read()/write() on the device;
 *   INIT, FORGET and INTERRUPT still come through /dev/fuse, so both transports run.
 *
 * Python drives the life cycle through these few coarse calls (dvs/lowlevel/fuse.py):
 * new -> (mount with fd = dvs_fuse_dev_fd) -> wait_init -> stats/log ... -> stop -> free.
 * dvs_fuse_fuzz_request runs the request decoder and dispatcher on a raw request buffer
 * without any mount, for hypothesis/atheris.
 */
#ifndef DVS_CNTRFS_H
#define DVS_CNTRFS_H

#include <stdint.h>

/* cffi:begin */
#define DVS_FUSE_MAX_OPCODE 64
#define DVS_FUSE_WANT_PASSTHROUGH 1	/* kernel passthrough for regular files */
#define DVS_FUSE_WANT_WRITEBACK 2	/* writeback cache (only without passthrough) */
#define DVS_FUSE_NO_DEVICE 4		/* no /dev/fuse: replies are captured (fuzzing) */
#define DVS_FUSE_DEBUG 8		/* log every request to the log ring */
#define DVS_FUSE_WANT_URING 16		/* FUSE over io_uring when the kernel offers it */
#define DVS_FUSE_TEST_URING_BAD_QID 32	/* tests: register ring entries for a queue that does
					 * not exist, so the kernel refuses them and falls back */
#define DVS_FUSE_URING_NO_PIN 64	/* do not pin ring threads to their queue's CPU */
#define DVS_FUSE_TRANSPORT_DEV 0	/* requests are read from /dev/fuse */
#define DVS_FUSE_TRANSPORT_URING 1	/* requests arrive in io_uring ring entries */

struct dvs_fuse_id_range { /* one line of a user-namespace map: inside outside count */
	uint32_t inside;
	uint32_t outside;
	uint32_t count;
};

struct dvs_fuse_config {
	const char *source;	/* the directory to serve */
	uint32_t flags;		/* DVS_FUSE_WANT_* ... */
	uint32_t n_workers;	/* 0: 2 per CPU, at least 2 */
	uint32_t max_pages;	/* largest request in pages, 0: 256 (1 MiB) */
	uint32_t fd_budget;	/* O_PATH descriptors kept open for inodes, 0: RLIMIT_NOFILE/2 */
	uint64_t entry_timeout_ns; /* dentry cache validity given to the kernel */
	uint64_t attr_timeout_ns;  /* attribute cache validity */
	uint32_t ring_depth;	   /* ring entries per ring thread and queue, 0: 1 */
	uint32_t ring_threads;	   /* ring threads, 0: n_workers */
	/* id maps of the target user namespace (uid_map/gid_map lines); n == 0: identity.
	 * A backing file owned by id B appears owned by the kernel id that B maps to, and a
	 * caller with kernel id K acts on the backing store as the id K maps back to. */
	const struct dvs_fuse_id_range *uid_map;
	uint32_t n_uid_map;
	const struct dvs_fuse_id_range *gid_map;
	uint32_t n_gid_map;
};

struct dvs_fuse_negotiated {
	uint32_t done;		/* INIT answered */
	uint32_t kernel_major, kernel_minor; /* what the kernel speaks */
	uint32_t proto_minor;	/* what we speak */
	uint64_t kernel_flags;	/* offered by the kernel (flags | flags2 << 32) */
	uint64_t granted_flags;	/* what we switched on */
	uint32_t max_write;
	uint32_t max_pages;
	uint32_t passthrough;	/* 1: FUSE_PASSTHROUGH granted */
	uint32_t writeback;	/* 1: FUSE_WRITEBACK_CACHE granted */
	uint32_t max_stack_depth;
	int32_t error;		/* -errno if INIT failed */
	uint32_t transport;	/* DVS_FUSE_TRANSPORT_*: what carries requests */
	uint32_t ring_queues;	/* io_uring: the kernel's queues (one per possible CPU) */
	uint32_t ring_entries;	/* io_uring: entries registered */
	uint32_t ring_threads;	/* io_uring: threads serving them */
};

struct dvs_fuse_stats {
	uint64_t requests;
	uint64_t errors;	/* replies with error != 0 (ENOENT lookups included) */
	uint64_t by_opcode[64];
	uint64_t bytes_read;	/* served by the daemon (passthrough reads never show here) */
	uint64_t bytes_written;
	uint64_t inodes;	/* live inodes known to the kernel */
	uint64_t open_files;
	uint64_t path_fds;	/* O_PATH descriptors currently cached */
	uint64_t fd_evictions;
	uint64_t handle_opens;	/* open_by_handle_at after an eviction */
	uint64_t passthrough_opens;
	uint64_t backing_files;	/* backing ids currently registered */
	uint64_t interrupts;
	uint64_t blocked_locks;	/* SETLKW requests waiting right now */
	uint64_t ring_requests;	/* requests that arrived through io_uring entries */
	uint64_t ring_commit_errors; /* commits the kernel refused (request gone) */
	uint32_t workers;	/* worker threads still running (/dev/fuse and ring) */
	uint32_t ring_threads;	/* ring threads still running */
};

struct dvs_fuse_server;

/* Create the server and its worker threads (they wait for requests). Returns 0 and *out, or
 * -errno. Without DVS_FUSE_NO_DEVICE it opens /dev/fuse and clones one descriptor per
 * worker; mount with fd=dvs_fuse_dev_fd(server) (see dvs/fs/server.py). */
int dvs_fuse_new(const struct dvs_fuse_config *config, struct dvs_fuse_server **out);
int dvs_fuse_dev_fd(struct dvs_fuse_server *server);
/* Start the workers: after the mount (the kernel then has INIT queued). */
int dvs_fuse_start(struct dvs_fuse_server *server);
/* Wait until FUSE_INIT was answered (0), the timeout passed (-ETIMEDOUT) or init failed. */
int dvs_fuse_wait_init(struct dvs_fuse_server *server, uint32_t timeout_ms,
		       struct dvs_fuse_negotiated *info);
/* Wait until every worker has ended (after unmount or stop): 0, or -ETIMEDOUT. */
int dvs_fuse_wait_exit(struct dvs_fuse_server *server, uint32_t timeout_ms);
int dvs_fuse_stats(struct dvs_fuse_server *server, struct dvs_fuse_stats *stats);
/* Move up to cap-1 bytes of pending log lines (one per line, '\n'-terminated) into buf;
 * returns the byte count. */
int dvs_fuse_log_drain(struct dvs_fuse_server *server, char *buf, uint32_t cap);
/* Stop the workers (waking them), close the device descriptors -- the kernel aborts the
 * connection, so every pending and future request on the mount fails with ENOTCONN. */
int dvs_fuse_stop(struct dvs_fuse_server *server);
void dvs_fuse_free(struct dvs_fuse_server *server);

/* Decode and serve one raw request (as read from /dev/fuse) on a DVS_FUSE_NO_DEVICE server;
 * the reply (fuse_out_header + payload) is copied to reply (cap bytes), *reply_len is its
 * length or 0 when the request has no reply. Returns 0, or -errno when the buffer is so
 * broken that no reply could be addressed (shorter than a header). */
int dvs_fuse_fuzz_request(struct dvs_fuse_server *server, const uint8_t *request, uint32_t len,
			  uint8_t *reply, uint32_t cap, uint32_t *reply_len);
/* cffi:end */

#endif /* DVS_CNTRFS_H */
