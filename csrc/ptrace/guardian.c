/*
 * guardian.c -- the tracer child: owns the ptrace session with the hypervisor, serves dvs's
 * requests, and puts the hypervisor back as it was when dvs goes away (see hv.h).
 *
 * Event sources, all in one poll(): a signalfd (SIGCHLD for tracee stops, SIGTERM/SIGINT/
 * SIGHUP/SIGQUIT to shut down), the control socket (requests, EOF = dvs is gone), the mmio
 * socket (answers to trapped reads). Tracee stops are collected with waitpid(-1, WNOHANG |
 * __WALL) and handled by on_stop(), which decides per stop whether the thread keeps running
 * (signals are passed on at once) or stays parked.
 *
 * Invariant for injection: every traced thread is in a ptrace-stop (so no vCPU is inside
 * KVM_RUN holding its mutex). Any stop satisfies a PTRACE_INTERRUPT (the kernel clears the
 * pending trap at every ptrace-stop), so a thread may be parked at a syscall stop; the
 * injection thread is first brought to an interrupt stop or a syscall-exit stop
 * (tracer.c: make_clean_stop). stop_all() establishes it; resume_all() gives the injection thread its registers
 * back, re-queues held-back signals and lets threads run again (when dvs asked for that).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compat.h"
#include "kvm/kvm_abi.h"
#include "ptrace/guardian.h"
#include "ptrace/hv.h"
#include "ptrace/tracer.h"

#define HV_MAX_UNDO 256
#define STOP_TIMEOUT_MS 10000
#define SETTLE_TIMEOUT_MS 5000

struct hv_undo {
	int32_t id;
	int64_t nr;
	uint64_t args[6];
	uint8_t arg_flags[6];
	uint16_t len;
	uint8_t data[DVS_HV_UNDO_DATA_MAX];
};

/* A vCPU fd pulled into the guardian with pidfd_getfd and its kvm_run page mapped here. */
struct hv_vcpu_map {
	int32_t index;   /* vCPU index (-1: mapped for settling only, index unknown) */
	int32_t target_fd;
	int trapped;     /* part of the MMIO trap's vCPU set */
	int local_fd;
	struct dvs_kvm_run_head *run;
};

struct guardian {
	struct hv_tracer tr;
	int control_fd;
	int mmio_fd;
	int signal_fd;
	int target_pidfd;
	int shutdown;
	uint64_t scratch;
	uint32_t scratch_size;
	/* modes */
	int running;   /* dvs wants the threads to run */
	int hold;      /* threads must stay (or become) stopped now */
	int trapping;
	/* undo log, oldest first */
	struct hv_undo undo[HV_MAX_UNDO];
	int n_undo;
	int32_t next_undo_id;
	/* MMIO trap */
	uint64_t trap_base, trap_size;
	uint32_t reply_timeout_ms;
	int reads_from_bank;
	uint8_t *bank;        /* shared with dvs (MAP_SHARED before the fork) */
	uint32_t bank_size;
	uint32_t kvm_run_size;
	struct hv_vcpu_map vcpus[DVS_HV_MAX_VCPUS];
	int n_vcpus;
	uint64_t mmio_seq, mmio_reads, mmio_writes, mmio_timeouts, kvm_run_exits;
	/* settling a vCPU before a register write */
	int32_t settle_fd;  /* -1: not settling */
	int settled;
	uint64_t settles;
};

static struct guardian G;
static struct dvs_hv_request request_buf;
static struct dvs_hv_response response_buf;

static void fail(struct dvs_hv_response *resp, int error, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void fail(struct dvs_hv_response *resp, int error, const char *fmt, ...)
{
	va_list ap;

	resp->error = error;
	va_start(ap, fmt);
	vsnprintf(resp->message, sizeof(resp->message), fmt, ap);
	va_end(ap);
}

/* ---- vCPU table (MMIO trap) ---------------------------------------------------------------- */

static struct hv_vcpu_map *mapped_vcpu(struct guardian *g, int64_t fd)
{
	for (int i = 0; i < g->n_vcpus; i++)
		if (g->vcpus[i].target_fd == fd)
			return &g->vcpus[i];
	return NULL;
}

/* The trapped vCPU behind target fd `fd`, or NULL. */
static struct hv_vcpu_map *vcpu_by_fd(struct guardian *g, int64_t fd)
{
	struct hv_vcpu_map *v = mapped_vcpu(g, fd);

	return v && v->trapped ? v : NULL;
}

/* Pull vCPU fd `fd` out of the target and map its kvm_run here (cached). */
static struct hv_vcpu_map *map_vcpu(struct guardian *g, int32_t fd, uint32_t run_size, int *err)
{
	struct hv_vcpu_map *v = mapped_vcpu(g, fd);
	void *run;

	if (v)
		return v;
	if (g->n_vcpus >= DVS_HV_MAX_VCPUS || run_size < 4096 || run_size > (1u << 20) ||
	    (g->kvm_run_size && run_size != g->kvm_run_size)) {
		*err = -EINVAL;
		return NULL;
	}
	v = &g->vcpus[g->n_vcpus];
	memset(v, 0, sizeof(*v));
	v->index = -1;
	v->target_fd = fd;
	v->local_fd = (int)syscall(__NR_pidfd_getfd, g->target_pidfd, fd, 0);
	if (v->local_fd < 0) {
		*err = -errno;
		return NULL;
	}
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->local_fd, 0);
	if (run == MAP_FAILED) {
		*err = -errno;
		close(v->local_fd);
		return NULL;
	}
	v->run = run;
	g->kvm_run_size = run_size;
	g->n_vcpus++;
	return v;
}

static int all_vcpus_seen(struct guardian *g)
{
	for (int i = 0; i < g->n_vcpus; i++) {
		int seen = 0;

		if (!g->vcpus[i].trapped)
			continue;

		for (int j = 0; j < g->tr.n_threads && !seen; j++)
			seen = g->tr.threads[j].vcpu == g->vcpus[i].index;
		if (!seen)
			return 0;
	}
	return 1;
}

/* While trapping, vCPU threads (and threads not yet known not to be one) stop at syscalls. */
static int wants_syscall_stops(struct guardian *g, struct hv_thread *t)
{
	if (g->settle_fd >= 0)
		return 1; /* watching for the vCPU's next KVM_RUN, on whichever thread */
	if (!g->trapping)
		return 0;
	return t->vcpu >= 0 || !all_vcpus_seen(g);
}

/* ---- answering a trapped access ----------------------------------------------------------- */

/* Make the KVM_RUN that just returned look interrupted: the VMM enters again and KVM
 * completes the access from kvm_run.mmio.data. */
static int complete_as_interrupted(struct guardian *g, struct hv_thread *t)
{
	long offset = (long)offsetof(struct user_regs_struct, rax);

	if (ptrace(PTRACE_POKEUSER, t->tid, (void *)offset, (void *)(long)-EINTR) < 0) {
		hv_log(&g->tr, "setting rax of %d: %s", t->tid, strerror(errno));
		return -errno;
	}
	t->syscall_rval = -EINTR;
	return 0;
}

static void answer_read(struct guardian *g, struct hv_thread *t, uint64_t data)
{
	struct hv_vcpu_map *v = vcpu_by_fd(g, t->kvm_run_fd);

	if (v && v->run) {
		uint32_t len = v->run->exit.mmio.len;

		if (len > 8)
			len = 8;
		memcpy((void *)v->run->exit.mmio.data, &data, len);
	}
	complete_as_interrupted(g, t);
	t->mmio_pending = 0;
}

static void resume_or_park(struct guardian *g, struct hv_thread *t);

static void on_kvm_run_exit(struct guardian *g, struct hv_thread *t)
{
	struct hv_vcpu_map *v = vcpu_by_fd(g, t->kvm_run_fd);
	struct dvs_hv_mmio_msg msg;
	volatile struct dvs_kvm_run_head *run;
	uint64_t gpa;
	uint32_t len;

	g->kvm_run_exits++;
	if (!g->trapping || !v || !v->run || t->syscall_rval != 0)
		return;
	run = v->run;
	if (run->exit_reason != KVM_EXIT_MMIO)
		return;
	gpa = run->exit.mmio.phys_addr;
	len = run->exit.mmio.len;
	if (len == 0 || len > 8 || gpa < g->trap_base || gpa - g->trap_base >= g->trap_size ||
	    len > g->trap_size - (gpa - g->trap_base))
		return; /* not ours: the hypervisor handles it */
	memset(&msg, 0, sizeof(msg));
	msg.seq = ++g->mmio_seq;
	msg.gpa = gpa;
	msg.len = len;
	msg.is_write = run->exit.mmio.is_write;
	msg.tid = t->tid;
	msg.vcpu = v->index;
	if (msg.is_write)
		memcpy(&msg.data, (const void *)run->exit.mmio.data, len);
	if (g->reads_from_bank) {
		uint64_t offset = gpa - g->trap_base;
		int inside = offset < g->bank_size && len <= g->bank_size - offset;

		if (msg.is_write) {
			if (inside)
				memcpy(g->bank + offset, &msg.data, len);
			g->mmio_writes++;
			/* a notice; dvs answers nothing and nothing waits for it */
			send(g->mmio_fd, &msg, sizeof(msg), MSG_NOSIGNAL | MSG_DONTWAIT);
			complete_as_interrupted(g, t);
		} else {
			uint64_t data = ~0ull;

			if (inside) {
				data = 0;
				memcpy(&data, g->bank + offset, len);
			}
			g->mmio_reads++;
			answer_read(g, t, data);
		}
		return;
	}
	if (send(g->mmio_fd, &msg, sizeof(msg), MSG_NOSIGNAL | MSG_DONTWAIT) != sizeof(msg)) {
		/* dvs is not listening: the access still must not reach the hypervisor */
		g->mmio_timeouts++;
		if (!msg.is_write)
			answer_read(g, t, ~0ull);
		else
			complete_as_interrupted(g, t);
		return;
	}
	if (msg.is_write) {
		g->mmio_writes++;
		complete_as_interrupted(g, t);
		return;
	}
	g->mmio_reads++;
	t->mmio_pending = 1;
	t->mmio_seq = msg.seq;
	t->mmio_deadline_ns = hv_now_ns() + (uint64_t)g->reply_timeout_ms * 1000000ull;
}

static void on_mmio_replies(struct guardian *g)
{
	for (;;) {
		struct dvs_hv_mmio_msg msg;
		ssize_t n = recv(g->mmio_fd, &msg, sizeof(msg), MSG_DONTWAIT);

		if (n != sizeof(msg))
			return;
		for (int i = 0; i < g->tr.n_threads; i++) {
			struct hv_thread *t = &g->tr.threads[i];

			if (t->mmio_pending && t->mmio_seq == msg.seq) {
				answer_read(g, t, msg.data);
				resume_or_park(g, t);
				break;
			}
		}
	}
}

static void expire_mmio(struct guardian *g, int answer_all)
{
	uint64_t now = hv_now_ns();

	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];

		if (t->mmio_pending && (answer_all || now >= t->mmio_deadline_ns)) {
			g->mmio_timeouts++;
			answer_read(g, t, ~0ull);
			if (!answer_all)
				resume_or_park(g, t);
		}
	}
}

/* ---- stops ---------------------------------------------------------------------------------- */

static void resume_or_park(struct guardian *g, struct hv_thread *t)
{
	if (!t->stopped || t->mmio_pending)
		return;
	if (g->hold)
		return; /* parked: any stop satisfies a pending PTRACE_INTERRUPT */
	if (g->running)
		hv_resume(&g->tr, t, wants_syscall_stops(g, t));
}

/* At the entry of ioctl(settle_fd, KVM_RUN): a PTRACE_INTERRUPT makes the pending signal that
 * lets KVM finish the exit and return -EINTR before any guest instruction runs. */
static void settle_at_entry(struct guardian *g, struct hv_thread *t)
{
	if (ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0) {
		hv_log(&g->tr, "PTRACE_INTERRUPT %d for settling: %s", t->tid, strerror(errno));
		return;
	}
	t->settling = 1;
}

static int is_kvm_run_entry(struct hv_thread *t, int64_t fd)
{
	return t->stopped && t->stop_kind == HV_STOP_SYSCALL_ENTRY && t->syscall_nr == SYS_ioctl &&
	       t->syscall_args[1] == KVM_RUN && (int64_t)t->syscall_args[0] == fd;
}

static void on_stop(struct guardian *g, struct hv_thread *t)
{
	if (g->settle_fd >= 0 && is_kvm_run_entry(t, g->settle_fd) && !t->settling)
		settle_at_entry(g, t);
	if (t->settling && t->stop_kind == HV_STOP_SYSCALL_EXIT) {
		/* KVM_RUN finished the pending exit and returned (-EINTR): keep the thread here */
		t->settling = 0;
		t->in_kvm_run = 0;
		g->settled = 1;
		g->hold = 1;
		return;
	}
	switch (t->stop_kind) {
	case HV_STOP_SIGNAL:
		/* Deliver it now (hv_resume passes resume_sig), whatever the mode. This stop used up
		 * any pending PTRACE_INTERRUPT; stop_all() interrupts threads running again. */
		hv_resume(&g->tr, t, wants_syscall_stops(g, t));
		return;
	case HV_STOP_SYSCALL_ENTRY:
		if (t->syscall_nr == SYS_ioctl && t->syscall_args[1] == KVM_RUN) {
			struct hv_vcpu_map *v = vcpu_by_fd(g, (int64_t)t->syscall_args[0]);

			if (v) {
				t->in_kvm_run = 1;
				t->kvm_run_fd = v->target_fd;
				t->vcpu = (int8_t)v->index;
			}
		}
		break;
	case HV_STOP_SYSCALL_EXIT:
		if (t->in_kvm_run) {
			t->in_kvm_run = 0;
			on_kvm_run_exit(g, t);
		}
		break;
	default:
		break;
	}
	resume_or_park(g, t);
}

/* Collect every pending tracee status. */
static void reap(struct guardian *g)
{
	for (;;) {
		int status;
		pid_t tid = waitpid(-1, &status, WNOHANG | __WALL);
		struct hv_thread *t;

		if (tid <= 0)
			return;
		t = hv_note_status(&g->tr, tid, status);
		if (t && t->stopped)
			on_stop(g, t);
	}
}

/* One round of the event loop. Returns 1 when the control socket is readable (only watched
 * with watch_control), 0 otherwise. */
static int pump(struct guardian *g, int timeout_ms, int watch_control)
{
	struct pollfd fds[3] = {
		{.fd = g->signal_fd, .events = POLLIN},
		{.fd = g->mmio_fd, .events = POLLIN},
		{.fd = watch_control ? g->control_fd : -1, .events = POLLIN},
	};
	uint64_t now = hv_now_ns();
	int n;

	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];

		if (t->mmio_pending) {
			int64_t left = (int64_t)(t->mmio_deadline_ns - now) / 1000000;

			if (left < 0)
				left = 0;
			if (timeout_ms < 0 || left < timeout_ms)
				timeout_ms = (int)left + 1;
		}
	}
	n = poll(fds, 3, timeout_ms);
	if (n < 0 && errno != EINTR)
		hv_log(&g->tr, "poll: %s", strerror(errno));
	if (n > 0 && (fds[0].revents & POLLIN)) {
		struct signalfd_siginfo si;

		while (read(g->signal_fd, &si, sizeof(si)) == sizeof(si))
			if (si.ssi_signo != SIGCHLD) {
				hv_log(&g->tr, "signal %u: restoring the target and exiting", si.ssi_signo);
				g->shutdown = 1;
			}
	}
	reap(g);
	if (n > 0 && (fds[1].revents & POLLIN))
		on_mmio_replies(g);
	expire_mmio(g, 0);
	return n > 0 && watch_control && (fds[2].revents & (POLLIN | POLLHUP | POLLERR));
}

static int all_parked(struct guardian *g)
{
	for (int i = 0; i < g->tr.n_threads; i++)
		if (!g->tr.threads[i].stopped || g->tr.threads[i].interrupting)
			return 0;
	return 1;
}

static int stop_all(struct guardian *g, int timeout_ms)
{
	uint64_t deadline = hv_now_ns() + (uint64_t)timeout_ms * 1000000ull;

	g->hold = 1;
	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];

		if (hv_interrupt(&g->tr, t) < 0 && errno != ESRCH)
			hv_log(&g->tr, "PTRACE_INTERRUPT %d: %s", t->tid, strerror(errno));
	}
	while (!all_parked(g) && !g->tr.target_gone) {
		uint64_t now = hv_now_ns();

		if (now >= deadline) {
			hv_log(&g->tr, "threads did not stop within %d ms", timeout_ms);
			for (int i = 0; i < g->tr.n_threads; i++) {
				struct hv_thread *t = &g->tr.threads[i];

				hv_log(&g->tr, "  thread %d: stopped %d kind %d interrupting %d vcpu %d "
				       "mmio %d", t->tid, t->stopped, t->stop_kind, t->interrupting, t->vcpu,
				       t->mmio_pending);
			}
			return -ETIMEDOUT;
		}
		pump(g, (int)((deadline - now) / 1000000) + 1, 0);
		/* threads born meanwhile must stop too */
		for (int i = 0; i < g->tr.n_threads; i++)
			if (!g->tr.threads[i].stopped)
				hv_interrupt(&g->tr, &g->tr.threads[i]);
	}
	return g->tr.target_gone ? -ESRCH : 0;
}

static void resume_all(struct guardian *g)
{
	int err = hv_restore_injection_thread(&g->tr, g->running);

	if (err)
		hv_log(&g->tr, "restoring the injection thread: %s", strerror(-err));
	if (!g->running)
		return; /* held: signals wait with the threads */
	g->hold = 0;
	hv_redeliver_deferred(&g->tr);
	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];

		if (t->stopped && !t->mmio_pending)
			hv_resume(&g->tr, t, wants_syscall_stops(g, t));
	}
}


/* Exits whose effects KVM applies only at the next KVM_RUN (complete_userspace_io). */
static int exit_pending_completion(uint32_t reason)
{
	return reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO || reason == KVM_EXIT_HYPERCALL ||
	       reason == KVM_EXIT_X86_RDMSR || reason == KVM_EXIT_X86_WRMSR ||
	       reason == KVM_EXIT_XEN;
}

/* Make sure vCPU `fd` has no exit waiting for completion (see hv.h); every thread is stopped
 * on entry and on return. */
static int settle_vcpu(struct guardian *g, int32_t fd, uint32_t run_size, int timeout_ms,
		       struct dvs_hv_response *resp)
{
	struct hv_vcpu_map *v;
	uint64_t deadline;
	int err = 0, was_running = g->running;

	v = map_vcpu(g, fd, run_size, &err);
	if (!v) {
		fail(resp, err, "mapping kvm_run of vCPU fd %d: %s", fd, strerror(-err));
		return err;
	}
	if (!exit_pending_completion(v->run->exit_reason))
		return 0;
	g->settles++;
	g->settle_fd = fd;
	g->settled = 0;
	for (int i = 0; i < g->tr.n_threads; i++)
		if (is_kvm_run_entry(&g->tr.threads[i], fd))
			settle_at_entry(g, &g->tr.threads[i]);
	g->running = 1;
	resume_all(g);
	deadline = hv_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	while (!g->settled && !g->tr.target_gone && hv_now_ns() < deadline)
		pump(g, (int)((deadline - hv_now_ns()) / 1000000) + 1, 0);
	g->settle_fd = -1;
	g->running = was_running;
	err = stop_all(g, STOP_TIMEOUT_MS);
	if (!g->settled) {
		fail(resp, -EBUSY, "vCPU fd %d did not enter KVM_RUN again within %d ms", fd,
		     timeout_ms);
		return -EBUSY;
	}
	if (err)
		fail(resp, err, "stopping the target after settling: %s", strerror(-err));
	return err;
}

/* ---- injection with scratch data and undo entries ----------------------------------------- */

static int run_undo(struct guardian *g, struct hv_undo *u, int64_t *result)
{
	uint64_t args[6];

	if (u->len && hv_poke(&g->tr, g->scratch, u->data, u->len) < 0)
		return -EFAULT;
	for (int i = 0; i < 6; i++)
		args[i] = (u->arg_flags[i] & DVS_HV_UNDO_ARG_BUFFER) ? g->scratch : u->args[i];
	return hv_inject(&g->tr, u->nr, args, result);
}

static void op_syscall(struct guardian *g, const struct dvs_hv_request *req,
		       struct dvs_hv_response *resp)
{
	uint64_t args[6];
	int64_t result = 0;
	int err;

	if (req->in_len > DVS_HV_DATA_MAX || req->out_len > DVS_HV_DATA_MAX ||
	    req->in_len > g->scratch_size || req->out_len > g->scratch_size ||
	    req->undo_len > DVS_HV_UNDO_DATA_MAX || req->undo_len > g->scratch_size) {
		fail(resp, -EINVAL, "request data larger than the scratch buffer (%u bytes)",
		     g->scratch_size);
		return;
	}
	if ((req->scratch_args || req->in_len || req->out_len) && !g->scratch) {
		fail(resp, -EINVAL, "no scratch buffer in this session");
		return;
	}
	if (req->undo_nr >= 0 && g->n_undo >= HV_MAX_UNDO) {
		fail(resp, -ENOSPC, "undo log full (%d entries)", HV_MAX_UNDO);
		return;
	}
	for (int i = 0; i < 6; i++) {
		args[i] = req->args[i];
		if (req->scratch_args & (1u << i)) {
			if (args[i] >= g->scratch_size) {
				fail(resp, -EINVAL, "arg %d: scratch offset %llu out of range", i,
				     (unsigned long long)args[i]);
				return;
			}
			args[i] += g->scratch;
		}
	}
	if (req->settle_fd >= 0 &&
	    settle_vcpu(g, req->settle_fd, req->kvm_run_size, SETTLE_TIMEOUT_MS, resp) < 0)
		return;
	if (req->in_len && hv_poke(&g->tr, g->scratch, req->data, req->in_len) < 0) {
		fail(resp, -EFAULT, "copying %u bytes into the target's scratch", req->in_len);
		return;
	}
	err = hv_inject(&g->tr, req->nr, args, &result);
	if (err) {
		fail(resp, err, "injecting syscall %lld: %s", (long long)req->nr, strerror(-err));
		return;
	}
	resp->result = result;
	if (req->out_len) {
		if (hv_peek(&g->tr, g->scratch, resp->data, req->out_len) < 0) {
			fail(resp, -EFAULT, "copying %u bytes out of the target's scratch",
			     req->out_len);
			return;
		}
		resp->out_len = req->out_len;
	}
	if (result >= 0 && req->undo_nr >= 0) {
		struct hv_undo *u = &g->undo[g->n_undo++];

		memset(u, 0, sizeof(*u));
		u->id = ++g->next_undo_id;
		u->nr = req->undo_nr;
		for (int i = 0; i < 6; i++) {
			u->arg_flags[i] = req->undo_arg_flags[i];
			u->args[i] = (req->undo_arg_flags[i] & DVS_HV_UNDO_ARG_RESULT) ?
					     (uint64_t)result :
					     req->undo_args[i];
		}
		u->len = req->undo_len;
		memcpy(u->data, req->undo_data, req->undo_len);
		resp->undo_id = u->id;
	}
}

static void op_undo(struct guardian *g, const struct dvs_hv_request *req,
		    struct dvs_hv_response *resp)
{
	for (int i = g->n_undo - 1; i >= 0; i--) {
		if (g->undo[i].id == req->undo_id) {
			int64_t result = 0;
			int err = run_undo(g, &g->undo[i], &result);

			if (err) {
				fail(resp, err, "undo %d: %s", req->undo_id, strerror(-err));
				return;
			}
			resp->result = result;
			memmove(&g->undo[i], &g->undo[i + 1],
				(size_t)(g->n_undo - i - 1) * sizeof(g->undo[0]));
			g->n_undo--;
			return;
		}
	}
	fail(resp, -ENOENT, "no undo entry %d", req->undo_id);
}

static void op_bench(struct guardian *g, const struct dvs_hv_request *req,
		     struct dvs_hv_response *resp)
{
	uint64_t zero[6] = {0}, start = hv_now_ns();
	int64_t result = 0;

	for (uint64_t i = 0; i < req->args[0]; i++) {
		int err = hv_inject(&g->tr, req->nr, zero, &result);

		if (err) {
			fail(resp, err, "injection %llu: %s", (unsigned long long)i, strerror(-err));
			return;
		}
	}
	resp->result = (int64_t)(hv_now_ns() - start);
}

/* ---- MMIO trap ------------------------------------------------------------------------------- */

static void trap_release(struct guardian *g)
{
	expire_mmio(g, 1);
	for (int i = 0; i < g->n_vcpus; i++)
		g->vcpus[i].trapped = 0;
	g->trapping = 0;
	g->reads_from_bank = 0;
}

/* A thread interrupted out of KVM_RUN shows it in its registers: orig_rax = ioctl, rdi = the
 * vCPU fd, rsi = KVM_RUN. (Kernel worker threads would show the same stale values; they are
 * never seized.) */
static void classify_threads(struct guardian *g)
{
	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];
		struct user_regs_struct regs;
		struct hv_vcpu_map *v;

		if (!t->stopped || ptrace(PTRACE_GETREGS, t->tid, 0, &regs) < 0)
			continue;
		if (t->tid == g->tr.inject_tid && g->tr.inject_dirty)
			regs = g->tr.saved_regs;
		if (regs.orig_rax != SYS_ioctl || regs.rsi != KVM_RUN)
			continue;
		v = vcpu_by_fd(g, (int64_t)regs.rdi);
		if (v)
			t->vcpu = (int8_t)v->index;
	}
}

static void op_trap_start(struct guardian *g, const struct dvs_hv_request *req,
			  struct dvs_hv_response *resp)
{
	const struct dvs_hv_trap_config *cfg = (const void *)req->data;

	if (cfg->reads_from_shared_bank && !g->bank) {
		fail(resp, -EINVAL, "no shared bank in this session");
		return;
	}
	if (req->in_len < sizeof(*cfg) || cfg->n_vcpus == 0 || cfg->n_vcpus > DVS_HV_MAX_VCPUS ||
	    cfg->size == 0 || cfg->base + cfg->size < cfg->base || cfg->kvm_run_size < 4096 ||
	    cfg->kvm_run_size > (1u << 20)) {
		fail(resp, -EINVAL, "bad trap configuration");
		return;
	}
	if (g->trapping)
		trap_release(g);
	for (uint32_t i = 0; i < cfg->n_vcpus; i++) {
		int err = 0;
		struct hv_vcpu_map *v = map_vcpu(g, cfg->vcpus[i].fd, cfg->kvm_run_size, &err);

		if (!v) {
			fail(resp, err, "mapping kvm_run of vCPU fd %d: %s", cfg->vcpus[i].fd,
			     strerror(-err));
			trap_release(g);
			return;
		}
		v->index = cfg->vcpus[i].index;
		v->trapped = 1;
	}
	g->trap_base = cfg->base;
	g->trap_size = cfg->size;
	g->reply_timeout_ms = cfg->reply_timeout_ms ? cfg->reply_timeout_ms : 5000;
	g->reads_from_bank = cfg->reads_from_shared_bank && g->bank;
	classify_threads(g);
	g->trapping = 1;
}

/* ---- requests ------------------------------------------------------------------------------- */

static void fill_status(struct guardian *g, struct dvs_hv_status *st)
{
	memset(st, 0, sizeof(*st));
	st->n_threads = g->tr.n_threads;
	st->injection_tid = g->tr.inject_tid;
	st->running = g->running;
	st->trapping = g->trapping;
	st->n_undo = g->n_undo;
	st->n_deferred_signals = g->tr.n_deferred;
	st->injected_syscalls = g->tr.injected;
	st->signals_delivered = g->tr.signals_delivered;
	st->signals_redelivered = g->tr.signals_redelivered;
	st->mmio_reads = g->mmio_reads;
	st->mmio_writes = g->mmio_writes;
	st->mmio_timeouts = g->mmio_timeouts;
	st->kvm_run_exits = g->kvm_run_exits;
	st->threads_seen = g->tr.threads_seen;
	st->settles = g->settles;
	for (int i = 0; i < g->tr.n_threads; i++) {
		struct hv_thread *t = &g->tr.threads[i];

		st->n_stopped += t->stopped;
		st->n_vcpu_threads += t->vcpu >= 0;
		if (i < 64) {
			st->tids[i] = t->tid;
			st->tid_is_vcpu[i] = t->vcpu;
		}
	}
}

static int needs_stopped_threads(uint32_t op)
{
	return op == DVS_HV_OP_SYSCALL || op == DVS_HV_OP_UNDO || op == DVS_HV_OP_BENCH ||
	       op == DVS_HV_OP_TRAP_START || op == DVS_HV_OP_TRAP_STOP || op == DVS_HV_OP_HOLD;
}

static void handle_request(struct guardian *g, const struct dvs_hv_request *req,
			   struct dvs_hv_response *resp)
{
	memset(resp, 0, offsetof(struct dvs_hv_response, data));
	resp->seq = req->seq;
	if (g->tr.target_gone) {
		fail(resp, -ESRCH, "the target %d has exited", g->tr.pid);
		return;
	}
	if (needs_stopped_threads(req->op) && !g->hold) {
		int err = stop_all(g, STOP_TIMEOUT_MS);

		if (err) {
			fail(resp, err, "stopping the target's threads: %s", strerror(-err));
			resume_all(g);
			return;
		}
	}
	switch (req->op) {
	case DVS_HV_OP_PING:
		break;
	case DVS_HV_OP_SYSCALL:
		op_syscall(g, req, resp);
		break;
	case DVS_HV_OP_UNDO:
		op_undo(g, req, resp);
		break;
	case DVS_HV_OP_BENCH:
		op_bench(g, req, resp);
		break;
	case DVS_HV_OP_HOLD:
		g->running = 0;
		break;
	case DVS_HV_OP_RUN:
		g->running = 1;
		break;
	case DVS_HV_OP_TRAP_START:
		op_trap_start(g, req, resp);
		break;
	case DVS_HV_OP_TRAP_STOP:
		trap_release(g);
		break;
	case DVS_HV_OP_STATUS:
		fill_status(g, (struct dvs_hv_status *)resp->data);
		resp->out_len = sizeof(struct dvs_hv_status);
		break;
	default:
		fail(resp, -EINVAL, "unknown request %u", req->op);
		break;
	}
	/* Threads run again after every request when dvs wants them running. */
	if (g->running && !g->tr.target_gone)
		resume_all(g);
}

/* ---- leaving the target as it was ----------------------------------------------------------- */

static void release_target(struct guardian *g)
{
	if (g->tr.target_gone || g->tr.n_threads == 0)
		goto out;
	g->running = 0;
	if (stop_all(g, STOP_TIMEOUT_MS) < 0)
		hv_log(&g->tr, "not every thread stopped; restoring what is stopped");
	if (g->trapping)
		trap_release(g); /* pending reads answered with all-ones, rax = -EINTR */
	for (int i = g->n_undo - 1; i >= 0; i--) {
		int64_t result = 0;
		int err = run_undo(g, &g->undo[i], &result);

		if (err || result < 0)
			hv_log(&g->tr, "undo entry %d (syscall %lld): %s", g->undo[i].id,
			       (long long)g->undo[i].nr, strerror(err ? -err : (int)-result));
	}
	g->n_undo = 0;
	if (g->scratch) {
		uint64_t args[6] = {g->scratch, g->scratch_size, 0, 0, 0, 0};
		int64_t result = 0;

		if (hv_inject(&g->tr, SYS_munmap, args, &result) < 0 || result < 0)
			hv_log(&g->tr, "unmapping the scratch buffer failed");
		g->scratch = 0;
	}
	if (hv_restore_injection_thread(&g->tr, 0) < 0)
		hv_log(&g->tr, "could not restore the injection thread's registers");
	hv_detach_all(&g->tr);
	hv_redeliver_deferred(&g->tr);
out:
	trap_release(g);
	for (int i = 0; i < g->n_vcpus; i++) {
		munmap(g->vcpus[i].run, g->kvm_run_size);
		close(g->vcpus[i].local_fd);
	}
	g->n_vcpus = 0;
}

/* ---- the guardian's life ----------------------------------------------------------------------- */

static void send_response(struct guardian *g, struct dvs_hv_response *resp)
{
	size_t len = offsetof(struct dvs_hv_response, data) + resp->out_len;

	if (send(g->control_fd, resp, len, MSG_NOSIGNAL) < 0)
		hv_log(&g->tr, "sending a response: %s", strerror(errno));
}

static int setup_process(struct guardian *g, const struct dvs_hv_guardian_args *a)
{
	sigset_t mask;
	int null_fd;

	setsid(); /* no terminal signals from dvs's process group */
	prctl(PR_SET_NAME, "dvs-guardian", 0, 0, 0);
	prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0);
	signal(SIGPIPE, SIG_IGN);
	for (int s = 1; s < NSIG; s++)
		if (s != SIGKILL && s != SIGSTOP && s != SIGPIPE)
			signal(s, SIG_DFL);
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	sigaddset(&mask, SIGQUIT);
	/* the fork left every signal blocked; keep exactly these blocked for the signalfd */
	sigprocmask(SIG_SETMASK, &mask, NULL);

	/* Keep only our ends of the sockets (and the log): dvs must see EOF the moment it dies,
	 * which an inherited copy of its end in here would prevent. */
	if (dup2(a->control_fd, 3) < 0 || dup2(a->mmio_fd, 4) < 0)
		return -errno;
	g->control_fd = 3;
	g->mmio_fd = 4;
	g->tr.log_fd = -1;
	if (a->log_fd >= 0 && dup2(a->log_fd, 5) == 5)
		g->tr.log_fd = 5;
	syscall(SYS_close_range, g->tr.log_fd >= 0 ? 6 : 5, ~0u, 0);
	null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (null_fd >= 0) {
		dup2(null_fd, 0);
		dup2(null_fd, 1);
		dup2(null_fd, 2);
		close(null_fd);
	}
	g->signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (g->signal_fd < 0)
		return -errno;
	return 0;
}

static int attach(struct guardian *g, const struct dvs_hv_guardian_args *a,
		  struct dvs_hv_response *resp)
{
	long word;
	int err;

	g->target_pidfd = (int)syscall(__NR_pidfd_open, a->pid, 0);
	if (g->target_pidfd < 0) {
		fail(resp, -errno, "pidfd_open(%d): %s", a->pid, strerror(errno));
		return resp->error;
	}
	err = hv_seize_all(&g->tr, resp->message, sizeof(resp->message));
	if (err) {
		resp->error = err;
		return err;
	}
	g->hold = 1;
	err = stop_all(g, (int)a->attach_timeout_ms);
	if (err) {
		fail(resp, err, "threads of %d did not stop: %s", a->pid, strerror(-err));
		return err;
	}
	g->tr.inject_tid = hv_thread_find(&g->tr, a->pid) ? a->pid : g->tr.threads[0].tid;
	/* PEEKTEXT reads like a debugger does (the vDSO is not readable through every path) */
	errno = 0;
	word = ptrace(PTRACE_PEEKTEXT, g->tr.inject_tid, (void *)(uintptr_t)a->syscall_insn, 0);
	if (errno || (word & 0xffff) != 0x050f) {
		fail(resp, -EINVAL, "no syscall instruction at %#llx in %d",
		     (unsigned long long)a->syscall_insn, a->pid);
		return -EINVAL;
	}
	g->tr.syscall_insn = a->syscall_insn;
	if (!(a->flags & DVS_HV_START_SKIP_SCRATCH)) {
		uint64_t args[6] = {0, a->scratch_size, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, (uint64_t)-1, 0};
		int64_t result = 0;

		err = hv_inject(&g->tr, SYS_mmap, args, &result);
		if (err || (result < 0 && result > -4096)) {
			fail(resp, err ? err : (int)result, "mapping scratch memory in %d: %s",
			     a->pid, strerror(err ? -err : (int)-result));
			return resp->error;
		}
		g->scratch = (uint64_t)result;
		g->scratch_size = a->scratch_size;
	}
	return 0;
}

void dvs_hv_guardian_main(const struct dvs_hv_guardian_args *a)
{
	struct guardian *g = &G;
	struct dvs_hv_response *resp = &response_buf;
	int err;

	memset(g, 0, sizeof(*g));
	g->tr.pid = a->pid;
	g->bank = a->shared_bank;
	g->bank_size = a->shared_bank_size;
	g->target_pidfd = -1;
	g->signal_fd = -1;
	g->settle_fd = -1;
	memset(resp, 0, offsetof(struct dvs_hv_response, data));
	err = setup_process(g, a);
	if (err) {
		/* cannot even talk to dvs properly; the target was not touched */
		_exit(2);
	}
	err = attach(g, a, resp);
	if (err) {
		hv_log(&g->tr, "attach failed: %s", resp->message);
		release_target(g);
		send_response(g, resp);
		_exit(1);
	}
	resp->result = (int64_t)g->scratch;
	fill_status(g, (struct dvs_hv_status *)resp->data);
	resp->out_len = sizeof(struct dvs_hv_status);
	send_response(g, resp);

	while (!g->shutdown) {
		ssize_t n;

		if (!pump(g, -1, 1))
			continue;
		n = recv(g->control_fd, &request_buf, sizeof(request_buf), MSG_DONTWAIT);
		if (n == 0)
			break; /* dvs is gone */
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			break;
		}
		if ((size_t)n < offsetof(struct dvs_hv_request, data) ||
		    (size_t)n < offsetof(struct dvs_hv_request, data) + request_buf.in_len) {
			memset(resp, 0, offsetof(struct dvs_hv_response, data));
			resp->seq = request_buf.seq;
			fail(resp, -EPROTO, "short request (%zd bytes)", n);
			send_response(g, resp);
			continue;
		}
		if (request_buf.op == DVS_HV_OP_DETACH) {
			memset(resp, 0, offsetof(struct dvs_hv_response, data));
			resp->seq = request_buf.seq;
			release_target(g);
			send_response(g, resp);
			_exit(0);
		}
		handle_request(g, &request_buf, resp);
		send_response(g, resp);
	}
	release_target(g);
	_exit(0);
}
