/*
 * uring.c -- FUSE over io_uring: the ring transport of CntrFS (Linux 6.14+).
 *
 * Kernel semantics relied on (fs/fuse/dev_uring.c, include/uapi/linux/fuse.h 7.42+):
 * - The kernel offers FUSE_OVER_IO_URING in FUSE_INIT only while the fuse module parameter
 *   enable_uring is Y. Once a server grants it, *new requests wait* until every queue of
 *   the connection has an entry ("ring ready"), or until a registration fails -- the
 *   kernel then clears the connection's io_uring flag and falls back to /dev/fuse. So the
 *   flag is granted only when this process could already set up its rings, and every
 *   entry is registered right after the INIT reply (earlier, REGISTER returns EAGAIN).
 * - A connection has one queue per *possible* CPU; a request goes to the queue of the CPU
 *   its caller runs on. A ring entry is an IORING_OP_URING_CMD on the /dev/fuse descriptor
 *   in a ring set up with SQE128: cmd_op REGISTER carries an iovec pair (a 288-byte header
 *   buffer and a payload buffer of at least max(8 KiB, max_write, max_pages pages)) and the
 *   queue id in the SQE's command area. The command completes (CQE res 0) when a request
 *   has been copied into the entry: fuse_in_header in header.in_out, the opcode's fixed
 *   argument in header.op_in, everything else (names, data, extensions) in the payload,
 *   ring_ent_in_out.payload_sz its length and .commit_id the request's unique.
 *   fuse_in_header.len counts all of it, so the fixed argument's size is
 *   len - 40 - payload_sz. The reply goes the same way: fuse_out_header in header.in_out,
 *   all reply arguments in the payload, payload_sz their length; cmd_op COMMIT_AND_FETCH
 *   with the commit_id hands it over and re-arms the entry in one step.
 * - The request is copied into the entry by task work of the thread that submitted the
 *   command: each ring belongs to one thread (SINGLE_ISSUER + DEFER_TASKRUN), which runs
 *   that work while it waits in io_uring_enter -- one syscall per request served.
 * - FORGET, BATCH_FORGET and INTERRUPT are still queued on /dev/fuse (as are INIT and any
 *   request queued before the ring was ready), so the /dev/fuse workers keep running.
 * - Teardown: unmount or abort completes waiting entries with -ENOTCONN; closing a ring
 *   cancels its waiting commands. Requests an entry holds end with ECONNABORTED when the
 *   connection is aborted, i.e. when the last /dev/fuse reference is gone -- a killed
 *   server never leaves a caller hanging.
 *
 * Why not the engine of csrc/uring/: that ring is built for block I/O (a fixed allow-list
 * of READ/WRITE/FSYNC opcodes, 64-byte SQEs, its own request format); FUSE needs SQE128,
 * URING_CMD with an 80-byte command, and completions that *are* incoming requests. So
 * this file keeps a small ring per thread, restricted the same way (allow-list: URING_CMD
 * and READ, fixed files only: /dev/fuse and the thread's wake-up eventfd).
 *
 * A request that must wait (SETLKW) keeps its entry "parked" while a lock thread waits; the
 * answer comes back through the ring thread's mailbox (the eventfd read completes), and a
 * fresh entry is registered so the queue does not run dry meanwhile.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fuse/internal.h"

#define RING_SQ_ENTRIES 64
#define RING_MAX_ENTS 64 /* per thread: base entries plus replacements for parked ones */
#define RING_ASSEMBLY_ROOM CNTRFS_PAGE /* in front of the payload: header + fixed argument */
#define TAG_WAKE 1ull			/* user_data of the eventfd read */
#define FIXED_DEV 0
#define FIXED_WAKE 1

enum ent_state {
	ENT_NEW,	/* allocated, REGISTER not submitted yet */
	ENT_WAITING,	/* REGISTER/COMMIT_AND_FETCH in flight: waits for a request */
	ENT_SERVING,	/* a request is in the buffers */
	ENT_PARKED,	/* its request is answered later by another thread */
	ENT_ANSWERED,	/* reply in the buffers, commit not submitted yet */
	ENT_DEAD,	/* the kernel dropped it (teardown, refused registration) */
};

struct ring_ent {
	struct ring_thread *rt;
	uint16_t qid;
	uint8_t state;
	uint8_t registering; /* the last command was REGISTER */
	struct dvs_fuse_uring_req_header *hdr;
	uint8_t *payload_base;
	uint8_t *payload; /* page-aligned, RING_ASSEMBLY_ROOM bytes after payload_base */
	size_t payload_cap;
	uint64_t commit_id;
	struct iovec iov[2];
	struct ring_ent *mail_next;
};

struct ring_thread {
	struct dvs_fuse_server *s;
	struct worker w;
	int index;
	int cpu; /* pinned to this CPU, -1: not pinned */
	uint16_t qids[64];
	uint32_t n_qids;
	struct io_uring ring;
	int ring_ok;
	int efd;
	uint64_t efd_value;
	pthread_t thread;
	int started;
	_Atomic int running;
	struct ring_ent *ents[RING_MAX_ENTS];
	uint32_t n_ents, live;
	pthread_mutex_t mail_lock;
	struct ring_ent *mail;
	_Atomic uint64_t commit_errors;
	int setup_error; /* -errno of the ring set-up, reported to cntrfs_rings_setup */
};

int cntrfs_possible_cpus(void)
{
	/* "0-1", "0-3,8-11": the kernel sizes its queue array by num_possible_cpus() */
	char buf[256];
	int fd = open("/sys/devices/system/cpu/possible", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -EIO;
	buf[n] = '\0';
	int count = 0;
	for (char *p = buf; *p && *p != '\n';) {
		char *end;
		long a = strtol(p, &end, 10), b = a;
		if (end == p)
			return -EIO;
		if (*end == '-') {
			p = end + 1;
			b = strtol(p, &end, 10);
			if (end == p || b < a)
				return -EIO;
		}
		count += (int)(b - a + 1);
		p = *end == ',' ? end + 1 : end;
	}
	return count > 0 && count <= 4096 ? count : -EIO;
}

/* ---- entries ---- */

static struct ring_ent *ent_new(struct ring_thread *rt, uint16_t qid)
{
	struct dvs_fuse_server *s = rt->s;
	if (rt->n_ents >= RING_MAX_ENTS)
		return NULL;
	/* the kernel refuses payload buffers smaller than it may need; READ replies are
	 * produced in place, so never smaller than the workers' reply buffer either */
	size_t need = s->max_write > FUSE_MIN_READ_BUFFER ? s->max_write : FUSE_MIN_READ_BUFFER;
	if ((size_t)s->max_pages * CNTRFS_PAGE > need)
		need = (size_t)s->max_pages * CNTRFS_PAGE;
	if (rt->w.out_cap > need)
		need = rt->w.out_cap;
	need = (need + CNTRFS_PAGE - 1) & ~((size_t)CNTRFS_PAGE - 1);
	struct ring_ent *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->hdr = aligned_alloc(64, (sizeof(*e->hdr) + 63) & ~(size_t)63);
	e->payload_base = aligned_alloc(CNTRFS_PAGE, RING_ASSEMBLY_ROOM + need);
	if (!e->hdr || !e->payload_base) {
		free(e->hdr);
		free(e->payload_base);
		free(e);
		return NULL;
	}
	memset(e->hdr, 0, sizeof(*e->hdr));
	e->rt = rt;
	e->qid = qid;
	e->state = ENT_NEW;
	e->payload = e->payload_base + RING_ASSEMBLY_ROOM;
	e->payload_cap = need;
	e->iov[0].iov_base = e->hdr;
	e->iov[0].iov_len = sizeof(*e->hdr);
	e->iov[1].iov_base = e->payload;
	e->iov[1].iov_len = need;
	rt->ents[rt->n_ents++] = e;
	return e;
}

static struct io_uring_sqe *sqe_get(struct ring_thread *rt)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&rt->ring);
	if (!sqe) {
		io_uring_submit(&rt->ring); /* the SQ is full: hand it over first */
		sqe = io_uring_get_sqe(&rt->ring);
	}
	if (sqe)
		memset(sqe, 0, 128); /* SQE128: the command area is the second half */
	return sqe;
}

static int ent_submit(struct ring_thread *rt, struct ring_ent *e, uint32_t cmd_op)
{
	struct io_uring_sqe *sqe = sqe_get(rt);
	if (!sqe)
		return -EBUSY;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = FIXED_DEV;
	sqe->cmd_op = cmd_op;
	sqe->user_data = (uint64_t)(uintptr_t)e;
	struct dvs_fuse_uring_cmd_req *cmd = (void *)sqe->cmd;
	cmd->qid = e->qid;
	if (cmd_op == DVS_FUSE_IO_URING_CMD_REGISTER) {
		sqe->addr = (uint64_t)(uintptr_t)e->iov;
		sqe->len = 2;
		if (rt->s->cfg.flags & DVS_FUSE_TEST_URING_BAD_QID)
			cmd->qid = (uint16_t)rt->s->ring_queues; /* no such queue: EINVAL */
	} else {
		cmd->commit_id = e->commit_id;
	}
	e->registering = cmd_op == DVS_FUSE_IO_URING_CMD_REGISTER;
	e->state = ENT_WAITING;
	return 0;
}

static int arm_wake(struct ring_thread *rt)
{
	struct io_uring_sqe *sqe = sqe_get(rt);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, FIXED_WAKE, &rt->efd_value, sizeof(rt->efd_value), 0);
	sqe->flags |= IOSQE_FIXED_FILE;
	sqe->user_data = TAG_WAKE;
	return 0;
}

static void wake(struct ring_thread *rt)
{
	uint64_t one = 1;
	if (write(rt->efd, &one, sizeof(one)) < 0) {
		/* the counter is saturated: the thread is awake anyway */
	}
}

/* The kernel's reply layout: out header in the header buffer, arguments in the payload. */
int cntrfs_ring_emit(struct ring_ent *e, const struct iovec *iov, int n)
{
	if (n < 1 || iov[0].iov_len != sizeof(struct fuse_out_header))
		return -EINVAL;
	size_t off = 0;
	for (int i = 1; i < n; i++) {
		if (iov[i].iov_len > e->payload_cap - off)
			return -EIO; /* cannot happen: replies are bounded by max_write/xattr max */
		/* a READ reply was produced in place; anything else is copied (memmove: a
		 * handler may answer with bytes of its own request) */
		if (iov[i].iov_base != e->payload + off)
			memmove(e->payload + off, iov[i].iov_base, iov[i].iov_len);
		off += iov[i].iov_len;
	}
	struct fuse_out_header h;
	memcpy(&h, iov[0].iov_base, sizeof(h));
	h.len = (uint32_t)(sizeof(h) + off);
	memcpy(e->hdr->in_out, &h, sizeof(h));
	e->hdr->ring_ent_in_out.payload_sz = (uint32_t)off;
	e->state = ENT_ANSWERED;
	return 0;
}

void cntrfs_ring_park(struct ring_ent *e)
{
	e->state = ENT_PARKED;
}

void cntrfs_ring_late_reply(struct ring_ent *e, uint64_t unique, int error)
{
	struct ring_thread *rt = e->rt;
	struct fuse_out_header h = { .len = sizeof(h), .error = error, .unique = unique };
	memcpy(e->hdr->in_out, &h, sizeof(h));
	e->hdr->ring_ent_in_out.payload_sz = 0;
	pthread_mutex_lock(&rt->mail_lock);
	e->mail_next = rt->mail;
	rt->mail = e;
	pthread_mutex_unlock(&rt->mail_lock);
	wake(rt);
}

/* A request arrived in e: rebuild the /dev/fuse layout in front of the payload (so WRITE
 * data stays page-aligned where the kernel put it) and serve it. */
static void ent_serve(struct ring_thread *rt, struct ring_ent *e)
{
	struct dvs_fuse_server *s = rt->s;
	struct fuse_in_header ih;
	memcpy(&ih, e->hdr->in_out, sizeof(ih));
	uint32_t psz = e->hdr->ring_ent_in_out.payload_sz;
	e->commit_id = e->hdr->ring_ent_in_out.commit_id;
	e->state = ENT_SERVING;
	if (psz > e->payload_cap || ih.len < sizeof(ih) + (uint64_t)psz ||
	    ih.len - sizeof(ih) - psz > FUSE_URING_OP_IN_OUT_SZ) {
		cntrfs_log(s, "ring: malformed request (len %u, payload %u): answered EIO", ih.len,
			   psz);
		struct fuse_out_header h = { .len = sizeof(h), .error = -EIO,
					     .unique = e->commit_id };
		struct iovec iov = { &h, sizeof(h) };
		cntrfs_ring_emit(e, &iov, 1);
		return;
	}
	uint32_t fixed = ih.len - (uint32_t)sizeof(ih) - psz;
	uint8_t *start = e->payload - fixed - sizeof(ih);
	memcpy(start, &ih, sizeof(ih));
	memcpy(start + sizeof(ih), e->hdr->op_in, fixed);
	rt->w.reply_direct = e->payload;
	cntrfs_serve(&rt->w, start, ih.len, e);
	rt->w.reply_direct = NULL;
}

/* ---- the thread ---- */

static int ring_init(struct ring_thread *rt)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
		  IORING_SETUP_R_DISABLED;
	int ret = io_uring_queue_init_params(RING_SQ_ENTRIES, &rt->ring, &p);
	if (ret < 0)
		return ret;
	rt->ring_ok = 1;
	int files[2] = { rt->s->dev_fd, rt->efd };
	if ((ret = io_uring_register_files(&rt->ring, files, 2)) < 0)
		return ret;
	struct io_uring_restriction res[4];
	memset(res, 0, sizeof(res));
	res[0].opcode = IORING_RESTRICTION_SQE_OP;
	res[0].sqe_op = IORING_OP_URING_CMD;
	res[1].opcode = IORING_RESTRICTION_SQE_OP;
	res[1].sqe_op = IORING_OP_READ;
	res[2].opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED;
	res[2].sqe_flags = IOSQE_FIXED_FILE;
	res[3].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
	res[3].sqe_flags = IOSQE_FIXED_FILE;
	/* Debian's liburing 2.3 declares but does not export the helpers for these two */
	if ((ret = io_uring_register(rt->ring.ring_fd, IORING_REGISTER_RESTRICTIONS, res, 4)) < 0)
		return ret;
	/* the enabling thread becomes the ring's only submitter */
	return io_uring_register(rt->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
}

static void set_up_done(struct ring_thread *rt, int error)
{
	struct dvs_fuse_server *s = rt->s;
	pthread_mutex_lock(&s->init_lock);
	rt->setup_error = error;
	s->rings_set_up++;
	if (error)
		s->rings_failed++;
	pthread_cond_broadcast(&s->ring_cond);
	pthread_mutex_unlock(&s->init_lock);
}

static int wait_go(struct ring_thread *rt)
{
	struct dvs_fuse_server *s = rt->s;
	pthread_mutex_lock(&s->init_lock);
	while (s->ring_go == 0 && !atomic_load(&s->stopping))
		pthread_cond_wait(&s->ring_cond, &s->init_lock);
	int go = atomic_load(&s->stopping) ? -1 : s->ring_go;
	pthread_mutex_unlock(&s->init_lock);
	return go;
}

/* Registration outcome of one thread; the last one publishes the INIT result. */
static void registered(struct ring_thread *rt, int error, uint32_t entries)
{
	struct dvs_fuse_server *s = rt->s;
	pthread_mutex_lock(&s->init_lock);
	s->rings_registered++;
	if (error) {
		if (s->rings_reg_failed++ == 0)
			cntrfs_log(s, "ring: registering entries failed (%s): the kernel falls back to "
				      "/dev/fuse", strerror(-error));
	}
	s->pending_init.ring_entries += entries;
	int last = s->rings_registered == s->n_rings;
	struct dvs_fuse_negotiated info = s->pending_init;
	pthread_mutex_unlock(&s->init_lock);
	if (!last)
		return;
	info.ring_queues = s->ring_queues;
	info.ring_threads = s->n_rings;
	if (s->rings_reg_failed == 0) {
		info.transport = DVS_FUSE_TRANSPORT_URING;
		cntrfs_log(s, "INIT: requests travel through io_uring: %u queues, %u entries, %u "
			      "threads",
			   s->ring_queues, info.ring_entries, s->n_rings);
	}
	cntrfs_publish_init(s, &info);
}

static void pin(struct ring_thread *rt)
{
	if (rt->cpu < 0)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(rt->cpu, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0)
		rt->cpu = -1; /* the CPU is not ours to use: run anywhere */
}

static void commit(struct ring_thread *rt, struct ring_ent *e)
{
	if (ent_submit(rt, e, DVS_FUSE_IO_URING_CMD_COMMIT_AND_FETCH) < 0) {
		/* no SQE even after submitting: the entry is lost (should not happen: the SQ
		 * has room for every entry this thread owns) */
		e->state = ENT_DEAD;
		rt->live--;
	}
}

static void after_serve(struct ring_thread *rt, struct ring_ent *e)
{
	if (e->state == ENT_ANSWERED) {
		commit(rt, e);
	} else if (e->state == ENT_PARKED) {
		/* keep the queue served while this entry waits for its answer */
		struct ring_ent *extra = ent_new(rt, e->qid);
		if (extra && ent_submit(rt, extra, DVS_FUSE_IO_URING_CMD_REGISTER) == 0)
			rt->live++;
	}
}

static void drain_mail(struct ring_thread *rt)
{
	pthread_mutex_lock(&rt->mail_lock);
	struct ring_ent *list = rt->mail;
	rt->mail = NULL;
	pthread_mutex_unlock(&rt->mail_lock);
	for (struct ring_ent *e = list, *next; e; e = next) {
		next = e->mail_next;
		if (e->state == ENT_PARKED)
			commit(rt, e);
	}
}

/* Handle every completion in the CQ; *reg_error gets the first refused registration. */
static void reap(struct ring_thread *rt, int *reg_error)
{
	struct dvs_fuse_server *s = rt->s;
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
	io_uring_for_each_cqe(&rt->ring, head, cqe)
	{
		n++;
		if (cqe->user_data == TAG_WAKE) {
			drain_mail(rt);
			if (!atomic_load(&s->stopping))
				arm_wake(rt);
			continue;
		}
		struct ring_ent *e = (void *)(uintptr_t)cqe->user_data;
		if (cqe->res < 0) {
			/* ENOTCONN/ECONNABORTED: torn down (unmount, abort); a refused REGISTER;
			 * ENOENT: the committed request was gone. The entry is not re-armed. */
			if (e->registering && reg_error && !*reg_error)
				*reg_error = cqe->res;
			else if (cqe->res != -ENOTCONN && cqe->res != -ECONNABORTED &&
				 !atomic_load(&s->stopping)) {
				atomic_fetch_add(&rt->commit_errors, 1);
				cntrfs_log(s, "ring thread %d: %s on queue %u: %s", rt->index,
					   e->registering ? "register" : "commit", e->qid,
					   strerror(-cqe->res));
			}
			e->state = ENT_DEAD;
			rt->live--;
			continue;
		}
		ent_serve(rt, e);
		after_serve(rt, e);
	}
	io_uring_cq_advance(&rt->ring, n);
}

/* Register this thread's entries. A refused REGISTER completes at once (URING_CMD is
 * issued inline), so the outcome is known when the submission returns. */
static int register_all(struct ring_thread *rt)
{
	struct dvs_fuse_server *s = rt->s;
	uint32_t depth = s->cfg.ring_depth ? s->cfg.ring_depth : 1;
	int error = 0;
	for (uint32_t i = 0; i < rt->n_qids && !error; i++)
		for (uint32_t d = 0; d < depth; d++) {
			struct ring_ent *e = ent_new(rt, rt->qids[i]);
			if (!e) {
				error = -ENOMEM;
				break;
			}
			if ((error = ent_submit(rt, e, DVS_FUSE_IO_URING_CMD_REGISTER)) < 0)
				break;
			rt->live++;
		}
	int ret = io_uring_submit(&rt->ring);
	if (ret < 0 && !error)
		error = ret;
	int refused = 0;
	reap(rt, &refused);
	return error ? error : refused;
}

static void *ring_main(void *arg)
{
	struct ring_thread *rt = arg;
	struct dvs_fuse_server *s = rt->s;
	int ret = cntrfs_creds_init_thread();
	if (ret < 0)
		cntrfs_log(s, "ring thread %d: per-thread credentials unavailable: %s", rt->index,
			   strerror(-ret));
	ret = ring_init(rt);
	set_up_done(rt, ret);
	if (ret < 0 || wait_go(rt) < 0)
		goto out;
	pin(rt);
	int reg_error = register_all(rt);
	if (rt->live > 0 && arm_wake(rt) < 0 && !reg_error)
		reg_error = -EBUSY;
	registered(rt, reg_error, rt->live);
	while (!atomic_load(&s->stopping) && rt->live > 0) {
		ret = io_uring_submit_and_wait(&rt->ring, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			cntrfs_log(s, "ring thread %d: io_uring_enter: %s", rt->index, strerror(-ret));
			break;
		}
		reap(rt, NULL);
	}
out:
	if (rt->ring_ok) {
		io_uring_queue_exit(&rt->ring); /* cancels the entries still waiting */
		rt->ring_ok = 0;
	}
	pthread_mutex_lock(&s->init_lock);
	atomic_store(&rt->running, 0);
	atomic_fetch_sub(&s->running, 1);
	pthread_cond_broadcast(&s->init_cond);
	pthread_mutex_unlock(&s->init_lock);
	return NULL;
}

/* ---- life cycle ---- */

static void ring_thread_free(struct ring_thread *rt)
{
	if (!rt)
		return;
	for (uint32_t i = 0; i < rt->n_ents; i++) {
		free(rt->ents[i]->hdr);
		free(rt->ents[i]->payload_base);
		free(rt->ents[i]);
	}
	if (rt->efd >= 0)
		close(rt->efd);
	free(rt->w.out);
	pthread_mutex_destroy(&rt->mail_lock);
	free(rt);
}

int cntrfs_rings_setup(struct dvs_fuse_server *s)
{
	int queues = cntrfs_possible_cpus();
	if (queues < 0) {
		cntrfs_log(s, "ring: cannot count the possible CPUs (%s): FUSE over io_uring off",
			   strerror(-queues));
		return queues;
	}
	uint32_t n = s->cfg.ring_threads ? s->cfg.ring_threads : s->n_workers;
	if (n < 1)
		n = 1;
	if (n > 64)
		n = 64;
	if ((uint32_t)queues > n * 64u) {
		cntrfs_log(s, "ring: %d queues are too many for %u threads: FUSE over io_uring off",
			   queues, n);
		return -E2BIG;
	}
	s->ring_queues = (uint32_t)queues;
	s->rings = calloc(n, sizeof(*s->rings));
	if (!s->rings)
		return -ENOMEM;
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	int ret = 0;
	uint32_t started = 0;
	for (uint32_t t = 0; t < n; t++) {
		struct ring_thread *rt = calloc(1, sizeof(*rt));
		if (!rt) {
			ret = -ENOMEM;
			break;
		}
		s->rings[t] = rt;
		rt->s = s;
		rt->index = (int)t;
		rt->efd = eventfd(0, EFD_CLOEXEC);
		pthread_mutex_init(&rt->mail_lock, NULL);
		rt->w.s = s;
		rt->w.rt = rt;
		rt->w.fd = s->dev_fd; /* backing-file ioctls go to the connection's device */
		rt->w.index = 1000 + (int)t;
		rt->w.out_cap = s->max_write < CNTRFS_XATTR_MAX ? CNTRFS_XATTR_MAX : s->max_write;
		rt->w.out = aligned_alloc(CNTRFS_PAGE, rt->w.out_cap);
		if (rt->efd < 0 || !rt->w.out) {
			ret = rt->efd < 0 ? -errno : -ENOMEM;
			break;
		}
		/* queues: thread t serves queue t % Q when threads outnumber queues (and runs on
		 * that CPU), otherwise every queue q with q % n == t */
		rt->cpu = -1;
		if (n >= (uint32_t)queues) {
			rt->qids[rt->n_qids++] = (uint16_t)(t % (uint32_t)queues);
			if (!(s->cfg.flags & DVS_FUSE_URING_NO_PIN) && (long)(t % (uint32_t)queues) < online)
				rt->cpu = (int)(t % (uint32_t)queues);
		} else {
			for (uint32_t q = t; q < (uint32_t)queues; q += n)
				rt->qids[rt->n_qids++] = (uint16_t)q;
		}
		atomic_store(&rt->running, 1);
		atomic_fetch_add(&s->running, 1);
		int err = pthread_create(&rt->thread, NULL, ring_main, rt);
		if (err) {
			atomic_store(&rt->running, 0);
			atomic_fetch_sub(&s->running, 1);
			ret = -err;
			break;
		}
		rt->started = 1;
		started++;
		s->n_rings = t + 1;
	}
	/* wait for every thread's ring set-up */
	pthread_mutex_lock(&s->init_lock);
	while (s->rings_set_up < started)
		pthread_cond_wait(&s->ring_cond, &s->init_lock);
	int failed = s->rings_failed;
	int first_error = 0;
	for (uint32_t t = 0; t < started; t++)
		if (s->rings[t]->setup_error && !first_error)
			first_error = s->rings[t]->setup_error;
	pthread_mutex_unlock(&s->init_lock);
	if (ret == 0 && failed)
		ret = first_error;
	if (ret < 0) {
		cntrfs_log(s, "ring: setting up io_uring failed (%s): requests are read from "
			      "/dev/fuse",
			   strerror(-ret));
		cntrfs_rings_go(s, -1);
		cntrfs_rings_stop(s);
		cntrfs_rings_free(s);
		return ret;
	}
	return 0;
}

void cntrfs_rings_go(struct dvs_fuse_server *s, int go)
{
	pthread_mutex_lock(&s->init_lock);
	s->ring_go = go;
	pthread_cond_broadcast(&s->ring_cond);
	pthread_mutex_unlock(&s->init_lock);
}

void cntrfs_rings_stop(struct dvs_fuse_server *s)
{
	if (!s->rings)
		return;
	pthread_mutex_lock(&s->init_lock);
	pthread_cond_broadcast(&s->ring_cond); /* threads still waiting for go see stopping */
	pthread_mutex_unlock(&s->init_lock);
	for (uint32_t i = 0; i < s->n_rings; i++) {
		struct ring_thread *rt = s->rings[i];
		if (!rt || !rt->started)
			continue;
		for (int tries = 0; tries < 400; tries++) {
			if (pthread_tryjoin_np(rt->thread, NULL) == 0) {
				rt->started = 0;
				break;
			}
			pthread_mutex_lock(&s->init_lock);
			pthread_cond_broadcast(&s->ring_cond);
			pthread_mutex_unlock(&s->init_lock);
			wake(rt);
			usleep(tries < 20 ? 1000 : 10000);
		}
		if (rt->started)
			cntrfs_log(s, "ring thread %d did not stop", rt->index);
	}
}

void cntrfs_rings_free(struct dvs_fuse_server *s)
{
	if (!s->rings)
		return;
	for (uint32_t i = 0; i < s->n_rings; i++) {
		if (s->rings[i] && s->rings[i]->started)
			return; /* a stuck thread still uses its entries: leak rather than crash */
	}
	for (uint32_t i = 0; i < s->n_rings; i++)
		ring_thread_free(s->rings[i]);
	free(s->rings);
	s->rings = NULL;
	s->n_rings = 0;
}

void cntrfs_ring_stats(struct dvs_fuse_server *s, struct dvs_fuse_stats *st)
{
	for (uint32_t i = 0; i < s->n_rings; i++) {
		struct ring_thread *rt = s->rings[i];
		if (!rt)
			continue;
		uint64_t before = st->requests;
		cntrfs_add_worker_stats(&rt->w, st);
		st->ring_requests += st->requests - before;
		st->ring_commit_errors += atomic_load(&rt->commit_errors);
		if (atomic_load(&rt->running))
			st->ring_threads++;
	}
}
