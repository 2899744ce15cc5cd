"""The guardian tracer: dvs's hands inside another process (C side: csrc/ptrace/).

Semantics relied on (details in csrc/ptrace/hv.h):

- ``Guardian(pid, syscall_insn)`` forks a C child that PTRACE_SEIZEs every thread of ``pid``
  (threads created later are traced from birth), stops them, maps a scratch buffer inside the
  target and waits for requests. Every ptrace operation happens in that child, so dvs itself
  can be interrupted or SIGKILLed at any moment: the child notices the control socket's EOF,
  undoes what it did in the target, restores the injection thread's registers, detaches and
  re-delivers held-back signals.
- ``syscall()`` runs one syscall inside the target through an existing ``syscall``
  instruction (no text is written). Arguments flagged in ``scratch_args`` are offsets into the
  scratch buffer, which receives ``data`` before the call; ``out_len`` bytes come back after.
  An ``UndoSpec`` registers the syscall that reverts this one (run by ``undo()`` or, newest
  first, when the session ends however it ends).
- Requests block the calling thread (the GIL is released); one request at a time per guardian.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dvs.lowlevel import check, ffi, lib

DATA_MAX: int = lib.DVS_HV_DATA_MAX
UNDO_DATA_MAX: int = lib.DVS_HV_UNDO_DATA_MAX
MAX_VCPUS: int = lib.DVS_HV_MAX_VCPUS
UNDO_ARG_RESULT: int = lib.DVS_HV_UNDO_ARG_RESULT
UNDO_ARG_BUFFER: int = lib.DVS_HV_UNDO_ARG_BUFFER

_OP_PING: int = lib.DVS_HV_OP_PING
_OP_SYSCALL: int = lib.DVS_HV_OP_SYSCALL
_OP_UNDO: int = lib.DVS_HV_OP_UNDO
_OP_HOLD: int = lib.DVS_HV_OP_HOLD
_OP_RUN: int = lib.DVS_HV_OP_RUN
_OP_TRAP_START: int = lib.DVS_HV_OP_TRAP_START
_OP_TRAP_STOP: int = lib.DVS_HV_OP_TRAP_STOP
_OP_STATUS: int = lib.DVS_HV_OP_STATUS
_OP_DETACH: int = lib.DVS_HV_OP_DETACH
_OP_BENCH: int = lib.DVS_HV_OP_BENCH


@dataclass(frozen=True)
class UndoSpec:
    """The syscall that reverts a successful call, recorded by the guardian.

    ``args[i]`` is used as given, unless ``result_args`` holds ``i`` (replaced by the call's
    result, e.g. the fd to close) or ``buffer_args`` holds ``i`` (replaced by the address of
    ``data`` copied into the scratch buffer, e.g. an ioctl structure with a DEASSIGN flag).
    """

    nr: int
    args: Sequence[int] = ()
    result_args: Sequence[int] = ()
    buffer_args: Sequence[int] = ()
    data: bytes = b""


@dataclass(frozen=True)
class SyscallResult:
    result: int
    data: bytes
    undo_id: int  # 0 when nothing was recorded

    @property
    def failed(self) -> bool:
        return -4095 <= self.result < 0

    @property
    def errno(self) -> int:
        return -self.result if self.failed else 0


@dataclass(frozen=True)
class GuardianStatus:
    n_threads: int
    n_stopped: int
    n_vcpu_threads: int
    injection_tid: int
    running: bool
    trapping: bool
    n_undo: int
    n_deferred_signals: int
    injected_syscalls: int
    signals_delivered: int
    signals_redelivered: int
    mmio_reads: int
    mmio_writes: int
    mmio_timeouts: int
    kvm_run_exits: int
    threads_seen: int
    settles: int
    vcpu_of_thread: dict[int, int] = field(default_factory=dict)  # tid -> vCPU index


class GuardianError(OSError):
    """The guardian could not do what was asked (the message says what and why)."""


class Guardian:
    """One guardian child tracing ``pid``; see the module note. Not thread-safe."""

    def __init__(
        self,
        pid: int,
        syscall_insn: int,
        *,
        scratch_size: int = 64 * 1024,
        attach_timeout: float = 10.0,
        debug_fd: int = -1,
        with_scratch: bool = True,
        shared_bank_size: int = 64 * 1024,
    ) -> None:
        req = ffi.new("struct dvs_hv_start *")
        req.pid = pid
        req.debug_fd = debug_fd
        req.syscall_insn = syscall_insn
        req.scratch_size = scratch_size
        req.attach_timeout_ms = int(attach_timeout * 1000)
        req.flags = 0 if with_scratch else lib.DVS_HV_START_SKIP_SCRATCH
        req.shared_bank_size = shared_bank_size
        result = lib.dvs_hv_start(req)
        if result < 0:
            message = ffi.string(req.message).decode(errors="replace")
            raise GuardianError(-result, message or os.strerror(-result))
        self.pid = pid
        self.guardian_pid: int = req.guardian_pid
        self.guardian_pidfd: int = req.guardian_pidfd
        self.control_fd: int = req.control_fd
        self.mmio_fd: int = req.mmio_fd
        self.injection_tid: int = req.injection_tid
        self.n_threads_at_attach: int = req.n_threads
        self.scratch_address: int = req.scratch_address
        self.scratch_size = scratch_size if with_scratch else 0
        self.shared_bank_address: int = req.shared_bank
        self.shared_bank_size = shared_bank_size if req.shared_bank else 0
        self._seq = 0
        self._req = ffi.new("struct dvs_hv_request *")
        self._resp = ffi.new("struct dvs_hv_response *")
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.control_fd < 0

    # -- requests --

    def _call(self, op: int, timeout: float = 30.0) -> Any:
        if self.closed:
            raise GuardianError(errno.EPIPE, "the guardian session is closed")
        self._seq += 1
        self._req.op = op
        self._req.seq = self._seq
        result = lib.dvs_hv_call(self.control_fd, self._req, self._resp, int(timeout * 1000))
        if result < 0:
            raise GuardianError(-result, f"guardian request {op}: {os.strerror(-result)}")
        if self._resp.error:
            message = ffi.string(self._resp.message).decode(errors="replace")
            raise GuardianError(-self._resp.error, message)
        return self._resp

    def _reset(self, nr: int = 0) -> Any:
        req = self._req
        req.nr = nr
        for i in range(6):
            req.args[i] = 0
            req.undo_args[i] = 0
            req.undo_arg_flags[i] = 0
        req.scratch_args = 0
        req.in_len = 0
        req.out_len = 0
        req.undo_id = 0
        req.settle_fd = -1
        req.kvm_run_size = 0
        req.undo_nr = -1
        req.undo_len = 0
        return req

    def syscall(
        self,
        nr: int,
        args: Sequence[int] = (),
        *,
        scratch_args: Sequence[int] = (),
        data: bytes = b"",
        out_len: int = 0,
        undo: UndoSpec | None = None,
        settle_vcpu_fd: int = -1,
        kvm_run_size: int = 0,
        timeout: float = 30.0,
    ) -> SyscallResult:
        """Run syscall ``nr`` inside the target; see the module note for the arguments.

        With ``settle_vcpu_fd`` (a vCPU fd in the target) the guardian first lets that vCPU
        complete an exit KVM has not finished yet (csrc/ptrace/hv.h, "Settling").
        """
        if len(args) > 6:
            raise ValueError(f"a syscall takes at most 6 arguments, got {len(args)}")
        if len(data) > min(DATA_MAX, self.scratch_size) or out_len > min(
            DATA_MAX, self.scratch_size
        ):
            raise ValueError(f"data must fit the scratch buffer ({self.scratch_size} bytes)")
        with self._lock:
            req = self._reset(nr)
            for i, value in enumerate(args):
                req.args[i] = value & 0xFFFF_FFFF_FFFF_FFFF
            mask = 0
            for i in scratch_args:
                mask |= 1 << i
            req.scratch_args = mask
            if data:
                ffi.memmove(req.data, data, len(data))
                req.in_len = len(data)
            req.out_len = out_len
            req.settle_fd = settle_vcpu_fd
            req.kvm_run_size = kvm_run_size
            if undo is not None:
                self._fill_undo(req, undo)
            resp = self._call(_OP_SYSCALL, timeout)
            out = bytes(ffi.buffer(resp.data, resp.out_len)) if resp.out_len else b""
            return SyscallResult(resp.result, out, resp.undo_id)

    @staticmethod
    def _fill_undo(req: Any, undo: UndoSpec) -> None:
        if len(undo.args) > 6 or len(undo.data) > UNDO_DATA_MAX:
            raise ValueError("undo syscall: at most 6 arguments and 64 bytes of data")
        r = req
        r.undo_nr = undo.nr
        for i, value in enumerate(undo.args):
            r.undo_args[i] = value & 0xFFFF_FFFF_FFFF_FFFF
        for i in undo.result_args:
            r.undo_arg_flags[i] |= UNDO_ARG_RESULT
        for i in undo.buffer_args:
            r.undo_arg_flags[i] |= UNDO_ARG_BUFFER
        if undo.data:
            ffi.memmove(r.undo_data, undo.data, len(undo.data))
            r.undo_len = len(undo.data)

    def undo(self, undo_id: int) -> int:
        """Run the undo entry now and drop it; returns the undo syscall's result."""
        with self._lock:
            self._reset().undo_id = undo_id
            resp = self._call(_OP_UNDO)
            result: int = resp.result
            return result

    def ping(self) -> None:
        with self._lock:
            self._reset()
            self._call(_OP_PING)

    def hold(self) -> None:
        """Stop every thread of the target and keep them stopped."""
        with self._lock:
            self._reset()
            self._call(_OP_HOLD)

    def run(self) -> None:
        """Let the target's threads run (still traced)."""
        with self._lock:
            self._reset()
            self._call(_OP_RUN)

    def trap_start(
        self,
        base: int,
        size: int,
        vcpus: Sequence[tuple[int, int]],
        kvm_run_size: int,
        reply_timeout: float = 5.0,
        reads_from_shared_bank: bool = False,
    ) -> None:
        """Trap MMIO accesses to [base, base+size); ``vcpus`` = (index, target fd) pairs.

        With ``reads_from_shared_bank`` the guardian answers reads from the shared bank
        itself (``shared_bank()``) and only notifies dvs of writes.
        """
        if reads_from_shared_bank and size > self.shared_bank_size:
            raise ValueError(f"the window ({size} bytes) exceeds the shared bank")
        if not 0 < len(vcpus) <= MAX_VCPUS:
            raise ValueError(f"1..{MAX_VCPUS} vCPUs, got {len(vcpus)}")
        cfg = ffi.new("struct dvs_hv_trap_config *")
        cfg.base = base
        cfg.size = size
        cfg.kvm_run_size = kvm_run_size
        cfg.n_vcpus = len(vcpus)
        cfg.reply_timeout_ms = int(reply_timeout * 1000)
        cfg.reads_from_shared_bank = int(reads_from_shared_bank)
        for i, (index, fd) in enumerate(vcpus):
            cfg.vcpus[i].index = index
            cfg.vcpus[i].fd = fd
        size_cfg = ffi.sizeof("struct dvs_hv_trap_config")
        with self._lock:
            req = self._reset()
            ffi.memmove(req.data, cfg, size_cfg)
            req.in_len = size_cfg
            self._call(_OP_TRAP_START)

    def trap_stop(self) -> None:
        with self._lock:
            self._reset()
            self._call(_OP_TRAP_STOP)

    def drain_mmio(self) -> int:
        """Drop messages left on the mmio socket (after trap_stop nothing new arrives, but an
        access forwarded just before may not have been served); returns how many."""
        import select

        dropped = 0
        while self.mmio_fd >= 0 and select.select([self.mmio_fd], [], [], 0)[0]:
            if not os.read(self.mmio_fd, 4096):
                break
            dropped += 1
        return dropped

    def bench(self, nr: int, count: int) -> int:
        """Inject syscall ``nr`` (no arguments) ``count`` times back to back; total ns."""
        with self._lock:
            self._reset(nr).args[0] = count
            resp = self._call(_OP_BENCH, timeout=max(30.0, count * 0.01))
            total: int = resp.result
            return total

    def status(self) -> GuardianStatus:
        with self._lock:
            self._reset()
            resp = self._call(_OP_STATUS)
            st = ffi.cast("struct dvs_hv_status *", resp.data)
            vcpu_of = {
                st.tids[i]: st.tid_is_vcpu[i]
                for i in range(min(st.n_threads, 64))
                if st.tid_is_vcpu[i] >= 0
            }
            return GuardianStatus(
                n_threads=st.n_threads,
                n_stopped=st.n_stopped,
                n_vcpu_threads=st.n_vcpu_threads,
                injection_tid=st.injection_tid,
                running=bool(st.running),
                trapping=bool(st.trapping),
                n_undo=st.n_undo,
                n_deferred_signals=st.n_deferred_signals,
                injected_syscalls=st.injected_syscalls,
                signals_delivered=st.signals_delivered,
                signals_redelivered=st.signals_redelivered,
                mmio_reads=st.mmio_reads,
                mmio_writes=st.mmio_writes,
                mmio_timeouts=st.mmio_timeouts,
                kvm_run_exits=st.kvm_run_exits,
                threads_seen=st.threads_seen,
                settles=st.settles,
                vcpu_of_thread=vcpu_of,
            )

    # -- the end --

    def detach(self, timeout: float = 30.0) -> None:
        """Undo everything, restore, detach; waits until the guardian has exited."""
        if self.closed:
            return
        try:
            with self._lock:
                self._reset()
                self._call(_OP_DETACH, timeout)
        finally:
            self.close(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Drop the session. Without ``detach()`` first, the guardian restores the target on
        its own when it sees the socket close; either way this waits for it to exit."""
        if self.closed:
            return
        control, mmio = self.control_fd, self.mmio_fd
        self.control_fd = self.mmio_fd = -1
        os.close(control)
        os.close(mmio)
        try:
            self._reap(timeout)
            # the guardian is gone: nobody else uses the shared bank any more
            lib.dvs_hv_unmap_bank(self.shared_bank_address, self.shared_bank_size)
            self.shared_bank_address = 0
        finally:
            if self.guardian_pidfd >= 0:
                os.close(self.guardian_pidfd)
                self.guardian_pidfd = -1

    def _reap(self, timeout: float) -> None:
        import select

        if self.guardian_pidfd >= 0:
            ready, _, _ = select.select([self.guardian_pidfd], [], [], timeout)
            if not ready:
                raise GuardianError(
                    errno.ETIMEDOUT,
                    f"guardian {self.guardian_pid} did not exit within {timeout} s",
                )
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.guardian_pid, os.WNOHANG)
            except ChildProcessError:
                return  # reaped by someone else (e.g. a SIGCHLD handler)
            if pid:
                return
            if time.monotonic() > deadline:
                raise GuardianError(errno.ETIMEDOUT, "guardian did not exit")
            time.sleep(0.001)

    def __del__(self) -> None:  # pragma: no cover - safety net only
        if getattr(self, "control_fd", -1) >= 0:
            try:
                os.close(self.control_fd)
                os.close(self.mmio_fd)
            except OSError:
                pass


# ---- serving trapped MMIO -----------------------------------------------------------------


class MmioBank:
    """Device registers as plain bytes, served from C (``dvs_hv_mmio_serve``).

    Reads of [base, base+size) return the bank's bytes (little-endian, as the guest sees
    them), writes store into it; anything outside reads as all-ones and is counted.
    ``shared_with`` puts the bytes in the guardian's shared bank, where the guardian can
    answer reads itself (``Guardian.trap_start(reads_from_shared_bank=True)``).
    """

    def __init__(self, base: int, size: int, shared_with: Guardian | None = None) -> None:
        if size <= 0:
            raise ValueError("the bank needs at least one byte")
        self._guardian = shared_with  # keeps the shared memory mapped while we use it
        if shared_with is not None:
            if size > shared_with.shared_bank_size or not shared_with.shared_bank_address:
                raise ValueError(f"{size} bytes do not fit the guardian's shared bank")
            self._storage = ffi.cast("uint8_t *", shared_with.shared_bank_address)
            ffi.memmove(self._storage, bytes(size), size)
        else:
            self._storage = ffi.new("uint8_t[]", size)
        self._bank = ffi.new("struct dvs_mmio_bank *")
        self._bank.base = base
        self._bank.size = size
        self._bank.bytes = self._storage
        self.base = base
        self.size = size

    @property
    def view(self) -> memoryview:
        """The register bytes, shared with the serving thread (and the guardian)."""
        if self._guardian is not None and not self._guardian.shared_bank_address:
            raise GuardianError(errno.EPIPE, "the guardian session (and its bank) is gone")
        return memoryview(ffi.buffer(self._storage, self.size))

    @property
    def reads(self) -> int:
        return int(self._bank.reads)

    @property
    def writes(self) -> int:
        return int(self._bank.writes)

    @property
    def outside(self) -> int:
        return int(self._bank.outside)

    @property
    def last_write(self) -> tuple[int, int]:
        return int(self._bank.last_write_gpa), int(self._bank.last_write_data)

    def serve(self, mmio_fd: int, stop_fd: int) -> None:
        """Serve until ``stop_fd`` is readable or the guardian closes; call from a thread."""
        check(lib.dvs_hv_mmio_serve(mmio_fd, stop_fd, self._bank), "serving trapped MMIO")
