/*
 * server.c -- life cycle of a CntrFS server: device descriptors, worker threads, the INIT
 * negotiation, replies, statistics, the log ring and the fuzzing entry point.
 *
 * Kernel semantics relied on:
 * - /dev/fuse refuses reads until the descriptor is bound to a mounted filesystem, and
 *   FUSE_DEV_IOC_CLONE only works on a bound descriptor: workers start after the mount
 *   (dvs_fuse_start). Each worker reads and replies on its own clone.
 * - read() on the device blocks until a request is queued; ENOENT means the request we were
 *   about to read was interrupted away, ENODEV that the filesystem was unmounted (the
 *   connection is gone: the worker ends). A read buffer must hold max_write plus headers.
 * - A blocked read() is woken with EINTR by a signal whose handler is installed without
 *   SA_RESTART; dvs_fuse_stop uses that (a real-time signal nobody else in the process
 *   uses) to end the workers, then closes every descriptor so the kernel aborts the
 *   connection: pending and later requests fail with ENOTCONN instead of hanging.
 * - Replies are written with writev(): header and payload need not be contiguous, so READ
 *   payloads stay page-aligned (O_DIRECT backing files) and WRITE payloads arrive aligned
 *   because the read buffer is placed so that byte 80 (header + fuse_write_in) starts a page.
 * - INIT: we answer with our minor (45); the kernel uses the smaller of both. Capabilities
 *   are the intersection of what we want and what it offers; every wanted capability that
 *   is missing is logged with the reason, and the server degrades (no passthrough ->
 *   writeback cache; no max_pages -> 128 KiB requests, ...).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fuse/internal.h"
#include "sys/sys.h"

#define WRITE_PAYLOAD_OFFSET (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))
#define FUSE_DEV_IOC_CLONE_DVS _IOR(229, 0, uint32_t)
/* With the ring, a forget per unlinked file would wake a device worker per file: waiting a
 * little after each lets the kernel hand over the next ones as one BATCH_FORGET (the
 * INTERRUPT that may queue meanwhile only waits this long; its request is not blocked). */
#define CNTRFS_FORGET_BATCH_US 2000

static pthread_once_t signal_once = PTHREAD_ONCE_INIT;
static int wake_sig;

static void wake_handler(int sig)
{
	(void)sig; /* only there to interrupt blocking syscalls */
}

static void install_wake_handler(void)
{
	wake_sig = SIGRTMIN + 6;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = wake_handler;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART: blocked reads return EINTR */
	sigaction(wake_sig, &sa, NULL);
}

int cntrfs_wake_signal(void)
{
	pthread_once(&signal_once, install_wake_handler);
	return wake_sig;
}

/* ---- log ring ---- */

void cntrfs_log(struct dvs_fuse_server *s, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	pthread_mutex_lock(&s->log_lock);
	if (s->log_len + (uint32_t)n > CNTRFS_LOG_SIZE) {
		/* drop the oldest lines */
		uint32_t drop = s->log_len + (uint32_t)n - CNTRFS_LOG_SIZE;
		char *cut = memchr(s->log + drop, '\n', s->log_len - drop);
		drop = cut ? (uint32_t)(cut - s->log) + 1 : s->log_len;
		memmove(s->log, s->log + drop, s->log_len - drop);
		s->log_len -= drop;
	}
	memcpy(s->log + s->log_len, line, (size_t)n);
	s->log_len += (uint32_t)n;
	pthread_mutex_unlock(&s->log_lock);
}

int dvs_fuse_log_drain(struct dvs_fuse_server *s, char *buf, uint32_t cap)
{
	if (cap == 0)
		return 0;
	pthread_mutex_lock(&s->log_lock);
	uint32_t n = s->log_len < cap - 1 ? s->log_len : cap - 1;
	if (n < s->log_len) { /* whole lines only */
		char *last = memrchr(s->log, '\n', n);
		n = last ? (uint32_t)(last - s->log) + 1 : 0;
	}
	memcpy(buf, s->log, n);
	buf[n] = '\0';
	memmove(s->log, s->log + n, s->log_len - n);
	s->log_len -= n;
	pthread_mutex_unlock(&s->log_lock);
	return (int)n;
}

/* ---- replies ---- */

static int emit(struct dvs_fuse_server *s, int fd, struct ring_ent *ent, struct iovec *iov,
		int n, size_t total)
{
	if (s->cfg.flags & DVS_FUSE_NO_DEVICE) {
		s->capture_len = 0;
		for (int i = 0; i < n; i++) {
			size_t take = iov[i].iov_len;
			if (s->capture_len + take > s->capture_cap)
				take = s->capture_cap - s->capture_len;
			memcpy(s->capture + s->capture_len, iov[i].iov_base, take);
			s->capture_len += (uint32_t)take;
		}
		return 0;
	}
	if (ent)
		return cntrfs_ring_emit(ent, iov, n); /* committed by the entry's thread */
	ssize_t w = writev(fd, iov, n);
	if (w < 0)
		return -errno;
	return (size_t)w == total ? 0 : -EIO;
}

int cntrfs_reply(struct req *r, int error, const struct iovec *iov, int n)
{
	struct iovec all[8];
	struct fuse_out_header h;
	size_t total = sizeof(h);
	if (n > 7)
		return -EINVAL;
	for (int i = 0; i < n; i++) {
		all[i + 1] = iov[i];
		total += iov[i].iov_len;
	}
	h.len = (uint32_t)total;
	h.error = error;
	h.unique = r->in->unique;
	all[0].iov_base = &h;
	all[0].iov_len = sizeof(h);
	r->replied = 1;
	if (error)
		atomic_fetch_add_explicit(&r->w->errors, 1, memory_order_relaxed);
	int ret = emit(r->s, r->w->fd, r->ent, all, n + 1, total);
	if (ret < 0) {
		/* ENOENT: the request was interrupted and dropped by the kernel meanwhile */
		r->reply_failed = 1;
		if (ret != -ENOENT && !atomic_load(&r->s->stopping))
			cntrfs_log(r->s, "reply to unique %llu failed: %s",
				   (unsigned long long)r->in->unique, strerror(-ret));
	}
	return 0;
}

int cntrfs_reply_buf(struct req *r, const void *payload, size_t len)
{
	struct iovec iov = { .iov_base = (void *)payload, .iov_len = len };
	return cntrfs_reply(r, 0, &iov, len ? 1 : 0);
}

int cntrfs_reply_err(struct req *r, int neg_errno)
{
	return cntrfs_reply(r, neg_errno, NULL, 0);
}

void cntrfs_late_reply(struct dvs_fuse_server *s, const struct reply_target *t, int error)
{
	if (t->ent) {
		cntrfs_ring_late_reply(t->ent, t->unique, error);
		return;
	}
	struct fuse_out_header h = { .len = sizeof(h), .error = error, .unique = t->unique };
	struct iovec iov = { &h, sizeof(h) };
	emit(s, t->fd, NULL, &iov, 1, sizeof(h));
}

/* ---- INIT ---- */

struct feature {
	uint64_t flag;
	const char *name;
	const char *without;
};

static const struct feature wanted[] = {
	{ FUSE_ASYNC_READ, "ASYNC_READ", "reads are serialised per file" },
	{ FUSE_POSIX_LOCKS, "POSIX_LOCKS", "POSIX locks stay local to the mount" },
	{ FUSE_ATOMIC_O_TRUNC, "ATOMIC_O_TRUNC", "O_TRUNC becomes a separate truncate" },
	{ FUSE_EXPORT_SUPPORT, "EXPORT_SUPPORT", "no open_by_handle_at on the mount" },
	{ FUSE_BIG_WRITES, "BIG_WRITES", "4 KiB writes" },
	{ FUSE_DONT_MASK, "DONT_MASK", "the kernel applies the umask itself" },
	{ FUSE_FLOCK_LOCKS, "FLOCK_LOCKS", "flock() locks stay local to the mount" },
	{ FUSE_AUTO_INVAL_DATA, "AUTO_INVAL_DATA", "cached pages are not invalidated on mtime change" },
	{ FUSE_DO_READDIRPLUS, "DO_READDIRPLUS", "no attributes with directory listings" },
	{ FUSE_READDIRPLUS_AUTO, "READDIRPLUS_AUTO", "readdirplus for every listing" },
	{ FUSE_ASYNC_DIO, "ASYNC_DIO", "direct I/O submitted synchronously" },
	{ FUSE_PARALLEL_DIROPS, "PARALLEL_DIROPS", "lookups and readdir serialised per directory" },
	{ FUSE_HANDLE_KILLPRIV_V2, "HANDLE_KILLPRIV_V2", "the kernel clears suid/sgid with extra SETATTRs" },
	{ FUSE_POSIX_ACL, "POSIX_ACL", "ACLs are not enforced by the kernel" },
	{ FUSE_MAX_PAGES, "MAX_PAGES", "requests limited to 128 KiB" },
	{ FUSE_CACHE_SYMLINKS, "CACHE_SYMLINKS", "every readlink is a round trip" },
	{ FUSE_SETXATTR_EXT, "SETXATTR_EXT", "setting an ACL cannot clear sgid" },
	{ FUSE_DIRECT_IO_ALLOW_MMAP, "DIRECT_IO_ALLOW_MMAP", "no shared mmap of O_DIRECT files" },
};

/* The fuse module's enable_uring parameter: 'Y', 'N', or '?' when it cannot be read. */
static char uring_knob(void)
{
	char c = '?';
	int fd = open("/sys/module/fuse/parameters/enable_uring", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (read(fd, &c, 1) != 1)
			c = '?';
		close(fd);
	}
	return c;
}

static int stack_depth_for(const char *source)
{
	struct statfs sf;
	if (statfs(source, &sf) < 0)
		return 1;
	switch ((unsigned long)sf.f_type) {
	case 0x794c7630: /* overlayfs */
	case 0x65735546: /* fuse */
	case 0xf15f:	 /* ecryptfs */
		return FILESYSTEM_MAX_STACK_DEPTH;
	default:
		return 1;
	}
}

int cntrfs_op_init(struct req *r)
{
	struct dvs_fuse_server *s = r->s;
	const struct fuse_init_in *in = (const void *)r->arg;
	if (atomic_load(&s->initialized))
		return -EPROTO;
	struct dvs_fuse_negotiated info;
	memset(&info, 0, sizeof(info));
	info.kernel_major = in->major;
	info.kernel_minor = in->minor;
	if (in->major > 7) {
		/* ask the kernel to fall back to major 7 */
		struct dvs_fuse_init_out out;
		memset(&out, 0, sizeof(out));
		out.major = FUSE_KERNEL_VERSION;
		out.minor = CNTRFS_PROTO_MINOR;
		return cntrfs_reply_buf(r, &out, FUSE_COMPAT_INIT_OUT_SIZE);
	}
	if (in->major < 7 || in->minor < 31) {
		cntrfs_log(s, "INIT: kernel speaks FUSE %u.%u, at least 7.31 is needed", in->major,
			   in->minor);
		info.error = -EPROTO;
		goto done_err;
	}
	uint64_t kflags = in->flags;
	if ((in->flags & FUSE_INIT_EXT) && r->arglen >= offsetof(struct fuse_init_in, flags2) + 4)
		kflags |= (uint64_t)in->flags2 << 32;
	info.kernel_flags = kflags;

	uint64_t want = FUSE_INIT_EXT;
	for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
		want |= wanted[i].flag;
	uint64_t grant = want & kflags;
	for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++)
		if (!(kflags & wanted[i].flag))
			cntrfs_log(s, "INIT: kernel does not offer %s: %s", wanted[i].name,
				   wanted[i].without);

	int want_pt = (s->cfg.flags & DVS_FUSE_WANT_PASSTHROUGH) &&
		      !(s->cfg.flags & DVS_FUSE_NO_DEVICE);
	int pt = 0;
	if (want_pt && (kflags & FUSE_PASSTHROUGH)) {
		grant |= FUSE_PASSTHROUGH;
		pt = 1;
	} else if (want_pt) {
		cntrfs_log(s, "INIT: kernel does not offer PASSTHROUGH (needs Linux 6.9): every read "
			      "and write goes through the daemon");
	} else if (s->cfg.flags & DVS_FUSE_WANT_PASSTHROUGH) {
		cntrfs_log(s, "INIT: passthrough needs a real /dev/fuse connection");
	} else {
		cntrfs_log(s, "INIT: passthrough switched off by configuration");
	}
	int wb = 0;
	int cache = s->attr_sec || s->attr_nsec;
	if (!pt && (s->cfg.flags & DVS_FUSE_WANT_WRITEBACK) && cache) {
		if (kflags & FUSE_WRITEBACK_CACHE) {
			grant |= FUSE_WRITEBACK_CACHE;
			wb = 1;
		} else {
			cntrfs_log(s, "INIT: kernel does not offer WRITEBACK_CACHE: writes are "
				      "written through");
		}
	} else if (pt && (s->cfg.flags & DVS_FUSE_WANT_WRITEBACK)) {
		cntrfs_log(s, "INIT: writeback cache off: it excludes passthrough");
	}

	int ring = 0;
	if (s->cfg.flags & DVS_FUSE_WANT_URING) {
		if (!(kflags & FUSE_OVER_IO_URING)) {
			char knob = uring_knob();
			cntrfs_log(s, "INIT: kernel does not offer OVER_IO_URING (needs Linux 6.14 and "
				      "/sys/module/fuse/parameters/enable_uring=Y, it is %c): requests "
				      "are read from /dev/fuse", knob);
		} else if (s->n_rings == 0) {
			cntrfs_log(s, "INIT: FUSE over io_uring offered but no ring could be set up "
				      "(see above): requests are read from /dev/fuse");
		} else {
			grant |= FUSE_OVER_IO_URING;
			ring = 1;
		}
	}

	s->max_pages = (grant & FUSE_MAX_PAGES) ? s->cfg.max_pages : 32;
	s->max_write = s->max_pages * CNTRFS_PAGE;
	if (!(grant & FUSE_BIG_WRITES) && !(grant & FUSE_MAX_PAGES))
		s->max_write = CNTRFS_PAGE;
	s->passthrough = pt;
	s->writeback = wb;
	s->posix_acl = (grant & FUSE_POSIX_ACL) != 0;
	s->killpriv_v2 = (grant & FUSE_HANDLE_KILLPRIV_V2) != 0;
	s->setxattr_ext = (grant & FUSE_SETXATTR_EXT) != 0;
	s->export_support = (grant & FUSE_EXPORT_SUPPORT) != 0;
	s->max_stack_depth = pt ? stack_depth_for(s->source) : 0;
	s->uring = ring;

	struct dvs_fuse_init_out out;
	memset(&out, 0, sizeof(out));
	out.major = FUSE_KERNEL_VERSION;
	out.minor = CNTRFS_PROTO_MINOR;
	out.max_readahead = in->max_readahead;
	out.flags = (uint32_t)grant;
	out.flags2 = (uint32_t)(grant >> 32);
	out.max_background = 64;
	out.congestion_threshold = 48;
	out.max_write = s->max_write;
	out.time_gran = 1;
	out.max_pages = (uint16_t)s->max_pages;
	out.max_stack_depth = (uint32_t)s->max_stack_depth;

	info.done = 1;
	info.proto_minor = in->minor < CNTRFS_PROTO_MINOR ? in->minor : CNTRFS_PROTO_MINOR;
	info.granted_flags = grant;
	info.max_write = s->max_write;
	info.max_pages = s->max_pages;
	info.passthrough = (uint32_t)pt;
	info.writeback = (uint32_t)wb;
	info.max_stack_depth = (uint32_t)s->max_stack_depth;
	info.transport = DVS_FUSE_TRANSPORT_DEV;
	cntrfs_log(s, "INIT: FUSE %u.%u, passthrough %s, writeback cache %s, max_write %u KiB",
		   in->major, info.proto_minor, pt ? "on" : "off", wb ? "on" : "off",
		   s->max_write / 1024);
	atomic_store(&s->initialized, 1);
	/* the kernel marks the connection initialised while it processes this reply: only
	 * then may ring entries be registered (earlier ones get EAGAIN) */
	cntrfs_reply_buf(r, &out, sizeof(out));
	if (ring && !r->reply_failed) {
		pthread_mutex_lock(&s->init_lock);
		s->pending_init = info;
		pthread_mutex_unlock(&s->init_lock);
		cntrfs_rings_go(s, 1); /* the ring threads publish the result */
		return 0;
	}
	if (s->n_rings)
		cntrfs_rings_go(s, -1);
	cntrfs_publish_init(s, &info);
	return 0;

done_err:
	if (s->n_rings)
		cntrfs_rings_go(s, -1);
	cntrfs_publish_init(s, &info);
	return info.error;
}

void cntrfs_publish_init(struct dvs_fuse_server *s, const struct dvs_fuse_negotiated *info)
{
	if (info->transport == DVS_FUSE_TRANSPORT_URING && !(s->cfg.flags & DVS_FUSE_NO_DEVICE)) {
		atomic_store(&s->dev_quiet, 1);
		for (uint32_t i = 1; i < s->n_workers; i++)
			if (s->workers[i].started)
				pthread_kill(s->workers[i].thread, cntrfs_wake_signal());
	}
	pthread_mutex_lock(&s->init_lock);
	s->init = *info;
	pthread_cond_broadcast(&s->init_cond);
	pthread_mutex_unlock(&s->init_lock);
}

/* ---- serving ---- */

void cntrfs_serve(struct worker *w, const uint8_t *buf, size_t len, struct ring_ent *ent)
{
	struct dvs_fuse_server *s = w->s;
	struct req r = { .s = s, .w = w, .ent = ent };
	int ret = cntrfs_decode(buf, len, &r);
	atomic_fetch_add_explicit(&w->requests, 1, memory_order_relaxed);
	if (ret == -EIO && len < sizeof(struct fuse_in_header)) {
		cntrfs_log(s, "dropped a %zu-byte request: shorter than a header", len);
		return;
	}
	uint32_t opcode = r.in->opcode;
	if (opcode < DVS_FUSE_MAX_OPCODE)
		atomic_fetch_add_explicit(&w->by_opcode[opcode], 1, memory_order_relaxed);
	const struct opdesc *op = cntrfs_opdesc(opcode);
	int no_reply = op && (op->flags & OP_NO_REPLY);
	atomic_store_explicit(&w->cur_unique, r.in->unique, memory_order_relaxed);
	if (ret == 0 && !atomic_load(&s->initialized) && opcode != FUSE_INIT)
		ret = -EIO;
	if (ret == 0) {
		ret = op->handler(&r);
		if (ret == 0 && !r.replied && !no_reply)
			ret = -EIO; /* a handler that forgot to answer must not hang a caller */
	}
	if (s->cfg.flags & DVS_FUSE_DEBUG)
		cntrfs_log(s, "op %s (%u) unique %llu node %llu -> %d", op ? op->name : "?", opcode,
			   (unsigned long long)r.in->unique, (unsigned long long)r.in->nodeid, ret);
	if (ret < 0 && !r.replied && !no_reply)
		cntrfs_reply_err(&r, ret);
	else if (ent && !r.replied)
		cntrfs_reply_err(&r, ret < 0 ? ret : -EIO); /* a ring entry is only freed by a reply */
	atomic_store_explicit(&w->cur_unique, 0, memory_order_relaxed);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct dvs_fuse_server *s = w->s;
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, cntrfs_wake_signal());
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	int ret = cntrfs_creds_init_thread();
	if (ret < 0)
		cntrfs_log(s, "worker %d: per-thread credentials unavailable: %s", w->index,
			   strerror(-ret));
	while (!atomic_load(&s->stopping)) {
		if (w->index > 0 && atomic_load(&s->dev_quiet))
			break; /* the ring serves; worker 0 keeps reading forgets and interrupts */
		ssize_t n = read(w->fd, w->in, w->in_cap);
		if (n < 0) {
			int err = errno;
			if (err == EINTR || err == EAGAIN || err == ENOENT)
				continue;
			if (err != ENODEV && err != ECONNABORTED)
				cntrfs_log(s, "worker %d: read from /dev/fuse: %s", w->index,
					   strerror(err));
			break; /* ENODEV: unmounted */
		}
		cntrfs_serve(w, w->in, (size_t)n, NULL);
		if (atomic_load(&s->dev_quiet) && n >= (ssize_t)sizeof(struct fuse_in_header)) {
			uint32_t opcode = ((const struct fuse_in_header *)w->in)->opcode;
			if (opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET)
				usleep(CNTRFS_FORGET_BATCH_US); /* later forgets come as one batch */
		}
	}
	pthread_mutex_lock(&s->init_lock);
	atomic_fetch_sub(&s->running, 1);
	pthread_cond_broadcast(&s->init_cond);
	pthread_mutex_unlock(&s->init_lock);
	return NULL;
}

/* ---- fuzzing: a private thread (own credentials and umask) serves posted requests ---- */

static void *fuzz_main(void *arg)
{
	struct dvs_fuse_server *s = arg;
	cntrfs_creds_init_thread();
	pthread_mutex_lock(&s->fuzz_lock);
	for (;;) {
		while (s->fuzz_state != 1 && s->fuzz_state != 3)
			pthread_cond_wait(&s->fuzz_cond, &s->fuzz_lock);
		if (s->fuzz_state == 3)
			break;
		pthread_mutex_unlock(&s->fuzz_lock);
		s->capture_len = 0;
		cntrfs_serve(s->fuzz_worker, s->fuzz_req, s->fuzz_len, NULL);
		cntrfs_creds_root();
		pthread_mutex_lock(&s->fuzz_lock);
		s->fuzz_state = 2;
		pthread_cond_broadcast(&s->fuzz_cond);
	}
	pthread_mutex_unlock(&s->fuzz_lock);
	return NULL;
}

int dvs_fuse_fuzz_request(struct dvs_fuse_server *s, const uint8_t *request, uint32_t len,
			  uint8_t *reply, uint32_t cap, uint32_t *reply_len)
{
	if (!(s->cfg.flags & DVS_FUSE_NO_DEVICE) || !s->fuzz_started)
		return -EINVAL;
	struct worker *w = s->fuzz_worker;
	*reply_len = 0;
	if (len > w->in_cap)
		return -E2BIG;
	pthread_mutex_lock(&s->fuzz_lock);
	/* copy into the worker's buffer: same alignment as requests read from the device */
	memcpy(w->in, request, len);
	s->fuzz_req = w->in;
	s->fuzz_len = len;
	s->capture_len = 0;
	s->fuzz_state = 1;
	pthread_cond_broadcast(&s->fuzz_cond);
	while (s->fuzz_state != 2)
		pthread_cond_wait(&s->fuzz_cond, &s->fuzz_lock);
	s->fuzz_state = 0;
	uint32_t n = s->capture_len < cap ? s->capture_len : cap;
	memcpy(reply, s->capture, n);
	*reply_len = n;
	pthread_mutex_unlock(&s->fuzz_lock);
	return len < sizeof(struct fuse_in_header) ? -EIO : 0;
}

/* ---- life cycle ---- */

static uint32_t read_overflow(const char *path)
{
	char buf[32];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 65534;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 65534;
	buf[n] = '\0';
	return (uint32_t)strtoul(buf, NULL, 10);
}

static int copy_map(struct idmap *dst, const struct dvs_fuse_id_range *src, uint32_t n)
{
	if (n > sizeof(dst->r) / sizeof(dst->r[0]))
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		if (src[i].count == 0 || src[i].inside + (uint64_t)src[i].count > 1ull << 32 ||
		    src[i].outside + (uint64_t)src[i].count > 1ull << 32)
			return -EINVAL;
		dst->r[i] = src[i];
	}
	dst->n = n;
	return 0;
}

static int worker_buffers(struct worker *w, uint32_t max_write)
{
	size_t in_total = (size_t)max_write + 3 * CNTRFS_PAGE;
	w->in_base = aligned_alloc(CNTRFS_PAGE, in_total);
	w->out_cap = max_write < CNTRFS_XATTR_MAX ? CNTRFS_XATTR_MAX : max_write;
	w->out = aligned_alloc(CNTRFS_PAGE, w->out_cap);
	if (!w->in_base || !w->out)
		return -ENOMEM;
	w->in = w->in_base + CNTRFS_PAGE - WRITE_PAYLOAD_OFFSET;
	w->in_cap = in_total - (CNTRFS_PAGE - WRITE_PAYLOAD_OFFSET);
	return 0;
}

int dvs_fuse_new(const struct dvs_fuse_config *config, struct dvs_fuse_server **out)
{
	if (!config || !config->source || !out)
		return -EINVAL;
	cntrfs_wake_signal();
	struct dvs_fuse_server *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	int ret = -ENOMEM;
	s->cfg = *config;
	s->root_fd = -1;
	s->dev_fd = -1;
	pthread_mutex_init(&s->init_lock, NULL);
	pthread_cond_init(&s->init_cond, NULL);
	pthread_cond_init(&s->ring_cond, NULL);
	pthread_mutex_init(&s->log_lock, NULL);
	pthread_mutex_init(&s->fuzz_lock, NULL);
	pthread_cond_init(&s->fuzz_cond, NULL);
	s->source = strdup(config->source);
	s->cfg.source = s->source;
	s->cfg.uid_map = NULL;
	s->cfg.gid_map = NULL;
	if (!s->source)
		goto fail;
	if ((ret = copy_map(&s->uid_map, config->uid_map, config->n_uid_map)) < 0 ||
	    (ret = copy_map(&s->gid_map, config->gid_map, config->n_gid_map)) < 0)
		goto fail;
	s->overflow_uid = read_overflow("/proc/sys/kernel/overflowuid");
	s->overflow_gid = read_overflow("/proc/sys/kernel/overflowgid");
	uint32_t max_pages = config->max_pages ? config->max_pages : CNTRFS_DEFAULT_MAX_PAGES;
	if (max_pages < 1 || max_pages > 256) {
		ret = -EINVAL;
		goto fail;
	}
	s->cfg.max_pages = max_pages;
	s->max_pages = max_pages;
	s->max_write = max_pages * CNTRFS_PAGE;
	s->entry_sec = config->entry_timeout_ns / 1000000000ull;
	s->entry_nsec = (uint32_t)(config->entry_timeout_ns % 1000000000ull);
	s->attr_sec = config->attr_timeout_ns / 1000000000ull;
	s->attr_nsec = (uint32_t)(config->attr_timeout_ns % 1000000000ull);
	struct rlimit rl;
	uint32_t budget = config->fd_budget;
	if (!budget) {
		budget = 1024;
		if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
			budget = (uint32_t)(rl.rlim_cur / 2);
	}
	s->fd_budget = budget < 16 ? 16 : budget;

	s->root_fd = open(s->source, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (s->root_fd < 0) {
		ret = -errno;
		goto fail;
	}
	if ((ret = cntrfs_itab_init(s)) < 0 || (ret = cntrfs_ftab_init(s)) < 0 ||
	    (ret = cntrfs_anchor_root(s)) < 0)
		goto fail;

	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	uint32_t n = config->n_workers ? config->n_workers : (uint32_t)(cpus > 0 ? cpus * 2 : 2);
	if (n < 1)
		n = 1;
	if (n > 64)
		n = 64;
	if (config->flags & DVS_FUSE_NO_DEVICE)
		n = 1;
	s->n_workers = n;
	s->workers = calloc(n, sizeof(*s->workers));
	if (!s->workers) {
		ret = -ENOMEM;
		goto fail;
	}
	for (uint32_t i = 0; i < n; i++) {
		struct worker *w = &s->workers[i];
		w->s = s;
		w->index = (int)i;
		w->fd = -1;
		if ((ret = worker_buffers(w, s->max_write)) < 0)
			goto fail;
	}
	if (config->flags & DVS_FUSE_NO_DEVICE) {
		s->fuzz_worker = &s->workers[0];
		s->capture_cap = (uint32_t)(s->fuzz_worker->out_cap + 4096);
		s->capture = malloc(s->capture_cap);
		if (!s->capture) {
			ret = -ENOMEM;
			goto fail;
		}
	} else {
		s->dev_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
		if (s->dev_fd < 0) {
			ret = -errno;
			goto fail;
		}
		s->workers[0].fd = s->dev_fd;
	}
	*out = s;
	return 0;
fail:
	dvs_fuse_free(s);
	return ret;
}

int dvs_fuse_dev_fd(struct dvs_fuse_server *s)
{
	return s->dev_fd;
}

int dvs_fuse_start(struct dvs_fuse_server *s)
{
	if (s->cfg.flags & DVS_FUSE_NO_DEVICE) {
		if (s->fuzz_started)
			return -EALREADY;
		int err = pthread_create(&s->fuzz_thread, NULL, fuzz_main, s);
		if (err)
			return -err;
		s->fuzz_started = 1;
		return 0;
	}
	if (s->workers[0].started)
		return -EALREADY;
	/* clones first: FUSE_DEV_IOC_CLONE needs the master bound by the mount */
	for (uint32_t i = 1; i < s->n_workers; i++) {
		struct worker *w = &s->workers[i];
		int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		uint32_t master = (uint32_t)s->dev_fd;
		if (ioctl(fd, FUSE_DEV_IOC_CLONE_DVS, &master) < 0) {
			int err = errno;
			close(fd);
			cntrfs_log(s, "FUSE_DEV_IOC_CLONE failed (%s): is the filesystem mounted?",
				   strerror(err));
			return -err;
		}
		w->fd = fd;
	}
	sigset_t block, old;
	sigfillset(&block);
	pthread_sigmask(SIG_BLOCK, &block, &old); /* workers start with signals blocked */
	if (s->cfg.flags & DVS_FUSE_WANT_URING)
		cntrfs_rings_setup(s); /* before INIT can be answered; failures are logged */
	int ret = 0;
	for (uint32_t i = 0; i < s->n_workers; i++) {
		struct worker *w = &s->workers[i];
		atomic_fetch_add(&s->running, 1);
		int err = pthread_create(&w->thread, NULL, worker_main, w);
		if (err) {
			atomic_fetch_sub(&s->running, 1);
			ret = -err;
			break;
		}
		w->started = 1;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return ret;
}

static int wait_cond(struct dvs_fuse_server *s, uint32_t timeout_ms, int (*ready)(struct dvs_fuse_server *))
{
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	int ret = 0;
	pthread_mutex_lock(&s->init_lock);
	while (!ready(s)) {
		if (pthread_cond_timedwait(&s->init_cond, &s->init_lock, &deadline) == ETIMEDOUT) {
			ret = ready(s) ? 0 : -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&s->init_lock);
	return ret;
}

static int init_ready(struct dvs_fuse_server *s)
{
	return s->init.done || s->init.error || atomic_load(&s->running) == 0;
}

static int exit_ready(struct dvs_fuse_server *s)
{
	return atomic_load(&s->running) == 0;
}

int dvs_fuse_wait_init(struct dvs_fuse_server *s, uint32_t timeout_ms,
		       struct dvs_fuse_negotiated *info)
{
	int ret = wait_cond(s, timeout_ms, init_ready);
	pthread_mutex_lock(&s->init_lock);
	if (info)
		*info = s->init;
	if (ret == 0 && s->init.error)
		ret = s->init.error;
	else if (ret == 0 && !s->init.done)
		ret = -ENOTCONN; /* workers ended before INIT */
	pthread_mutex_unlock(&s->init_lock);
	return ret;
}

int dvs_fuse_wait_exit(struct dvs_fuse_server *s, uint32_t timeout_ms)
{
	return wait_cond(s, timeout_ms, exit_ready);
}

void cntrfs_add_worker_stats(struct worker *w, struct dvs_fuse_stats *st)
{
	st->requests += atomic_load_explicit(&w->requests, memory_order_relaxed);
	st->errors += atomic_load_explicit(&w->errors, memory_order_relaxed);
	st->bytes_read += atomic_load_explicit(&w->bytes_read, memory_order_relaxed);
	st->bytes_written += atomic_load_explicit(&w->bytes_written, memory_order_relaxed);
	for (int op = 0; op < DVS_FUSE_MAX_OPCODE; op++)
		st->by_opcode[op] += atomic_load_explicit(&w->by_opcode[op], memory_order_relaxed);
}

int dvs_fuse_stats(struct dvs_fuse_server *s, struct dvs_fuse_stats *st)
{
	memset(st, 0, sizeof(*st));
	cntrfs_ring_stats(s, st);
	for (uint32_t i = 0; i < s->n_workers; i++) {
		struct worker *w = &s->workers[i];
		cntrfs_add_worker_stats(w, st);
	}
	st->inodes = atomic_load(&s->n_live);
	st->open_files = atomic_load(&s->open_files);
	st->path_fds = atomic_load(&s->n_path_fds);
	st->fd_evictions = atomic_load(&s->fd_evictions);
	st->handle_opens = atomic_load(&s->handle_opens);
	st->passthrough_opens = atomic_load(&s->passthrough_opens);
	st->backing_files = atomic_load(&s->backing_files);
	st->interrupts = atomic_load(&s->interrupts);
	st->blocked_locks = atomic_load(&s->n_blocking);
	st->workers = atomic_load(&s->running);
	return 0;
}

int dvs_fuse_stop(struct dvs_fuse_server *s)
{
	if (!s)
		return -EINVAL;
	atomic_store(&s->stopping, 1);
	cntrfs_blocking_stop_all(s);
	cntrfs_rings_stop(s); /* rings first: their commands hold the device open */
	if (s->workers) {
		for (uint32_t i = 0; i < s->n_workers; i++) {
			struct worker *w = &s->workers[i];
			if (!w->started)
				continue;
			/* a signal may land just before read() blocks: repeat until it ends */
			for (int tries = 0; tries < 400; tries++) {
				if (pthread_tryjoin_np(w->thread, NULL) == 0) {
					w->started = 0;
					break;
				}
				pthread_kill(w->thread, cntrfs_wake_signal());
				usleep(tries < 20 ? 1000 : 10000);
			}
			if (w->started) {
				cntrfs_log(s, "worker %d did not stop", w->index);
				continue;
			}
		}
		for (uint32_t i = 0; i < s->n_workers; i++) {
			struct worker *w = &s->workers[i];
			if (w->fd >= 0 && !w->started) {
				close(w->fd);
				w->fd = -1;
			}
		}
		s->dev_fd = -1;
	}
	if (s->fuzz_started) {
		pthread_mutex_lock(&s->fuzz_lock);
		s->fuzz_state = 3;
		pthread_cond_broadcast(&s->fuzz_cond);
		pthread_mutex_unlock(&s->fuzz_lock);
		pthread_join(s->fuzz_thread, NULL);
		s->fuzz_started = 0;
	}
	return 0;
}

void dvs_fuse_free(struct dvs_fuse_server *s)
{
	if (!s)
		return;
	dvs_fuse_stop(s);
	if (s->workers) {
		for (uint32_t i = 0; i < s->n_workers; i++) {
			if (s->workers[i].started)
				return; /* a stuck worker still uses the tables: leak rather than crash */
			free(s->workers[i].in_base);
			free(s->workers[i].out);
		}
		free(s->workers);
	}
	if (s->dev_fd >= 0)
		close(s->dev_fd);
	cntrfs_rings_free(s);
	cntrfs_ftab_free(s);
	cntrfs_itab_free(s);
	if (s->root_fd >= 0)
		close(s->root_fd);
	free(s->capture);
	free(s->source);
	free(s);
}
