/*
 * tracer.c -- the guardian's ptrace core: seizing, decoding stops, syscall injection through
 * an existing `syscall` instruction, register restore, signal re-delivery, detach.
 * See tracer.h for the kernel semantics relied on; it runs only inside the guardian child
 * (forked from a possibly multi-threaded Python), so it sticks to raw syscalls, stack or
 * static buffers, and snprintf for text: no malloc, no stdio streams, no locks.
 */
#include "ptrace/tracer.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "compat.h"

/* Restart codes a syscall interrupted by a signal or PTRACE_INTERRUPT returns (kernel-internal,
 * include/linux/errno.h); the kernel acts on them when the thread leaves its stop. */
#define ERESTARTSYS 512
#define ERESTARTNOINTR 513
#define ERESTARTNOHAND 514
#define ERESTART_RESTARTBLOCK 516

void hv_log(struct hv_tracer *tr, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	if (tr->log_fd < 0)
		return;
	n = snprintf(line, sizeof(line), "dvs-guardian[%d]: ", (int)getpid());
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(tr->log_fd, line, (size_t)n) < 0) {
		/* nowhere left to report it */
	}
}

uint64_t hv_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- the thread table ---------------------------------------------------------------------- */

struct hv_thread *hv_thread_find(struct hv_tracer *tr, int32_t tid)
{
	for (int i = 0; i < tr->n_threads; i++)
		if (tr->threads[i].tid == tid)
			return &tr->threads[i];
	return NULL;
}

struct hv_thread *hv_thread_add(struct hv_tracer *tr, int32_t tid)
{
	struct hv_thread *t = hv_thread_find(tr, tid);

	if (t)
		return t;
	if (tr->n_threads >= HV_MAX_THREADS)
		return NULL;
	t = &tr->threads[tr->n_threads++];
	memset(t, 0, sizeof(*t));
	t->tid = tid;
	t->vcpu = -1;
	t->kvm_run_fd = -1;
	tr->threads_seen++;
	return t;
}

void hv_thread_remove(struct hv_tracer *tr, struct hv_thread *t)
{
	int index = (int)(t - tr->threads);

	if (index < 0 || index >= tr->n_threads)
		return;
	tr->threads[index] = tr->threads[tr->n_threads - 1];
	tr->n_threads--;
}

/* ---- seizing -------------------------------------------------------------------------------- */

/* Parse the flags field (9th) of /proc/PID/task/TID/stat; -1 if the thread is gone. */
static long task_flags(int32_t pid, int32_t tid)
{
	char path[64], buf[1024];
	int fd;
	ssize_t n;
	char *p;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", pid, tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* comm may contain spaces and parentheses */
	if (!p)
		return -1;
	p++;
	/* fields after comm: state ppid pgrp session tty_nr tpgid flags */
	for (int field = 0; field < 7; field++) {
		while (*p == ' ')
			p++;
		if (field == 6)
			return strtol(p, NULL, 10);
		while (*p && *p != ' ')
			p++;
	}
	return -1;
}

struct linux_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/* One pass over /proc/PID/task: seize + interrupt every thread not yet in the table.
 * Returns the number of threads newly seized, or -errno. */
static int seize_pass(struct hv_tracer *tr, char *message, size_t message_len)
{
	char path[64];
	char buf[4096] __attribute__((aligned(8)));
	int dirfd, added = 0;
	const long options = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE;

	snprintf(path, sizeof(path), "/proc/%d/task", tr->pid);
	dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0) {
		snprintf(message, message_len, "cannot list %s: %s", path, strerror(errno));
		return -ESRCH;
	}
	for (;;) {
		long n = syscall(SYS_getdents64, dirfd, buf, sizeof(buf));

		if (n < 0) {
			int err = errno;
			close(dirfd);
			snprintf(message, message_len, "reading %s: %s", path, strerror(err));
			return -err;
		}
		if (n == 0)
			break;
		for (long off = 0; off < n;) {
			struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
			int32_t tid;
			struct hv_thread *t;
			long flags;

			off += d->d_reclen;
			if (d->d_name[0] < '0' || d->d_name[0] > '9')
				continue;
			tid = (int32_t)strtol(d->d_name, NULL, 10);
			if (hv_thread_find(tr, tid))
				continue;
			flags = task_flags(tr->pid, tid);
			if (flags < 0)
				continue; /* exited meanwhile */
			if (flags & PF_USER_WORKER_FLAG)
				continue; /* a kernel worker in the thread group: never runs user code */
			if (ptrace(PTRACE_SEIZE, tid, 0, (void *)options) < 0) {
				int err = errno;
				if (err == ESRCH)
					continue; /* exited meanwhile */
				close(dirfd);
				snprintf(message, message_len, "PTRACE_SEIZE of thread %d of %d: %s", tid,
					 tr->pid, strerror(err));
				return -err;
			}
			t = hv_thread_add(tr, tid);
			if (!t) {
				ptrace(PTRACE_DETACH, tid, 0, 0);
				close(dirfd);
				snprintf(message, message_len, "more than %d threads", HV_MAX_THREADS);
				return -E2BIG;
			}
			if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) == 0)
				t->interrupting = 1;
			added++;
		}
	}
	close(dirfd);
	return added;
}

int hv_seize_all(struct hv_tracer *tr, char *message, size_t message_len)
{
	/* A thread we have not seized yet can create threads that TRACECLONE does not catch, so
	 * rescan until a whole pass finds nothing new; seized threads are interrupted at once and
	 * their children are traced from birth. */
	for (int pass = 0; pass < 64; pass++) {
		int added = seize_pass(tr, message, message_len);

		if (added < 0)
			return added;
		if (added == 0)
			return tr->n_threads > 0 ? 0 : -ESRCH;
	}
	snprintf(message, message_len, "threads of %d keep appearing faster than they are seized",
		 tr->pid);
	return -EAGAIN;
}

/* ---- stops ---------------------------------------------------------------------------------- */

static void read_syscall_info(struct hv_thread *t)
{
	struct __ptrace_syscall_info info;

	memset(&info, 0, sizeof(info));
	if (ptrace(PTRACE_GET_SYSCALL_INFO, t->tid, (void *)sizeof(info), &info) < 0) {
		t->stop_kind = HV_STOP_OTHER;
		return;
	}
	if (info.op == PTRACE_SYSCALL_INFO_ENTRY) {
		t->stop_kind = HV_STOP_SYSCALL_ENTRY;
		t->syscall_nr = info.entry.nr;
		memcpy(t->syscall_args, info.entry.args, sizeof(t->syscall_args));
	} else if (info.op == PTRACE_SYSCALL_INFO_EXIT) {
		t->stop_kind = HV_STOP_SYSCALL_EXIT;
		t->syscall_rval = info.exit.rval;
	} else {
		t->stop_kind = HV_STOP_OTHER;
	}
}

struct hv_thread *hv_note_status(struct hv_tracer *tr, int32_t tid, int status)
{
	struct hv_thread *t = hv_thread_find(tr, tid);

	if (WIFEXITED(status) || WIFSIGNALED(status)) {
		if (t)
			hv_thread_remove(tr, t);
		if (tid == tr->pid && tr->n_threads == 0)
			tr->target_gone = 1;
		if (tr->n_threads == 0)
			tr->target_gone = 1;
		return NULL;
	}
	if (!WIFSTOPPED(status))
		return t;
	if (!t) {
		/* A thread born traced whose birth stop overtook its parent's clone event. */
		t = hv_thread_add(tr, tid);
		if (!t)
			return NULL;
	}
	t->stopped = 1;
	t->resume_sig = 0;
	/* Any ptrace-stop consumes a pending PTRACE_INTERRUPT (ptrace_stop() clears
	 * JOBCTL_TRAP_STOP), so the thread will not report a separate interrupt stop. */
	t->interrupting = 0;
	{
		int sig = WSTOPSIG(status);
		int event = (unsigned)status >> 16;

		if (sig == (SIGTRAP | 0x80)) {
			read_syscall_info(t);
		} else if (event == PTRACE_EVENT_STOP) {
			t->stop_kind = HV_STOP_EVENT;
		} else if (event == PTRACE_EVENT_CLONE || event == PTRACE_EVENT_FORK ||
			   event == PTRACE_EVENT_VFORK) {
			unsigned long child = 0;

			t->stop_kind = HV_STOP_CLONE;
			if (event == PTRACE_EVENT_CLONE &&
			    ptrace(PTRACE_GETEVENTMSG, tid, 0, &child) == 0 && child > 0) {
				/* hv_thread_add may move entries: look ourselves up again after */
				hv_thread_add(tr, (int32_t)child);
				t = hv_thread_find(tr, tid);
			}
		} else if (event != 0) {
			t->stop_kind = HV_STOP_OTHER;
		} else {
			t->stop_kind = HV_STOP_SIGNAL;
			t->resume_sig = sig;
		}
	}
	return t;
}

int hv_interrupt(struct hv_tracer *tr, struct hv_thread *t)
{
	(void)tr;
	if (t->stopped || t->interrupting)
		return 0;
	if (ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0)
		return -errno;
	t->interrupting = 1;
	return 0;
}

int hv_resume(struct hv_tracer *tr, struct hv_thread *t, int syscall_stops)
{
	long sig = t->resume_sig;

	if (!t->stopped)
		return 0;
	if (ptrace(syscall_stops ? PTRACE_SYSCALL : PTRACE_CONT, t->tid, 0, (void *)sig) < 0)
		return -errno;
	if (sig)
		tr->signals_delivered++;
	t->resume_sig = 0;
	t->stopped = 0;
	t->stop_kind = HV_STOP_NONE;
	return 0;
}

/* ---- injection ----------------------------------------------------------------------------- */

static void defer_signal(struct hv_tracer *tr, struct hv_thread *t, int sig)
{
	struct hv_deferred_signal *d;

	if (tr->n_deferred >= HV_MAX_DEFERRED) {
		hv_log(tr, "more than %d signals held back; delivering %d now", HV_MAX_DEFERRED, sig);
		kill(tr->pid, sig);
		return;
	}
	d = &tr->deferred[tr->n_deferred++];
	d->tid = t->tid;
	memset(&d->info, 0, sizeof(d->info));
	if (ptrace(PTRACE_GETSIGINFO, t->tid, 0, &d->info) < 0) {
		d->info.si_signo = sig;
		d->info.si_code = SI_USER;
	}
	hv_log(tr, "held back signal %d (code %d) from thread %d during injection", sig,
	       d->info.si_code, t->tid);
}

/* Does the thread, given back registers `regs`, still have the kernel's syscall-restart
 * decision ahead of it (an interrupted restartable syscall)? */
static int restart_pending(const struct user_regs_struct *regs)
{
	int64_t rax = (int64_t)regs->rax;

	return (int64_t)regs->orig_rax >= 0 &&
	       (rax == -ERESTARTSYS || rax == -ERESTARTNOINTR || rax == -ERESTARTNOHAND ||
		rax == -ERESTART_RESTARTBLOCK);
}

static int wait_thread(struct hv_tracer *tr, int32_t tid, int *status)
{
	for (;;) {
		pid_t got = waitpid(tid, status, __WALL);

		if (got == tid)
			return 0;
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			int err = errno;
			hv_log(tr, "waitpid(%d): %s", tid, strerror(err));
			return -err;
		}
	}
}

/* Bring the stopped injection thread to a stop we can inject from: an interrupt stop or the
 * exit stop of a syscall. At a syscall-entry stop the pending syscall is skipped now and
 * re-executed when the thread gets its registers back; at a clone/exec event stop the syscall
 * is finished first (its return value is written after the event). */
static int make_clean_stop(struct hv_tracer *tr, struct hv_thread **tp)
{
	struct hv_thread *t = *tp;
	int guard = 0;

	while (t->stop_kind != HV_STOP_EVENT && t->stop_kind != HV_STOP_SYSCALL_EXIT) {
		int status, err;

		if (guard++ > 16)
			return -EPROTO;
		if (t->stop_kind == HV_STOP_SYSCALL_ENTRY) {
			struct user_regs_struct regs;

			if (tr->inject_dirty)
				return -EPROTO; /* cannot happen: our syscalls end in exit stops */
			if (ptrace(PTRACE_GETREGS, t->tid, 0, &regs) < 0)
				return -errno;
			/* it has not run yet: give it back as "about to execute" */
			tr->saved_regs = regs;
			tr->saved_regs.rax = regs.orig_rax;
			tr->saved_regs.rip = regs.rip - 2;
			tr->saved_regs.orig_rax = (unsigned long long)-1;
			regs.orig_rax = (unsigned long long)-1; /* skip it now */
			if (ptrace(PTRACE_SETREGS, t->tid, 0, &regs) < 0)
				return -errno;
			tr->inject_dirty = 1;
		} else if (t->stop_kind == HV_STOP_SIGNAL) {
			defer_signal(tr, t, t->resume_sig);
		}
		t->resume_sig = 0;
		if (ptrace(PTRACE_SYSCALL, t->tid, 0, 0) < 0)
			return -errno;
		t->stopped = 0;
		err = wait_thread(tr, t->tid, &status);
		if (err)
			return err;
		t = hv_note_status(tr, tr->inject_tid, status);
		if (!t)
			return -ESRCH;
		*tp = t;
	}
	return 0;
}

int hv_inject(struct hv_tracer *tr, int64_t nr, const uint64_t args[6], int64_t *result)
{
	struct hv_thread *t = hv_thread_find(tr, tr->inject_tid);
	struct user_regs_struct regs;
	int entered = 0, err;

	if (!t || tr->target_gone)
		return -ESRCH;
	if (!t->stopped)
		return -EBUSY;
	err = make_clean_stop(tr, &t);
	if (err)
		return err;
	if (!tr->inject_dirty && ptrace(PTRACE_GETREGS, t->tid, 0, &tr->saved_regs) < 0)
		return -errno;
	regs = tr->saved_regs;
	regs.rip = tr->syscall_insn;
	regs.rax = (unsigned long long)nr;
	regs.orig_rax = (unsigned long long)-1; /* no kernel restart logic on the way out */
	regs.rdi = args[0];
	regs.rsi = args[1];
	regs.rdx = args[2];
	regs.r10 = args[3];
	regs.r8 = args[4];
	regs.r9 = args[5];
	if (ptrace(PTRACE_SETREGS, t->tid, 0, &regs) < 0)
		return -errno;
	tr->inject_dirty = 1;
	t->resume_sig = 0;
	if (ptrace(PTRACE_SYSCALL, t->tid, 0, 0) < 0)
		return -errno;
	t->stopped = 0;
	for (;;) {
		int status;

		err = wait_thread(tr, t->tid, &status);
		if (err)
			return err;
		t = hv_note_status(tr, tr->inject_tid, status);
		if (!t)
			return -ESRCH; /* the injection thread died */
		if (t->stop_kind == HV_STOP_SYSCALL_ENTRY) {
			if ((int64_t)t->syscall_nr != nr) {
				hv_log(tr, "entered syscall %llu, expected %lld",
				       (unsigned long long)t->syscall_nr, (long long)nr);
				return -EPROTO;
			}
			entered = 1;
		} else if (t->stop_kind == HV_STOP_SYSCALL_EXIT) {
			if (entered)
				break;
		} else if (t->stop_kind == HV_STOP_SIGNAL) {
			/* Not now: the thread runs our registers. It gets the signal back later. */
			defer_signal(tr, t, t->resume_sig);
			t->resume_sig = 0;
		}
		/* event stops (group-stop, a late interrupt) and anything else: keep going */
		if (ptrace(PTRACE_SYSCALL, t->tid, 0, 0) < 0)
			return -errno;
		t->stopped = 0;
	}
	if (ptrace(PTRACE_GETREGS, t->tid, 0, &regs) < 0)
		return -errno;
	if (regs.rip != tr->syscall_insn + 2) {
		hv_log(tr, "after the injected syscall rip is %#llx, expected %#llx",
		       (unsigned long long)regs.rip, (unsigned long long)(tr->syscall_insn + 2));
		return -EPROTO;
	}
	*result = (int64_t)regs.rax;
	tr->injected++;
	return 0;
}

int hv_restore_injection_thread(struct hv_tracer *tr, int will_continue)
{
	struct hv_thread *t = hv_thread_find(tr, tr->inject_tid);

	if (!tr->inject_dirty)
		return 0;
	if (!t)
		return -ESRCH;
	if (!t->stopped)
		return -EBUSY;
	if (ptrace(PTRACE_SETREGS, t->tid, 0, &tr->saved_regs) < 0)
		return -errno;
	tr->inject_dirty = 0;
	/* The thread sits at the exit stop of our last syscall. PTRACE_DETACH sets TIF_SIGPENDING,
	 * so on its way out the kernel runs get_signal() and then its restart-or-EINTR decision
	 * on these registers, exactly as it would have without us. PTRACE_CONT does not: a
	 * PTRACE_INTERRUPT now makes it pass through get_signal() (an extra event stop) first. */
	if (will_continue && restart_pending(&tr->saved_regs) &&
	    ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0)
		return -errno;
	return 0;
}

void hv_redeliver_deferred(struct hv_tracer *tr)
{
	for (int i = 0; i < tr->n_deferred; i++) {
		struct hv_deferred_signal *d = &tr->deferred[i];
		int sig = d->info.si_signo;
		long ret;

		if (d->info.si_code == SI_TKILL) {
			/* was aimed at this thread */
			ret = syscall(SYS_tgkill, tr->pid, d->tid, sig);
		} else if (d->info.si_code < 0) {
			/* sigqueue-style: the kernel lets us re-queue the same siginfo */
			ret = syscall(SYS_rt_sigqueueinfo, tr->pid, sig, &d->info);
		} else {
			/* kill() or kernel-generated: the kernel forbids forging the origin, so the
			 * same signal number goes to the process again */
			ret = kill(tr->pid, sig);
		}
		if (ret < 0)
			hv_log(tr, "re-delivering signal %d: %s", sig, strerror(errno));
		else
			tr->signals_redelivered++;
	}
	tr->n_deferred = 0;
}

void hv_detach_all(struct hv_tracer *tr)
{
	for (int i = 0; i < tr->n_threads; i++) {
		struct hv_thread *t = &tr->threads[i];
		long sig = t->stop_kind == HV_STOP_SIGNAL ? t->resume_sig : 0;

		if (ptrace(PTRACE_DETACH, t->tid, 0, (void *)sig) < 0 && errno != ESRCH)
			hv_log(tr, "PTRACE_DETACH of %d: %s", t->tid, strerror(errno));
	}
	tr->n_threads = 0;
}

/* ---- remote memory -------------------------------------------------------------------------- */

int hv_peek(struct hv_tracer *tr, uint64_t address, void *dst, size_t len)
{
	struct iovec local = {dst, len};
	struct iovec remote = {(void *)(uintptr_t)address, len};
	ssize_t n = process_vm_readv(tr->pid, &local, 1, &remote, 1, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EFAULT;
}

int hv_poke(struct hv_tracer *tr, uint64_t address, const void *src, size_t len)
{
	struct iovec local = {(void *)src, len};
	struct iovec remote = {(void *)(uintptr_t)address, len};
	ssize_t n = process_vm_writev(tr->pid, &local, 1, &remote, 1, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EFAULT;
}
