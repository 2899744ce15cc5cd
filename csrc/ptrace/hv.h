/*
 * hv.h -- acting inside a running hypervisor from outside: the guardian tracer and its wire
 * protocol (the Python side is dvs/lowlevel/ptrace.py, the policy dvs/hypervisor/).
 *
 * Why a separate process. ptrace belongs to the tracing *thread*, and a tracee whose tracer
 * dies is detached by the kernel as it is: if that happens in the middle of a syscall
 * injection, the hypervisor resumes with our registers and crashes. So dvs never traces the
 * hypervisor itself: dvs_hv_start() forks a small single-threaded C child (the guardian, in
 * its own session, all inherited fds closed) that seizes the target and does every ptrace
 * operation. It serves requests on a SOCK_SEQPACKET control socket and, when that socket
 * reaches EOF (dvs exited, was SIGKILLed, or closed it) or the guardian gets SIGTERM/SIGINT/
 * SIGHUP, it undoes everything it did inside the target (in reverse order), restores the
 * injection thread's registers, detaches from every thread, re-delivers the signals it held
 * back, and exits. dvs dying at any point therefore leaves the hypervisor as it was.
 *
 * Injection (guardian.c): one thread (the main thread unless it is gone) is used. Its
 * registers are saved, RIP is pointed at an existing `syscall` instruction in the target's
 * text (found by dvs, normally in the vDSO, checked by the guardian), rax/args are set, and
 * PTRACE_SYSCALL runs exactly that syscall; no byte of the target's text is ever written.
 * Pointer arguments point into a scratch mapping the guardian mmaps inside the target at
 * attach and unmaps at detach; the guardian copies request data in and results out with
 * process_vm_readv/writev.
 *
 * Undo log: a request may carry an undo syscall (e.g. close(result), munmap(result, len),
 * the same KVM ioctl with a DEASSIGN flag or a zero memory size). The guardian records it when
 * the call succeeds and runs it on DVS_HV_OP_UNDO or, in reverse order, on detach.
 *
 * Modes: after attach every thread is held stopped (VMSH's way). DVS_HV_OP_RUN lets them run
 * (still traced) and DVS_HV_OP_HOLD stops them again; while running, each injecting request
 * stops all threads first (PTRACE_INTERRUPT, KVM_RUN returns -EINTR so no vCPU holds its
 * mutex) and resumes them afterwards. Signals that reach a running thread are delivered at
 * once; a signal dequeued by the injection thread while it runs our syscall is held back and
 * re-queued (same siginfo when the kernel allows it, else the same signal number) once the
 * thread runs its own code again. Threads created while attached are traced from birth
 * (PTRACE_O_TRACECLONE).
 *
 * Settling a vCPU (register writes): KVM finishes an MMIO/PIO (or MSR, hypercall) exit only
 * when the VMM enters KVM_RUN again, and then writes the emulated instruction's results --
 * including RIP -- over whatever KVM_SET_REGS put there in between. If the vCPU's kvm_run
 * shows such an exit, the guardian lets the whole hypervisor run (the VMM may need locks other
 * threads hold) with syscall stops until that vCPU enters KVM_RUN, interrupts it at the entry
 * stop -- KVM then completes the access, sees the pending signal and returns -EINTR without
 * running guest code -- and stops everything again before the injected syscall runs.
 *
 * MMIO trapping (DVS_HV_OP_TRAP_START): vCPU threads are resumed with PTRACE_SYSCALL; at the
 * exit of ioctl(vcpu_fd, KVM_RUN) the guardian reads kvm_run (the vCPU fd pulled with
 * pidfd_getfd and mapped into the guardian) and, for a KVM_EXIT_MMIO inside the window, sends
 * the access to dvs on the mmio socket. A read waits for dvs's answer (written into
 * kvm_run.mmio.data); then the ioctl's return value is set to -EINTR, so the hypervisor sees
 * an interrupted KVM_RUN (which every VMM handles by entering again) and KVM completes the
 * access from kvm_run.mmio.data on that next entry. Other threads run without syscall stops
 * once every vCPU fd has been seen in a KVM_RUN. For windows that behave like plain
 * registers, the guardian can answer reads itself from a bank of memory it shares with dvs
 * (MAP_SHARED, mapped before the fork, so at the same address in both): no socket round trip
 * and no wake-up of dvs per read; writes land in the bank and are forwarded as notices.
 */
#ifndef DVS_PTRACE_HV_H
#define DVS_PTRACE_HV_H

#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

/* cffi:begin */
/* cffi:constants
   SYS_read SYS_write SYS_close SYS_mmap SYS_munmap SYS_ioctl SYS_getpid SYS_gettid
   SYS_ftruncate SYS_memfd_create SYS_eventfd2 SYS_fcntl SYS_dup
   PROT_READ PROT_WRITE MAP_SHARED MAP_PRIVATE MAP_ANONYMOUS MFD_CLOEXEC
   EFD_CLOEXEC EFD_NONBLOCK EFD_SEMAPHORE
*/
#define DVS_HV_DATA_MAX 12288 /* request/response payload; >= sizeof(struct dvs_kvm_cpuid2) */
#define DVS_HV_MAX_VCPUS 64
#define DVS_HV_MAX_MAPS 8

/* requests */
#define DVS_HV_OP_PING 1       /* -> result 0; no injection (measures the channel) */
#define DVS_HV_OP_SYSCALL 2    /* one injected syscall, optional scratch data and undo entry;
				  with settle_fd >= 0 the vCPU is settled first (below) */
#define DVS_HV_OP_UNDO 3       /* run and drop undo entry `undo_id` now */
#define DVS_HV_OP_HOLD 4       /* stop every thread and keep them stopped */
#define DVS_HV_OP_RUN 5        /* let every thread run (traced) */
#define DVS_HV_OP_TRAP_START 6 /* trap MMIO in [args0, args0+args1); data: the vCPU table */
#define DVS_HV_OP_TRAP_STOP 7
#define DVS_HV_OP_STATUS 8     /* -> struct dvs_hv_status in data */
#define DVS_HV_OP_DETACH 9     /* undo all, restore, detach; the guardian then exits */
#define DVS_HV_OP_BENCH 10     /* inject syscall `nr` args[0] times -> result = total ns */

/* scratch_args / undo arg flags: which args are addresses */
#define DVS_HV_UNDO_ARG_RESULT 1 /* this undo arg is replaced by the call's result */
#define DVS_HV_UNDO_ARG_BUFFER 2 /* this undo arg is replaced by the scratch address of undo_data */
#define DVS_HV_UNDO_DATA_MAX 64

struct dvs_hv_request {
	uint32_t op;
	uint32_t seq;          /* echoed in the response */
	int64_t nr;            /* syscall number */
	uint64_t args[6];
	uint32_t scratch_args; /* bit i: args[i] is an offset into scratch, replaced by its address */
	uint32_t in_len;       /* bytes of data copied to scratch offset 0 before the call */
	uint32_t out_len;      /* bytes copied back from scratch offset 0 after the call */
	int32_t undo_id;       /* OP_UNDO: the entry to run */
	int32_t settle_fd;     /* >= 0: first settle this vCPU fd (see DVS_HV_OP_SYSCALL) */
	uint32_t kvm_run_size; /* with settle_fd: KVM_GET_VCPU_MMAP_SIZE */
	int64_t undo_nr;       /* < 0: no undo entry */
	uint64_t undo_args[6];
	uint8_t undo_arg_flags[6]; /* DVS_HV_UNDO_ARG_* per undo arg */
	uint16_t undo_len;     /* bytes of undo_data */
	uint8_t undo_data[64];  /* DVS_HV_UNDO_DATA_MAX */
	uint8_t data[12288];   /* DVS_HV_DATA_MAX */
};

struct dvs_hv_response {
	uint32_t seq;
	int32_t error;         /* 0, or -errno of the mechanism (ptrace, target gone, bad request) */
	int64_t result;        /* the syscall's return value (-errno on failure) */
	int32_t undo_id;       /* > 0 when an undo entry was recorded */
	uint32_t out_len;
	char message[160];     /* what failed, when error != 0 */
	uint8_t data[12288];   /* DVS_HV_DATA_MAX */
};

/* DVS_HV_OP_TRAP_START data: one entry per vCPU. */
struct dvs_hv_vcpu {
	int32_t index;
	int32_t fd;            /* the vCPU fd's number in the target */
};

struct dvs_hv_trap_config {
	uint64_t base;
	uint64_t size;
	uint32_t kvm_run_size; /* KVM_GET_VCPU_MMAP_SIZE */
	uint32_t n_vcpus;
	uint32_t reply_timeout_ms; /* a read dvs does not answer in time reads as all-ones */
	uint32_t reads_from_shared_bank; /* 1: the guardian answers reads from the shared bank
					  * (bytes [0, shared_bank_size) = [base, base+size)) and
					  * stores writes there too, forwarding them to dvs only as
					  * notices (no answer awaited) */
	struct dvs_hv_vcpu vcpus[64]; /* DVS_HV_MAX_VCPUS */
};

struct dvs_hv_status {
	int32_t n_threads;
	int32_t n_stopped;
	int32_t n_vcpu_threads;
	int32_t injection_tid;
	int32_t running;         /* threads let run (OP_RUN) */
	int32_t trapping;
	int32_t n_undo;
	int32_t n_deferred_signals;
	uint64_t injected_syscalls;
	uint64_t signals_delivered;  /* passed on at a signal-delivery-stop */
	uint64_t signals_redelivered; /* held back during an injection, re-queued later */
	uint64_t mmio_reads;
	uint64_t mmio_writes;
	uint64_t mmio_timeouts;
	uint64_t kvm_run_exits;      /* KVM_RUN returns seen while trapping */
	uint64_t threads_seen;       /* threads traced since attach (incl. ones that exited) */
	uint64_t settles;            /* vCPUs that had to complete a pending exit first */
	int32_t tids[64];            /* first 64 traced threads */
	int32_t tid_is_vcpu[64];     /* -1: not a vCPU thread, else the vCPU index */
};

/* One trapped MMIO access, guardian -> dvs; for a read dvs answers with the same seq. */
struct dvs_hv_mmio_msg {
	uint64_t seq;
	uint64_t gpa;
	uint64_t data;
	uint32_t len;
	uint32_t is_write;
	int32_t tid;
	int32_t vcpu;
};

struct dvs_hv_start {
	int32_t pid;               /* the hypervisor */
	int32_t debug_fd;          /* >= 0: the guardian logs to this fd; else silent */
	uint64_t syscall_insn;     /* address of a `syscall` instruction in the target's text */
	uint32_t scratch_size;     /* bytes of scratch mapped in the target (>= 16 KiB) */
	uint32_t attach_timeout_ms;
	uint32_t flags;            /* DVS_HV_START_* */
	uint32_t shared_bank_size; /* bytes of memory shared with the guardian (0: none) */
	/* out */
	int32_t guardian_pid;
	int32_t guardian_pidfd;
	int32_t control_fd;
	int32_t mmio_fd;
	int32_t injection_tid;
	int32_t n_threads;
	int32_t padding;
	uint64_t scratch_address;
	uint64_t shared_bank;      /* address (same in dvs and guardian) of the shared bank */
	char message[160];         /* why the attach failed */
};
#define DVS_HV_START_SKIP_SCRATCH 1 /* no scratch mapping (tests of the bare engine) */

/* Fork the guardian, let it seize every thread of req->pid and set up injection.
 * 0: attached (every thread stopped); -errno: failed, req->message says why. */
int dvs_hv_start(struct dvs_hv_start *req);

/* Unmap the shared bank dvs_hv_start mapped (after the guardian is gone). */
int dvs_hv_unmap_bank(uint64_t address, uint32_t size);

/* One request/response round trip on the control socket; loops on EINTR.
 * 0, or -ETIMEDOUT / -EPIPE (guardian gone) / -EPROTO (unexpected reply). */
int dvs_hv_call(int control_fd, const struct dvs_hv_request *req, struct dvs_hv_response *resp,
		int32_t timeout_ms);

/* An MMIO device whose registers are plain bytes: reads return bank bytes, writes store them.
 * Accesses outside [0, size) read as all-ones and are counted in `outside`. */
struct dvs_mmio_bank {
	uint64_t base;      /* GPA of byte 0 */
	uint64_t size;
	uint8_t *bytes;
	uint64_t reads;
	uint64_t writes;
	uint64_t outside;
	uint64_t last_write_gpa;
	uint64_t last_write_data;
};

/* Serve trapped accesses from `mmio_fd` with `bank` until `stop_fd` is readable or the
 * guardian closes the socket. Returns 0 or -errno. Runs without the GIL (cffi). */
int dvs_hv_mmio_serve(int mmio_fd, int stop_fd, struct dvs_mmio_bank *bank);
/* cffi:end */

#endif /* DVS_PTRACE_HV_H */
