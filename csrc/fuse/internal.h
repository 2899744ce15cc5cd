/*
 * internal.h -- shared structures of the CntrFS server (csrc/fuse/).
 *
 * Model (after libfuse's passthrough_hp, re-designed for a bounded descriptor budget):
 * - An inode is a backing file the kernel knows, keyed by (st_dev, st_ino). It holds a file
 *   handle (name_to_handle_at) and, only while useful, an O_PATH descriptor; descriptors are
 *   evicted past a budget and re-opened with open_by_handle_at. Inodes live in slots of a
 *   table that never moves; the FUSE nodeid is (slot generation << 32 | slot index), so a
 *   stale or forged nodeid is detected, and a forgotten slot keeps its handle ("ghost") so
 *   export handles (name_to_handle_at on the mount) still resolve while the slot is unused.
 * - Every operation is *at() relative to those descriptors with a single, validated name
 *   component: no path the container controls is ever walked by the server.
 * - Locks: table lock (hash, free list, lookup counts) before an inode's own lock.
 */
#ifndef DVS_CNTRFS_INTERNAL_H
#define DVS_CNTRFS_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "compat.h"
#include "fuse/cntrfs.h"

#define CNTRFS_PROTO_MINOR 45
#define CNTRFS_PAGE 4096u
#define CNTRFS_DEFAULT_MAX_PAGES 256u
#define CNTRFS_MAX_HANDLE 128u
#define CNTRFS_INLINE_HANDLE 24u
#define CNTRFS_SLOTS_PER_CHUNK 4096u
#define CNTRFS_MAX_CHUNKS 16384u /* 64 Mi inodes */
#define CNTRFS_MAX_ANCHORS 256
#define CNTRFS_XATTR_MAX 65536u
#define CNTRFS_NAME_MAX 255u
#define CNTRFS_DIRBUF 32768u
#define CNTRFS_LOG_SIZE 16384u

enum slot_state { SLOT_UNUSED = 0, SLOT_LIVE = 1, SLOT_GHOST = 2 };

/* A POSIX lock owner (fl_owner of the kernel) on one inode: its own open file description,
 * so F_OFD_* locks taken through it behave like the owner's POSIX locks. */
struct lock_owner {
	uint64_t owner;
	int fd;
	uint32_t pid;
	struct lock_owner *next;
};

struct inode {
	pthread_mutex_t lock; /* fd, fd_users, nopen, backing, owners */
	/* protected by the table lock */
	uint64_t nlookup;
	uint32_t gen;
	uint32_t idx; /* own slot index, fixed */
	uint8_t state;
	uint8_t hashed;
	uint16_t handle_len;
	int32_t handle_type;
	int32_t anchor; /* index into server anchors, -1: none */
	dev_t dev;
	ino_t ino;
	uint32_t hash_next; /* slot index chain, 0 = end */
	uint32_t free_prev, free_next;
	uint8_t handle_inline[CNTRFS_INLINE_HANDLE];
	uint8_t *handle_heap; /* when handle_len > CNTRFS_INLINE_HANDLE */
	/* protected by lock */
	int fd;		  /* O_PATH, -1 when evicted */
	uint32_t fd_users; /* pins: the fd is never closed while > 0 */
	uint32_t nopen;	  /* open FUSE files: keeps the fd pinned (unlinked files) */
	int xattr_fd;	  /* an open file's descriptor while nopen > 0, for f*xattr; -1 */
	int32_t backing_id; /* passthrough backing file, 0: none */
	uint32_t backing_users;
	struct lock_owner *owners;
	/* hints, racy by design */
	_Atomic uint8_t referenced;
	_Atomic uint32_t type; /* S_IFMT of the last stat */
};

/* An open FUSE file or directory handle. fh = gen << 32 | index. */
struct file {
	uint32_t gen;
	uint32_t idx; /* own slot index, fixed */
	uint8_t in_use;
	uint8_t is_dir;
	uint8_t passthrough;
	int fd;
	uint32_t open_flags; /* flags the backing fd was opened with */
	struct inode *inode;
	uint32_t free_next;
	/* directories */
	pthread_mutex_t dir_lock;
	uint8_t *dirbuf;
	uint32_t dir_len, dir_pos;
	uint64_t dir_off; /* offset the kernel will ask for next if it continues */
	int dir_valid;
};

struct anchor {
	int mount_id;
	int fd;
};

struct ring_thread; /* uring.c */
struct ring_ent;

struct worker {
	struct dvs_fuse_server *s;
	struct ring_thread *rt; /* set for a FUSE-over-io_uring thread (uring.c) */
	int fd;
	int index;
	pthread_t thread;
	int started;
	uint8_t *in_base, *in;
	size_t in_cap;
	uint8_t *out; /* page-aligned payload buffer for replies */
	size_t out_cap;
	/* ring threads: the payload buffer of the entry being served, where a READ reply can
	 * be produced in place (READ carries no payload of its own); NULL otherwise */
	uint8_t *reply_direct;
	_Atomic uint64_t cur_unique;
	/* statistics, written by this worker only */
	_Atomic uint64_t requests, errors, bytes_read, bytes_written;
	_Atomic uint64_t by_opcode[DVS_FUSE_MAX_OPCODE];
};

struct blocking_op; /* ops.c: a SETLKW/flock wait on its own thread */

struct idmap {
	uint32_t n;
	struct dvs_fuse_id_range r[64];
};

struct dvs_fuse_server {
	struct dvs_fuse_config cfg;
	char *source;
	struct idmap uid_map, gid_map;
	uint32_t overflow_uid, overflow_gid;
	int root_fd;
	dev_t root_dev;
	ino_t root_ino;
	int dev_fd;
	uint32_t n_workers;
	struct worker *workers;

	/* FUSE over io_uring (uring.c) */
	uint32_t n_rings;		/* ring threads (0: none set up) */
	struct ring_thread **rings;
	uint32_t ring_queues;		/* the kernel's queue count: possible CPUs */
	int uring;			/* FUSE_OVER_IO_URING granted at INIT */
	pthread_cond_t ring_cond;	/* under init_lock: set-up / go / registration results */
	uint32_t rings_set_up, rings_failed, rings_registered, rings_reg_failed;
	int ring_go;			/* 1: register, -1: exit */
	struct dvs_fuse_negotiated pending_init; /* published once registration settled */
	_Atomic int stopping;
	_Atomic uint32_t running;
	/* the ring carries the requests: /dev/fuse only brings FORGET and INTERRUPT, so one
	 * device worker is enough, and it lets forgets pile up into batches */
	_Atomic int dev_quiet;

	/* negotiated at INIT */
	pthread_mutex_t init_lock;
	pthread_cond_t init_cond;
	struct dvs_fuse_negotiated init;
	_Atomic int initialized;
	uint32_t max_write, max_pages;
	int passthrough, writeback, posix_acl, killpriv_v2, setxattr_ext, export_support;
	int max_stack_depth;
	uint64_t entry_sec, attr_sec;
	uint32_t entry_nsec, attr_nsec;

	/* inode table */
	pthread_mutex_t itab_lock;
	struct inode **chunks;
	uint32_t n_slots;	  /* slots handed out so far (index 0 unused) */
	uint32_t *hash;		  /* buckets of slot indices */
	uint32_t hash_mask;
	uint32_t free_head, free_tail; /* FIFO of ghost/unused slots */
	uint32_t n_free;
	_Atomic uint64_t n_live;
	_Atomic uint64_t n_path_fds;
	_Atomic uint32_t clock_hand;
	uint32_t fd_budget;
	pthread_mutex_t anchor_lock;
	struct anchor anchors[CNTRFS_MAX_ANCHORS];
	int n_anchors;

	/* file table */
	pthread_mutex_t ftab_lock;
	struct file **fchunks;
	uint32_t n_files;
	uint32_t ffree_head;
	_Atomic uint64_t open_files;

	/* blocking lock waits */
	pthread_mutex_t block_lock;
	struct blocking_op *blocking;
	_Atomic uint64_t n_blocking;
	uint64_t recent_interrupts[16];
	uint32_t recent_pos;

	/* statistics not tied to a worker */
	_Atomic uint64_t fd_evictions, handle_opens, passthrough_opens, backing_files, interrupts;

	/* log ring */
	pthread_mutex_t log_lock;
	char log[CNTRFS_LOG_SIZE];
	uint32_t log_len;

	/* DVS_FUSE_NO_DEVICE: replies captured here */
	uint8_t *capture;
	uint32_t capture_cap, capture_len;
	struct worker *fuzz_worker;
	pthread_mutex_t fuzz_lock;
	pthread_cond_t fuzz_cond;
	const uint8_t *fuzz_req;
	uint32_t fuzz_len;
	int fuzz_state; /* 0 idle, 1 request posted, 2 done, 3 exit */
	pthread_t fuzz_thread;
	int fuzz_started;
};

/* One request being served. */
struct req {
	struct dvs_fuse_server *s;
	struct worker *w;
	const struct fuse_in_header *in;
	const uint8_t *arg; /* opcode argument, arglen bytes (extensions excluded) */
	uint32_t arglen;
	struct ring_ent *ent; /* arrived through a ring entry: the reply goes there */
	int replied;
	int reply_failed; /* the kernel refused the reply (request was aborted) */
};

/* Where an answer given later (a lock wait on its own thread) must go: the /dev/fuse
 * descriptor the request was read from, or the ring entry it arrived in. */
struct reply_target {
	int fd;
	struct ring_ent *ent;
	uint64_t unique;
};

/* ---- server.c ---- */
void cntrfs_log(struct dvs_fuse_server *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
int cntrfs_reply(struct req *r, int error, const struct iovec *iov, int n);
int cntrfs_reply_buf(struct req *r, const void *payload, size_t len);
int cntrfs_reply_err(struct req *r, int neg_errno);
/* Answer a request whose handler returned long ago (error only, no payload). */
void cntrfs_late_reply(struct dvs_fuse_server *s, const struct reply_target *t, int error);
/* Serve one raw request; ent: the ring entry it arrived in (NULL: /dev/fuse). */
void cntrfs_serve(struct worker *w, const uint8_t *buf, size_t len, struct ring_ent *ent);
void cntrfs_publish_init(struct dvs_fuse_server *s, const struct dvs_fuse_negotiated *info);
int cntrfs_wake_signal(void);

/* ---- uring.c ---- */
/* Set up the ring threads (before the workers start): 0, or -errno when FUSE over
 * io_uring cannot be used by this process (logged); the server then uses /dev/fuse. */
int cntrfs_rings_setup(struct dvs_fuse_server *s);
/* After the INIT reply: go=1 registers every entry (the last thread publishes the
 * negotiation result), go=-1 ends the ring threads. */
void cntrfs_rings_go(struct dvs_fuse_server *s, int go);
void cntrfs_rings_stop(struct dvs_fuse_server *s);
void cntrfs_rings_free(struct dvs_fuse_server *s);
/* Ring entries (uring.c): fill the reply of the request that arrived in ent; park it for a
 * late answer; hand a late answer back to the entry's thread. */
int cntrfs_ring_emit(struct ring_ent *ent, const struct iovec *iov, int n);
void cntrfs_ring_park(struct ring_ent *ent);
void cntrfs_ring_late_reply(struct ring_ent *ent, uint64_t unique, int error);
int cntrfs_possible_cpus(void);
void cntrfs_ring_stats(struct dvs_fuse_server *s, struct dvs_fuse_stats *st);
void cntrfs_add_worker_stats(struct worker *w, struct dvs_fuse_stats *st);

/* ---- decode.c ---- */
struct opdesc {
	const char *name;
	uint32_t min_arg; /* bytes of fixed argument */
	int (*handler)(struct req *r);
	uint8_t flags;
};
#define OP_NO_REPLY 1
#define OP_NAMES 2 /* argument carries NUL-terminated name(s) after the fixed part */
const struct opdesc *cntrfs_opdesc(uint32_t opcode);
/* Validate a raw request; on success fills r->in/arg/arglen. 0, or -EIO when no reply can be
 * addressed (too short), or -EINVAL/-ENOSYS to be replied. */
int cntrfs_decode(const uint8_t *buf, size_t len, struct req *r);
/* The index-th NUL-terminated string after `skip` bytes of the argument; -EINVAL if absent. */
int cntrfs_arg_string(const struct req *r, uint32_t skip, int index, const char **out,
		      uint32_t *len);
int cntrfs_valid_name(const char *name, uint32_t len);

/* ---- creds.c ---- */
uint32_t cntrfs_uid_to_backing(const struct dvs_fuse_server *s, uint32_t kid);
uint32_t cntrfs_gid_to_backing(const struct dvs_fuse_server *s, uint32_t kid);
uint32_t cntrfs_uid_to_kernel(const struct dvs_fuse_server *s, uint32_t bid);
uint32_t cntrfs_gid_to_kernel(const struct dvs_fuse_server *s, uint32_t bid);
int cntrfs_map_is_identity(const struct idmap *m);
int cntrfs_creds_init_thread(void);
int cntrfs_creds_for(struct req *r); /* act as the caller */
int cntrfs_creds_root(void);	     /* act as the server (root) */
int cntrfs_priv_enter(void);	     /* raise every permitted capability; returns a token */
int cntrfs_priv_only(int cap);	     /* raise just this one (non-root callers) */
void cntrfs_priv_leave(int token);
int cntrfs_set_umask(uint32_t mask);
/* translate the ids inside a system.posix_acl_* value in place; to_backing or back */
void cntrfs_acl_translate(const struct dvs_fuse_server *s, uint8_t *value, size_t len,
			  int to_backing);

/* ---- inode.c ---- */
int cntrfs_itab_init(struct dvs_fuse_server *s);
void cntrfs_itab_free(struct dvs_fuse_server *s);
struct inode *cntrfs_inode(struct dvs_fuse_server *s, uint64_t nodeid);
static inline uint64_t cntrfs_nodeid(const struct inode *ino)
{
	return (uint64_t)ino->gen << 32 | ino->idx;
}
int cntrfs_revive(struct req *r, uint64_t nodeid, struct fuse_entry_out *e);
int cntrfs_inode_fd(struct dvs_fuse_server *s, struct inode *ino);
void cntrfs_inode_put(struct dvs_fuse_server *s, struct inode *ino);
/* Look `name` up below parent (pfd = parent's pinned fd); on success the inode's lookup count
 * is raised and e is filled. name "." / ".." are handled here. */
int cntrfs_lookup(struct req *r, struct inode *parent, int pfd, const char *name,
		  struct fuse_entry_out *e);
/* Register an inode from an open descriptor (create, tmpfile): nlookup += 1, fills e. */
int cntrfs_record_fd(struct req *r, int fd, int pfd, const char *name, struct fuse_entry_out *e,
		     struct inode **out);
void cntrfs_forget(struct dvs_fuse_server *s, uint64_t nodeid, uint64_t n);
void cntrfs_fill_attr(const struct dvs_fuse_server *s, const struct stat *st,
		      struct fuse_attr *a);
void cntrfs_fill_entry(const struct dvs_fuse_server *s, uint64_t nodeid, uint32_t gen,
		       const struct stat *st, struct fuse_entry_out *e);
int cntrfs_anchor_root(struct dvs_fuse_server *s);

/* ---- ops.c ---- */
int cntrfs_op_init(struct req *r);
struct file *cntrfs_file(struct dvs_fuse_server *s, uint64_t fh);
void cntrfs_blocking_stop_all(struct dvs_fuse_server *s);
void cntrfs_ftab_free(struct dvs_fuse_server *s);
int cntrfs_ftab_init(struct dvs_fuse_server *s);

/* handlers (ops.c) */
#define CNTRFS_HANDLERS(X)                                                                   \
	X(lookup) X(forget) X(getattr) X(setattr) X(readlink) X(symlink) X(mknod) X(mkdir)     \
	X(unlink) X(rmdir) X(rename) X(link) X(open) X(read) X(write) X(statfs) X(release)    \
	X(fsync) X(setxattr) X(getxattr) X(listxattr) X(removexattr) X(flush) X(opendir)       \
	X(readdir) X(releasedir) X(fsyncdir) X(getlk) X(setlk) X(setlkw) X(access) X(create)   \
	X(interrupt) X(destroy) X(batch_forget) X(fallocate) X(readdirplus) X(rename2)         \
	X(lseek) X(copy_file_range) X(syncfs) X(tmpfile) X(statx) X(copy_file_range_64)        \
	X(unsupported)
#define CNTRFS_DECLARE(name) int cntrfs_op_##name(struct req *r);
CNTRFS_HANDLERS(CNTRFS_DECLARE)
#undef CNTRFS_DECLARE

static inline uint64_t cntrfs_now_ns(void);
#include <time.h>
static inline uint64_t cntrfs_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
