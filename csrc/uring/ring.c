/*
 * ring.c -- the io_uring engine (see uring.h for the semantics it relies on).
 *
 * liburing 2.3 sets the ring up (io_uring_queue_init_params: setup + mmap) and does the
 * registrations; the hot path is ours: SQEs are written straight into the mapped SQE
 * array, the SQ tail is published with a release store, completions are read between the
 * CQ head we own and the kernel's tail (acquire load), and every io_uring_enter goes
 * through count_enter(). liburing's own submit/peek helpers may enter the kernel behind
 * the caller's back (io_uring_peek_batch_cqe flushes overflowed CQEs with a syscall), so
 * they are not used: the syscall counter is exact by construction.
 *
 * Each accepted request owns a slot until it completes. The SQE user_data is
 * (generation << 32 | slot): a completion is trusted only if it names a busy slot with the
 * current generation; anything else is counted as bogus and dropped (the kernel is the
 * untrusted host of this design, as RAKIS treats it). A read or write that comes back
 * short is resubmitted for the remainder from the same slot, so the caller sees one
 * completion with the total (short only at end of file).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "uring/uring.h"

struct ring_slot {
	struct dvs_io io; /* the request as accepted */
	uint32_t done;    /* bytes moved so far (short transfers) */
	uint32_t gen;     /* bumped on each reuse: the high half of the SQE user_data */
	uint8_t busy;
};

struct dvs_ring {
	struct io_uring ring;
	uint32_t flags;       /* DVS_RING_* asked for */
	uint32_t setup_flags; /* IORING_SETUP_* used */
	int enabled;
	int restricted;
	uint32_t sq_tail;     /* SQEs written by us; *ktail lags until published */
	struct ring_slot *slots;
	uint32_t n_slots;
	uint32_t *free_slots; /* stack of free slot indices */
	uint32_t n_free;
	uint32_t *requeue;    /* slots whose remainder found no SQE yet */
	uint32_t n_requeue;
	struct dvs_buf *bufs; /* registered buffers, for bounds checks */
	uint32_t n_bufs;
	uint32_t n_files;
	pthread_t issuer; /* SINGLE_ISSUER: the enabling thread */
	struct dvs_io_stats stats;
};

/* SINGLE_ISSUER: the kernel refuses io_uring_enter from other threads with -EEXIST, but
 * only once SQEs are already in the shared ring; refuse earlier, before touching it.
 * pthread_self() reads the thread pointer: no syscall. */
static int wrong_thread(const struct dvs_ring *r)
{
	return (r->setup_flags & IORING_SETUP_SINGLE_ISSUER) &&
	       !pthread_equal(r->issuer, pthread_self());
}

/* ---- the counted kernel entry ---- */

static int count_enter(struct dvs_ring *r, unsigned to_submit, unsigned min_complete,
		       unsigned flags)
{
	r->stats.enters++;
	r->stats.syscalls++;
	r->stats.submitter_syscalls++;
	if (flags & IORING_ENTER_SQ_WAKEUP)
		r->stats.wakeups++;
	if (min_complete)
		r->stats.waits++;
	return io_uring_enter(r->ring.ring_fd, to_submit, min_complete, flags, NULL);
}

/* ---- set-up ---- */

int dvs_ring_create(const struct dvs_ring_params *p, struct dvs_ring **out)
{
	if (!p || !out || p->entries == 0 || p->entries > 32768)
		return -EINVAL;
	struct dvs_ring *r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	struct io_uring_params up;
	memset(&up, 0, sizeof(up));
	/* disabled until the restrictions are in place; CLAMP: large depths get the max */
	up.flags = IORING_SETUP_R_DISABLED | IORING_SETUP_CLAMP;
	if (p->flags & DVS_RING_SINGLE_ISSUER)
		up.flags |= IORING_SETUP_SINGLE_ISSUER;
	if (p->flags & DVS_RING_SQPOLL) {
		up.flags |= IORING_SETUP_SQPOLL;
		up.sq_thread_idle = p->sq_idle_ms ? p->sq_idle_ms : 50;
		if (p->sq_cpu >= 0) {
			up.flags |= IORING_SETUP_SQ_AFF;
			up.sq_thread_cpu = (uint32_t)p->sq_cpu;
		}
	} else if (p->flags & DVS_RING_COOP_TASKRUN) {
		/* the kernel rejects COOP_TASKRUN with SQPOLL: no IPIs to avoid there */
		up.flags |= IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
	}
	int ret = io_uring_queue_init_params(p->entries, &r->ring, &up);
	if (ret < 0) {
		free(r);
		return ret;
	}
	if (!(up.features & IORING_FEAT_NODROP)) {
		/* without NODROP a full CQ silently loses completions */
		io_uring_queue_exit(&r->ring);
		free(r);
		return -EOPNOTSUPP;
	}
	r->flags = p->flags;
	r->setup_flags = up.flags;
	r->sq_tail = *r->ring.sq.ktail;
	/* at most cq_entries requests in flight: the CQ can hold every completion */
	r->n_slots = r->ring.cq.ring_entries;
	r->slots = calloc(r->n_slots, sizeof(*r->slots));
	r->free_slots = calloc(r->n_slots, sizeof(uint32_t));
	r->requeue = calloc(r->n_slots, sizeof(uint32_t));
	if (!r->slots || !r->free_slots || !r->requeue) {
		dvs_ring_destroy(r);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < r->n_slots; i++)
		r->free_slots[i] = r->n_slots - 1 - i;
	r->n_free = r->n_slots;
	*out = r;
	return 0;
}

int dvs_ring_register_files(struct dvs_ring *r, const int32_t *fds, uint32_t n)
{
	if (r->enabled || r->n_files)
		return -EBUSY;
	if (n == 0)
		return 0;
	int ret = io_uring_register_files(&r->ring, (const int *)fds, n);
	if (ret < 0)
		return ret;
	r->n_files = n;
	return 0;
}

int dvs_ring_register_buffers(struct dvs_ring *r, const struct dvs_buf *bufs, uint32_t n)
{
	if (r->enabled || r->n_bufs)
		return -EBUSY;
	if (n == 0)
		return 0;
	if (n >= DVS_IO_NO_BUF)
		return -EINVAL;
	struct iovec *iov = calloc(n, sizeof(*iov));
	r->bufs = calloc(n, sizeof(*r->bufs));
	if (!iov || !r->bufs) {
		free(iov);
		free(r->bufs);
		r->bufs = NULL;
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		iov[i].iov_base = (void *)(uintptr_t)bufs[i].addr;
		iov[i].iov_len = bufs[i].len;
		r->bufs[i] = bufs[i];
	}
	int ret = io_uring_register_buffers(&r->ring, iov, n);
	free(iov);
	if (ret < 0) {
		free(r->bufs);
		r->bufs = NULL;
		return ret;
	}
	r->n_bufs = n;
	return 0;
}

/* The allow-list: exactly the opcodes dvs_io can produce, only on registered files. */
static int register_restrictions(struct dvs_ring *r)
{
	static const uint8_t ops[] = {
		IORING_OP_NOP,	      IORING_OP_READ,	     IORING_OP_WRITE,
		IORING_OP_READ_FIXED, IORING_OP_WRITE_FIXED, IORING_OP_FSYNC,
	};
	struct io_uring_restriction res[sizeof(ops) + 3];
	uint32_t n = 0;
	memset(res, 0, sizeof(res));
	for (size_t i = 0; i < sizeof(ops); i++) {
		res[n].opcode = IORING_RESTRICTION_SQE_OP;
		res[n++].sqe_op = ops[i];
	}
	res[n].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
	res[n++].sqe_flags = IOSQE_FIXED_FILE | IOSQE_IO_LINK | IOSQE_IO_DRAIN | IOSQE_ASYNC;
	res[n].opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED;
	res[n++].sqe_flags = IOSQE_FIXED_FILE;
	if (r->flags & DVS_RING_ALLOW_FILE_UPDATE) {
		res[n].opcode = IORING_RESTRICTION_REGISTER_OP;
		res[n++].register_op = IORING_REGISTER_FILES_UPDATE;
	}
	return io_uring_register(r->ring.ring_fd, IORING_REGISTER_RESTRICTIONS, res, n);
}

int dvs_ring_enable(struct dvs_ring *r)
{
	if (r->enabled)
		return -EBUSY;
	if (!(r->flags & DVS_RING_NO_RESTRICTIONS)) {
		int ret = register_restrictions(r);
		if (ret < 0)
			return ret;
		r->restricted = 1;
	}
	int ret = io_uring_register(r->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
	if (ret < 0)
		return ret;
	r->issuer = pthread_self();
	r->enabled = 1;
	return 0;
}

int dvs_ring_update_files(struct dvs_ring *r, uint32_t first, const int32_t *fds, uint32_t n)
{
	if (first > r->n_files || n > r->n_files - first)
		return -EINVAL;
	if (r->enabled && r->restricted && !(r->flags & DVS_RING_ALLOW_FILE_UPDATE))
		return -EACCES;
	int ret = io_uring_register_files_update(&r->ring, first, (const int *)fds, n);
	return ret < 0 ? ret : 0;
}

/* ---- submission ---- */

static int sq_full(struct dvs_ring *r)
{
	/* the kernel advances *khead as it consumes SQEs (a kernel thread with SQPOLL) */
	unsigned head = io_uring_smp_load_acquire(r->ring.sq.khead);
	return r->sq_tail - head >= r->ring.sq.ring_entries;
}

/* SQEs written but not yet consumed by the kernel. */
static unsigned sq_pending(struct dvs_ring *r)
{
	return r->sq_tail - io_uring_smp_load_acquire(r->ring.sq.khead);
}

static int valid_request(struct dvs_ring *r, const struct dvs_io *io)
{
	if (io->opcode > DVS_OP_FDATASYNC || io->reserved ||
	    (io->flags & ~(DVS_IO_LINK | DVS_IO_DRAIN | DVS_IO_ASYNC)))
		return 0;
	if (io->file < 0 || (uint32_t)io->file >= r->n_files)
		return 0;
	if (io->opcode == DVS_OP_READ || io->opcode == DVS_OP_WRITE) {
		if (io->len == 0 || io->len > (1u << 30))
			return 0;
		if (io->buf != DVS_IO_NO_BUF) {
			if (io->buf >= r->n_bufs)
				return 0;
			const struct dvs_buf *b = &r->bufs[io->buf];
			if (io->addr < b->addr || io->addr - b->addr > b->len ||
			    io->len > b->len - (io->addr - b->addr))
				return 0;
		}
	}
	return 1;
}

/* Write the SQE for slot s (from its progress), without publishing it. */
static void write_sqe(struct dvs_ring *r, uint32_t s)
{
	struct ring_slot *slot = &r->slots[s];
	const struct dvs_io *io = &slot->io;
	unsigned idx = r->sq_tail & r->ring.sq.ring_mask;
	struct io_uring_sqe *sqe = &r->ring.sq.sqes[idx];
	memset(sqe, 0, sizeof(*sqe));
	uint64_t addr = io->addr + slot->done;
	uint32_t len = io->len - slot->done;
	uint64_t off = io->offset + slot->done;
	switch (io->opcode) {
	case DVS_OP_READ:
		if (io->buf == DVS_IO_NO_BUF) {
			io_uring_prep_read(sqe, io->file, (void *)(uintptr_t)addr, len, off);
		} else {
			io_uring_prep_read_fixed(sqe, io->file, (void *)(uintptr_t)addr, len, off,
						 io->buf);
		}
		break;
	case DVS_OP_WRITE:
		if (io->buf == DVS_IO_NO_BUF) {
			io_uring_prep_write(sqe, io->file, (void *)(uintptr_t)addr, len, off);
		} else {
			io_uring_prep_write_fixed(sqe, io->file, (void *)(uintptr_t)addr, len,
						  off, io->buf);
		}
		break;
	case DVS_OP_FSYNC:
		io_uring_prep_fsync(sqe, io->file, 0);
		break;
	case DVS_OP_FDATASYNC:
		io_uring_prep_fsync(sqe, io->file, IORING_FSYNC_DATASYNC);
		break;
	default:
		io_uring_prep_nop(sqe);
		sqe->fd = io->file;
		break;
	}
	sqe->flags = IOSQE_FIXED_FILE;
	/* a resubmitted remainder runs on its own: its chain has already been decided */
	if (slot->done == 0) {
		if (io->flags & DVS_IO_LINK)
			sqe->flags |= IOSQE_IO_LINK;
		if (io->flags & DVS_IO_DRAIN)
			sqe->flags |= IOSQE_IO_DRAIN;
	}
	if (io->flags & DVS_IO_ASYNC)
		sqe->flags |= IOSQE_ASYNC;
	sqe->user_data = ((uint64_t)slot->gen << 32) | s;
	/* the SQ index array maps ring positions to SQEs; ours is the identity */
	r->ring.sq.array[idx] = idx;
	r->sq_tail++;
}

/* Make written SQEs visible; with SQPOLL wake the kernel thread if it sleeps. Returns the
 * number the kernel consumed (non-SQPOLL) or 0. */
static int publish(struct dvs_ring *r, unsigned min_complete, unsigned enter_flags)
{
	/* order the SQE stores before the tail the kernel reads */
	io_uring_smp_store_release(r->ring.sq.ktail, r->sq_tail);
	if (r->setup_flags & IORING_SETUP_SQPOLL) {
		unsigned kflags = IO_URING_READ_ONCE(*r->ring.sq.kflags);
		if (kflags & IORING_SQ_NEED_WAKEUP)
			enter_flags |= IORING_ENTER_SQ_WAKEUP;
		if (!enter_flags && !min_complete)
			return 0;
		int ret = count_enter(r, 0, min_complete, enter_flags);
		return ret < 0 ? ret : 0;
	}
	unsigned pending = sq_pending(r);
	if (!pending && !min_complete && !enter_flags)
		return 0;
	int ret = count_enter(r, pending, min_complete, enter_flags);
	if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY)
		return 0; /* nothing lost: unconsumed SQEs stay queued for the next enter */
	return ret;
}

static void flush_requeues(struct dvs_ring *r)
{
	while (r->n_requeue && !sq_full(r))
		write_sqe(r, r->requeue[--r->n_requeue]);
}

/* Write SQEs for as many requests as fit (entering the kernel only when the SQ is full);
 * the caller publishes. Returns the count taken or -errno; *invalid: ios[count] is bad. */
static int queue_requests(struct dvs_ring *r, const struct dvs_io *ios, uint32_t n,
			  int *invalid_out)
{
	flush_requeues(r);
	uint32_t accepted = 0;
	int invalid = 0;
	uint32_t chain_left = 0; /* members of the current LINK chain still to write */
	while (accepted < n) {
		if (!valid_request(r, &ios[accepted])) {
			invalid = 1;
			break;
		}
		if (!chain_left) {
			/* a LINK chain goes into the SQ whole, in one enter: the kernel ends a chain
			 * at the end of a submission, so a split chain would run unordered */
			uint32_t len = 1;
			while ((ios[accepted + len - 1].flags & DVS_IO_LINK) && accepted + len < n)
				len++;
			if (len > r->ring.sq.ring_entries || len > r->n_slots) {
				invalid = 1;
				break;
			}
			unsigned space = r->ring.sq.ring_entries - (r->sq_tail -
					 io_uring_smp_load_acquire(r->ring.sq.khead));
			if (len > space) {
				int ret = publish(r, 0, 0);
				if (ret < 0)
					return accepted ? (int)accepted : ret;
				space = r->ring.sq.ring_entries - (r->sq_tail -
					 io_uring_smp_load_acquire(r->ring.sq.khead));
			}
			if (len > space || len > r->n_free)
				break;
			chain_left = len;
		}
		chain_left--;
		uint32_t s = r->free_slots[--r->n_free];
		struct ring_slot *slot = &r->slots[s];
		slot->io = ios[accepted];
		slot->done = 0;
		slot->gen++;
		slot->busy = 1;
		write_sqe(r, s);
		accepted++;
	}
	if (accepted < n && !invalid)
		r->stats.queue_full++;
	r->stats.submitted += accepted;
	r->stats.in_flight = r->n_slots - r->n_free;
	*invalid_out = invalid;
	return (int)accepted;
}

int dvs_ring_submit(struct dvs_ring *r, const struct dvs_io *ios, uint32_t n)
{
	if (!r->enabled)
		return -EBADFD;
	if (wrong_thread(r))
		return -EEXIST;
	int invalid = 0;
	int accepted = queue_requests(r, ios, n, &invalid);
	if (accepted < 0)
		return accepted;
	if (accepted || sq_pending(r)) {
		int ret = publish(r, 0, 0);
		if (ret < 0 && !accepted)
			return ret;
	}
	if (invalid && accepted == 0)
		return -EINVAL;
	return accepted;
}

/* ---- completion ---- */

static void finish(struct dvs_ring *r, uint32_t s, int32_t res, struct dvs_io_done *out)
{
	struct ring_slot *slot = &r->slots[s];
	out->user_data = slot->io.user_data;
	out->res = res;
	out->flags = 0;
	if (res > 0) {
		if (slot->io.opcode == DVS_OP_READ)
			r->stats.bytes_read += (uint64_t)res;
		else if (slot->io.opcode == DVS_OP_WRITE)
			r->stats.bytes_written += (uint64_t)res;
	}
	slot->busy = 0;
	r->free_slots[r->n_free++] = s;
	r->stats.completed++;
}

/* Consume CQEs; deliver up to max; requeue short transfers. Returns delivered count. */
static uint32_t drain_cq(struct dvs_ring *r, struct dvs_io_done *out, uint32_t max)
{
	struct io_uring_cq *cq = &r->ring.cq;
	unsigned head = *cq->khead; /* only we write the CQ head */
	unsigned tail = io_uring_smp_load_acquire(cq->ktail);
	uint32_t n = 0;
	while (head != tail && n < max) {
		const struct io_uring_cqe *cqe = &cq->cqes[head & cq->ring_mask];
		uint32_t s = (uint32_t)cqe->user_data;
		uint32_t gen = (uint32_t)(cqe->user_data >> 32);
		int32_t res = cqe->res;
		head++;
		if (s >= r->n_slots || !r->slots[s].busy || r->slots[s].gen != gen) {
			r->stats.bogus_completions++;
			continue;
		}
		struct ring_slot *slot = &r->slots[s];
		uint8_t op = slot->io.opcode;
		if (op != DVS_OP_READ && op != DVS_OP_WRITE) {
			finish(r, s, res, &out[n++]);
			continue;
		}
		if (res < 0) {
			/* an error after partial progress reports the progress, like pread */
			finish(r, s, slot->done ? (int32_t)slot->done : res, &out[n++]);
			continue;
		}
		uint32_t remaining = slot->io.len - slot->done;
		if ((uint32_t)res > remaining) {
			/* more bytes than asked for: a lying kernel, never a real transfer */
			r->stats.bogus_completions++;
			finish(r, s, -EIO, &out[n++]);
			continue;
		}
		slot->done += (uint32_t)res;
		if (res == 0 || slot->done == slot->io.len) {
			finish(r, s, (int32_t)slot->done, &out[n++]);
			continue;
		}
		r->stats.requeued++;
		if (sq_full(r))
			r->requeue[r->n_requeue++] = s;
		else
			write_sqe(r, s);
	}
	/* release: the kernel may reuse the CQEs we consumed */
	io_uring_smp_store_release(cq->khead, head);
	r->stats.in_flight = r->n_slots - r->n_free;
	return n;
}

static int cq_ready(struct dvs_ring *r)
{
	return io_uring_smp_load_acquire(r->ring.cq.ktail) != *r->ring.cq.khead;
}

int dvs_ring_reap(struct dvs_ring *r, struct dvs_io_done *out, uint32_t max,
		  uint32_t min_wait)
{
	if (!r->enabled)
		return -EBADFD;
	if (wrong_thread(r))
		return -EEXIST;
	if (min_wait > max)
		min_wait = max;
	uint32_t n = 0;
	for (;;) {
		flush_requeues(r);
		n += drain_cq(r, out + n, max - n);
		uint32_t in_flight = r->n_slots - r->n_free;
		uint32_t want = min_wait > n ? min_wait - n : 0;
		if (want > in_flight)
			want = in_flight; /* never wait for completions that cannot come */
		unsigned kflags = IO_URING_READ_ONCE(*r->ring.sq.kflags);
		int taskrun = (kflags & IORING_SQ_TASKRUN) && !cq_ready(r);
		int unsent = r->sq_tail != *r->ring.sq.ktail || r->n_requeue ||
			     (!(r->setup_flags & IORING_SETUP_SQPOLL) && sq_pending(r));
		if (n == max || (!want && !taskrun && !unsent))
			break;
		if (want && cq_ready(r))
			continue; /* more arrived meanwhile: no need to sleep */
		int ret = publish(r, want, want || taskrun ? IORING_ENTER_GETEVENTS : 0);
		if (ret < 0 && ret != -ETIME)
			return n ? (int)n : ret;
		if (!want && !cq_ready(r))
			break;
	}
	return (int)n;
}

int dvs_ring_submit_and_reap(struct dvs_ring *r, const struct dvs_io *ios, uint32_t n,
			     uint32_t *accepted, struct dvs_io_done *out, uint32_t max,
			     uint32_t min_wait)
{
	if (!r->enabled)
		return -EBADFD;
	if (wrong_thread(r))
		return -EEXIST;
	int invalid = 0;
	int taken = queue_requests(r, ios, n, &invalid);
	if (taken < 0)
		return taken;
	*accepted = (uint32_t)taken;
	if (invalid && taken == 0)
		return -EINVAL;
	/* the reap's io_uring_enter carries the new SQEs too: one syscall for both */
	return dvs_ring_reap(r, out, max, min_wait);
}

int dvs_ring_stats(struct dvs_ring *r, struct dvs_io_stats *out)
{
	*out = r->stats;
	out->in_flight = r->n_slots - r->n_free;
	return 0;
}

int dvs_ring_info(struct dvs_ring *r, struct dvs_ring_info *out)
{
	memset(out, 0, sizeof(*out));
	out->sq_entries = r->ring.sq.ring_entries;
	out->cq_entries = r->ring.cq.ring_entries;
	out->max_in_flight = r->n_slots;
	out->features = r->ring.features;
	out->setup_flags = r->setup_flags;
	out->restricted = (uint32_t)r->restricted;
	out->n_files = r->n_files;
	out->n_bufs = r->n_bufs;
	return 0;
}

int dvs_ring_inject_raw(struct dvs_ring *r, uint8_t opcode, uint8_t sqe_flags, int32_t fd,
			uint64_t user_data, int32_t wait, int32_t *res)
{
	if (!r->enabled)
		return -EBADFD;
	if (wrong_thread(r))
		return -EEXIST;
	if (sq_full(r) || (wait && (r->n_free != r->n_slots || cq_ready(r))))
		return -EBUSY;
	unsigned idx = r->sq_tail & r->ring.sq.ring_mask;
	struct io_uring_sqe *sqe = &r->ring.sq.sqes[idx];
	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = opcode;
	sqe->flags = sqe_flags;
	sqe->fd = fd;
	sqe->user_data = user_data;
	r->ring.sq.array[idx] = idx;
	r->sq_tail++;
	int ret = publish(r, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0);
	if (ret < 0 || !wait)
		return ret < 0 ? ret : 0;
	while (!cq_ready(r)) {
		ret = count_enter(r, 0, 1, IORING_ENTER_GETEVENTS);
		if (ret < 0 && ret != -EINTR)
			return ret;
	}
	struct io_uring_cq *cq = &r->ring.cq;
	unsigned head = *cq->khead;
	const struct io_uring_cqe *cqe = &cq->cqes[head & cq->ring_mask];
	if (cqe->user_data != user_data)
		return -EPROTO;
	*res = cqe->res;
	io_uring_smp_store_release(cq->khead, head + 1);
	return 0;
}

int dvs_ring_fd(struct dvs_ring *r)
{
	return r->ring.ring_fd;
}

int dvs_ring_destroy(struct dvs_ring *r)
{
	if (!r)
		return 0;
	if (r->enabled && r->slots) {
		/* requests in flight still point at the caller's buffers: let them finish */
		struct dvs_io_done sink[64];
		while (r->n_free < r->n_slots) {
			int got = dvs_ring_reap(r, sink, 64, 1);
			if (got < 0)
				break;
		}
	}
	if (r->ring.ring_fd > 0 || r->ring.sq.ring_ptr)
		io_uring_queue_exit(&r->ring);
	free(r->slots);
	free(r->free_slots);
	free(r->requeue);
	free(r->bufs);
	free(r);
	return 0;
}
