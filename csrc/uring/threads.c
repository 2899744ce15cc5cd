/*
 * threads.c -- the fallback engine: worker threads doing pread/pwrite/fsync, for hosts
 * where io_uring is disabled (kernel.io_uring_disabled) or blocked (seccomp profiles of
 * container runtimes deny io_uring_setup).
 *
 * Same request format and semantics as the ring: one completion per request, short
 * transfers continued inside the worker (each pread/pwrite counted), IO_LINK chains run
 * in order on one worker and a failed or short member cancels the rest (-ECANCELED, as
 * io_uring does), IO_DRAIN waits until nothing else runs and holds back later requests.
 *
 * Every syscall an I/O thread makes on the data path is counted: pread/pwrite/fsync by
 * the workers, and futex waits/wakes on both sides (workers sleeping for work, the caller
 * sleeping for completions and waking workers). The queues are guarded by a spin lock
 * rather than a pthread mutex, whose hidden futex calls could not be counted; critical
 * sections are a few loads and stores, and sleeping is always an explicit, counted futex.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sys/sync.h"
#include "uring/backends.h"

#define SPINS_BEFORE_SLEEP 2000

struct tslot {
	struct dvs_io io;
	uint32_t next; /* next member of the LINK chain, or UINT32_MAX */
};

struct dvs_threads {
	atomic_flag lock;
	uint32_t n_slots;
	struct tslot *slots;
	uint32_t *free_slots;
	uint32_t n_free;
	/* FIFO of chain heads waiting for a worker */
	uint32_t *fifo;
	uint32_t fifo_head, fifo_len;
	/* finished requests waiting for the caller */
	struct dvs_io_done *done;
	uint32_t *done_slot; /* the slot each finished request frees when reaped */
	uint32_t done_head, done_len;
	uint32_t running;      /* chains being executed */
	int drain_running;     /* a DRAIN chain executes: nothing else may start */
	uint32_t idle_workers; /* workers asleep on work_seq */
	int caller_waiting;    /* the caller sleeps on done_seq */
	_Atomic uint32_t work_seq;
	_Atomic uint32_t done_seq;
	int stop;
	int32_t *fds;
	uint32_t n_files;
	uint32_t n_threads;
	pthread_t *threads;
	struct dvs_io_stats stats; /* guarded by lock except the atomics below */
	_Atomic uint64_t worker_syscalls;
	_Atomic uint64_t submitter_syscalls;
	_Atomic uint64_t wakeups;
	_Atomic uint64_t waits;
};

static void lock(struct dvs_threads *t)
{
	while (atomic_flag_test_and_set_explicit(&t->lock, memory_order_acquire))
		__builtin_ia32_pause();
}

static void unlock(struct dvs_threads *t)
{
	atomic_flag_clear_explicit(&t->lock, memory_order_release);
}

/* ---- workers ---- */

/* One request, continued until done, end of file or error. */
static int32_t run_request(struct dvs_threads *t, const struct dvs_io *io, uint64_t *syscalls)
{
	int fd = t->fds[io->file];
	if (fd < 0)
		return -EBADF;
	switch (io->opcode) {
	case DVS_OP_NOP:
		return 0;
	case DVS_OP_FSYNC:
	case DVS_OP_FDATASYNC:
		for (;;) {
			(*syscalls)++;
			int ret = io->opcode == DVS_OP_FSYNC ? fsync(fd) : fdatasync(fd);
			if (ret == 0)
				return 0;
			if (errno != EINTR)
				return -errno;
		}
	default:
		break;
	}
	uint32_t done = 0;
	while (done < io->len) {
		char *addr = (char *)(uintptr_t)(io->addr + done);
		size_t len = io->len - done;
		off_t off = (off_t)(io->offset + done);
		(*syscalls)++;
		ssize_t n = io->opcode == DVS_OP_READ ? pread(fd, addr, len, off)
						       : pwrite(fd, addr, len, off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return done ? (int32_t)done : -errno;
		}
		if (n == 0)
			break;
		done += (uint32_t)n;
	}
	return (int32_t)done;
}

static int can_start(struct dvs_threads *t)
{
	if (!t->fifo_len || t->drain_running)
		return 0;
	const struct dvs_io *head = &t->slots[t->fifo[t->fifo_head]].io;
	return !(head->flags & DVS_IO_DRAIN) || t->running == 0;
}

static void *worker(void *arg)
{
	struct dvs_threads *t = arg;
	for (;;) {
		lock(t);
		while (!t->stop && !can_start(t)) {
			uint32_t seq = atomic_load(&t->work_seq);
			t->idle_workers++;
			unlock(t);
			int spins = 0;
			while (atomic_load(&t->work_seq) == seq && spins++ < SPINS_BEFORE_SLEEP)
				__builtin_ia32_pause();
			if (atomic_load(&t->work_seq) == seq) {
				atomic_fetch_add(&t->worker_syscalls, 1);
				dvs_futex_wait((uint32_t *)&t->work_seq, seq);
			}
			lock(t);
			t->idle_workers--;
		}
		if (t->stop) {
			unlock(t);
			return NULL;
		}
		uint32_t head = t->fifo[t->fifo_head];
		t->fifo_head = (t->fifo_head + 1) % t->n_slots;
		t->fifo_len--;
		int drain = (t->slots[head].io.flags & DVS_IO_DRAIN) != 0;
		t->running++;
		if (drain)
			t->drain_running = 1;
		unlock(t);

		/* run the chain; a failed or short member cancels the rest */
		int32_t results[64];
		uint32_t members[64];
		uint32_t n = 0;
		uint64_t syscalls = 0;
		int cancel = 0;
		for (uint32_t s = head; s != UINT32_MAX && n < 64; s = t->slots[s].next) {
			const struct dvs_io *io = &t->slots[s].io;
			int32_t res = cancel ? -ECANCELED : run_request(t, io, &syscalls);
			if (!cancel && (res < 0 || ((io->opcode == DVS_OP_READ ||
						     io->opcode == DVS_OP_WRITE) &&
						    (uint32_t)res < io->len)))
				cancel = 1;
			members[n] = s;
			results[n++] = res;
		}
		atomic_fetch_add(&t->worker_syscalls, syscalls);

		lock(t);
		for (uint32_t i = 0; i < n; i++) {
			const struct dvs_io *io = &t->slots[members[i]].io;
			uint32_t at = (t->done_head + t->done_len) % t->n_slots;
			t->done[at].user_data = io->user_data;
			t->done[at].res = results[i];
			t->done[at].flags = 0;
			t->done_slot[at] = members[i];
			t->done_len++;
			if (results[i] > 0 && io->opcode == DVS_OP_READ)
				t->stats.bytes_read += (uint64_t)results[i];
			else if (results[i] > 0 && io->opcode == DVS_OP_WRITE)
				t->stats.bytes_written += (uint64_t)results[i];
		}
		t->running--;
		if (drain)
			t->drain_running = 0;
		atomic_fetch_add(&t->done_seq, 1);
		int wake_caller = t->caller_waiting;
		/* a finished drain (or the last runner before one) may unblock sleepers */
		int wake_worker = t->idle_workers && can_start(t);
		unlock(t);
		if (wake_caller) {
			atomic_fetch_add(&t->worker_syscalls, 1);
			atomic_fetch_add(&t->wakeups, 1);
			dvs_futex_wake((uint32_t *)&t->done_seq, 1);
		}
		if (wake_worker) {
			atomic_fetch_add(&t->work_seq, 1);
			atomic_fetch_add(&t->worker_syscalls, 1);
			atomic_fetch_add(&t->wakeups, 1);
			dvs_futex_wake((uint32_t *)&t->work_seq, 1);
		}
	}
}

/* ---- the caller's side ---- */

int dvs_threads_create(uint32_t entries, uint32_t n_threads, struct dvs_threads **out)
{
	if (entries == 0 || entries > 65536)
		return -EINVAL;
	struct dvs_threads *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	atomic_flag_clear(&t->lock);
	t->n_slots = entries;
	t->n_threads = n_threads ? n_threads : 2;
	t->slots = calloc(entries, sizeof(*t->slots));
	t->free_slots = calloc(entries, sizeof(uint32_t));
	t->fifo = calloc(entries, sizeof(uint32_t));
	t->done = calloc(entries, sizeof(*t->done));
	t->done_slot = calloc(entries, sizeof(uint32_t));
	t->threads = calloc(t->n_threads, sizeof(pthread_t));
	if (!t->slots || !t->free_slots || !t->fifo || !t->done || !t->done_slot || !t->threads) {
		dvs_threads_destroy(t);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < entries; i++)
		t->free_slots[i] = entries - 1 - i;
	t->n_free = entries;
	*out = t;
	return 0;
}

int dvs_threads_register_files(struct dvs_threads *t, const int32_t *fds, uint32_t n)
{
	if (t->fds)
		return -EBUSY;
	t->fds = calloc(n ? n : 1, sizeof(int32_t));
	if (!t->fds)
		return -ENOMEM;
	memcpy(t->fds, fds, n * sizeof(int32_t));
	t->n_files = n;
	return 0;
}

int dvs_threads_update_file(struct dvs_threads *t, uint32_t index, int32_t fd)
{
	if (index >= t->n_files)
		return -EINVAL;
	lock(t);
	int busy = t->fifo_len || t->running;
	if (!busy)
		t->fds[index] = fd;
	unlock(t);
	return busy ? -EBUSY : 0;
}

int dvs_threads_enable(struct dvs_threads *t)
{
	for (uint32_t i = 0; i < t->n_threads; i++) {
		int ret = pthread_create(&t->threads[i], NULL, worker, t);
		if (ret) {
			t->n_threads = i;
			return -ret;
		}
	}
	return 0;
}

static int valid(struct dvs_threads *t, const struct dvs_io *io)
{
	if (io->opcode > DVS_OP_FDATASYNC || io->reserved ||
	    (io->flags & ~(DVS_IO_LINK | DVS_IO_DRAIN | DVS_IO_ASYNC)))
		return 0;
	if (io->file < 0 || (uint32_t)io->file >= t->n_files)
		return 0;
	if ((io->opcode == DVS_OP_READ || io->opcode == DVS_OP_WRITE) &&
	    (io->len == 0 || io->len > (1u << 30)))
		return 0;
	return 1;
}

int dvs_threads_submit(struct dvs_threads *t, const struct dvs_io *ios, uint32_t n)
{
	uint32_t accepted = 0, chains = 0;
	int invalid = 0;
	lock(t);
	while (accepted < n) {
		/* a LINK chain is taken whole or not at all */
		uint32_t len = 1;
		while ((ios[accepted + len - 1].flags & DVS_IO_LINK) && accepted + len < n)
			len++;
		int ok = 1;
		for (uint32_t i = 0; i < len; i++)
			ok &= valid(t, &ios[accepted + i]);
		if (!ok || len > 64) {
			invalid = 1;
			break;
		}
		if (len > t->n_free)
			break;
		uint32_t prev = UINT32_MAX, head = UINT32_MAX;
		for (uint32_t i = 0; i < len; i++) {
			uint32_t s = t->free_slots[--t->n_free];
			t->slots[s].io = ios[accepted + i];
			t->slots[s].next = UINT32_MAX;
			if (prev == UINT32_MAX)
				head = s;
			else
				t->slots[prev].next = s;
			prev = s;
		}
		t->fifo[(t->fifo_head + t->fifo_len) % t->n_slots] = head;
		t->fifo_len++;
		accepted += len;
		chains++;
	}
	if (accepted < n && !invalid)
		t->stats.queue_full++;
	t->stats.submitted += accepted;
	int wake = chains && t->idle_workers;
	uint32_t idle = t->idle_workers;
	unlock(t);
	if (chains) {
		atomic_fetch_add(&t->work_seq, 1);
		if (wake) {
			atomic_fetch_add(&t->submitter_syscalls, 1);
			atomic_fetch_add(&t->wakeups, 1);
			dvs_futex_wake((uint32_t *)&t->work_seq, (int)(chains < idle ? chains : idle));
		}
	}
	if (invalid && accepted == 0)
		return -EINVAL;
	return (int)accepted;
}

int dvs_threads_reap(struct dvs_threads *t, struct dvs_io_done *out, uint32_t max,
		     uint32_t min_wait)
{
	uint32_t n = 0;
	if (min_wait > max)
		min_wait = max;
	lock(t);
	for (;;) {
		while (n < max && t->done_len) {
			out[n++] = t->done[t->done_head];
			t->free_slots[t->n_free++] = t->done_slot[t->done_head];
			t->done_head = (t->done_head + 1) % t->n_slots;
			t->done_len--;
			t->stats.completed++;
		}
		uint32_t in_flight = t->n_slots - t->n_free - t->done_len;
		uint32_t want = min_wait > n ? min_wait - n : 0;
		if (!want || !in_flight)
			break;
		uint32_t seq = atomic_load(&t->done_seq);
		t->caller_waiting = 1;
		unlock(t);
		int spins = 0;
		while (atomic_load(&t->done_seq) == seq && spins++ < SPINS_BEFORE_SLEEP)
			__builtin_ia32_pause();
		if (atomic_load(&t->done_seq) == seq) {
			atomic_fetch_add(&t->submitter_syscalls, 1);
			atomic_fetch_add(&t->waits, 1);
			dvs_futex_wait((uint32_t *)&t->done_seq, seq);
		}
		lock(t);
		t->caller_waiting = 0;
	}
	unlock(t);
	return (int)n;
}

int dvs_threads_stats(struct dvs_threads *t, struct dvs_io_stats *out)
{
	lock(t);
	*out = t->stats;
	out->in_flight = t->n_slots - t->n_free;
	unlock(t);
	out->worker_syscalls = atomic_load(&t->worker_syscalls);
	out->submitter_syscalls = atomic_load(&t->submitter_syscalls);
	out->syscalls = out->worker_syscalls + out->submitter_syscalls;
	out->wakeups = atomic_load(&t->wakeups);
	out->waits = atomic_load(&t->waits);
	return 0;
}

int dvs_threads_max_in_flight(struct dvs_threads *t)
{
	return (int)t->n_slots;
}

int dvs_threads_destroy(struct dvs_threads *t)
{
	if (!t)
		return 0;
	if (t->threads) {
		struct dvs_io_done sink[64];
		while (t->fifo_len || t->running) {
			if (dvs_threads_reap(t, sink, 64, 1) <= 0)
				break;
		}
		lock(t);
		t->stop = 1;
		unlock(t);
		atomic_fetch_add(&t->work_seq, 1);
		dvs_futex_wake((uint32_t *)&t->work_seq, (int)t->n_threads);
		for (uint32_t i = 0; i < t->n_threads; i++)
			pthread_join(t->threads[i], NULL);
	}
	free(t->slots);
	free(t->free_slots);
	free(t->fifo);
	free(t->done);
	free(t->done_slot);
	free(t->threads);
	free(t->fds);
	free(t);
	return 0;
}
