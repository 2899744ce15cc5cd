/*
 * tracer.h -- the guardian's ptrace core (internal to csrc/ptrace/; see hv.h for the design).
 *
 * Kernel semantics relied on:
 *  - PTRACE_SEIZE attaches without stopping; PTRACE_INTERRUPT then stops the thread in a
 *    PTRACE_EVENT_STOP (reported as status>>16 == PTRACE_EVENT_STOP, WSTOPSIG == SIGTRAP). A
 *    thread blocked in a syscall leaves it first: restartable syscalls return -ERESTART*, which
 *    the kernel turns into a restart (rip -= 2, rax = orig_rax) only when the thread leaves the
 *    stop with orig_rax >= 0; ioctl(KVM_RUN) returns -EINTR and frees the vCPU's mutex.
 *  - PTRACE_O_TRACECLONE: a traced thread's new threads are traced from birth and report a
 *    PTRACE_EVENT_STOP first; the parent reports PTRACE_EVENT_CLONE (GETEVENTMSG = new tid).
 *  - PTRACE_O_TRACESYSGOOD: syscall stops report SIGTRAP|0x80; PTRACE_GET_SYSCALL_INFO (5.3)
 *    says entry or exit and gives nr/args or the return value in one call.
 *  - Any other stop without an event is a signal-delivery-stop: the signal is delivered only if
 *    the tracer passes it in the resuming request's data argument; passing 0 discards it.
 *  - Kernel "user worker" threads (PF_USER_WORKER, e.g. KVM's kvm-nx-lpage-recovery thread)
 *    sit in the thread list but never run user code; their /proc/.../syscall and registers
 *    are a stale copy of the vCPU thread that created them. They are never seized.
 *  - waitpid(-1, __WALL) reports every traced thread (they are our "children"); stops of
 *    tracees also raise SIGCHLD, which the guardian reads from a signalfd.
 */
#ifndef DVS_PTRACE_TRACER_H
#define DVS_PTRACE_TRACER_H

#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

#define HV_MAX_THREADS 512
#define HV_MAX_DEFERRED 64
#define PF_USER_WORKER_FLAG 0x00004000 /* include/linux/sched.h, 6.4+ */

enum hv_stop_kind {
	HV_STOP_NONE = 0,
	HV_STOP_EVENT,         /* PTRACE_EVENT_STOP: interrupt, group-stop, or birth */
	HV_STOP_SYSCALL_ENTRY,
	HV_STOP_SYSCALL_EXIT,
	HV_STOP_SIGNAL,        /* signal-delivery-stop; resume_sig holds the signal */
	HV_STOP_CLONE,         /* PTRACE_EVENT_CLONE/FORK/VFORK */
	HV_STOP_OTHER,         /* another ptrace event (exec, exit...) */
};

struct hv_thread {
	int32_t tid;
	uint8_t stopped;       /* in a ptrace-stop we have not resumed from */
	uint8_t stop_kind;
	uint8_t interrupting;  /* PTRACE_INTERRUPT sent and no stop seen since (any stop ends it) */
	uint8_t in_kvm_run;    /* between entry and exit of ioctl(vcpu fd, KVM_RUN) */
	uint8_t mmio_pending;  /* stopped at a KVM_RUN exit, waiting for dvs's answer */
	uint8_t settling;      /* interrupted at a KVM_RUN entry to complete a pending exit */
	int8_t vcpu;           /* vCPU index last seen in KVM_RUN on this thread, -1 none */
	int32_t resume_sig;    /* signal to deliver at the next resume */
	int32_t kvm_run_fd;    /* target fd of the KVM_RUN in progress */
	uint64_t syscall_nr;   /* at a syscall stop: the syscall (entry args below) */
	uint64_t syscall_args[6];
	int64_t syscall_rval;  /* at an exit stop */
	uint64_t mmio_seq;
	uint64_t mmio_deadline_ns;
};

struct hv_deferred_signal {
	int32_t tid;
	siginfo_t info;
};

struct hv_tracer {
	int32_t pid;
	int log_fd;
	int target_gone;
	struct hv_thread threads[HV_MAX_THREADS];
	int n_threads;
	uint64_t threads_seen;
	/* injection */
	int32_t inject_tid;
	uint64_t syscall_insn;
	int inject_dirty;      /* the injection thread's registers are ours, saved_regs its own */
	struct user_regs_struct saved_regs;
	uint64_t injected;
	/* signals held back while the injection thread ran our syscalls */
	struct hv_deferred_signal deferred[HV_MAX_DEFERRED];
	int n_deferred;
	uint64_t signals_delivered;
	uint64_t signals_redelivered;
};

void hv_log(struct hv_tracer *tr, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t hv_now_ns(void);

struct hv_thread *hv_thread_find(struct hv_tracer *tr, int32_t tid);
struct hv_thread *hv_thread_add(struct hv_tracer *tr, int32_t tid);
void hv_thread_remove(struct hv_tracer *tr, struct hv_thread *t);

/* PTRACE_SEIZE + PTRACE_INTERRUPT every (non-worker) thread of tr->pid, rescanning
 * /proc/PID/task until a pass finds no new thread. Does not wait for the stops. */
int hv_seize_all(struct hv_tracer *tr, char *message, size_t message_len);

/* Decode one waitpid status of `tid` into the thread table (adds unknown threads of the
 * target, removes exited ones). Returns the thread, or NULL when it is gone. */
struct hv_thread *hv_note_status(struct hv_tracer *tr, int32_t tid, int status);

int hv_interrupt(struct hv_tracer *tr, struct hv_thread *t);
/* Resume a stopped thread: syscall_stops != 0 -> PTRACE_SYSCALL, else PTRACE_CONT; passes
 * and clears t->resume_sig. */
int hv_resume(struct hv_tracer *tr, struct hv_thread *t, int syscall_stops);

/* Run one syscall in the injection thread (stopped). 0 and *result, or -errno of the
 * mechanism (-ESRCH: target gone). */
int hv_inject(struct hv_tracer *tr, int64_t nr, const uint64_t args[6], int64_t *result);
/* Give the injection thread back its own registers (no-op when clean). `will_continue`: it
 * is about to be resumed with PTRACE_CONT/SYSCALL rather than detached. */
int hv_restore_injection_thread(struct hv_tracer *tr, int will_continue);
/* Re-queue held-back signals to the target. */
void hv_redeliver_deferred(struct hv_tracer *tr);
/* PTRACE_DETACH every stopped thread (the caller stops them first). */
void hv_detach_all(struct hv_tracer *tr);

/* remote memory */
int hv_peek(struct hv_tracer *tr, uint64_t address, void *dst, size_t len);
int hv_poke(struct hv_tracer *tr, uint64_t address, const void *src, size_t len);

#endif /* DVS_PTRACE_TRACER_H */
