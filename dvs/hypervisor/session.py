"""A session inside a running KVM hypervisor: registers, memory slots, doorbells, interrupts,
MMIO trapping -- all through syscalls injected by the guardian (dvs.lowlevel.ptrace).

Semantics relied on:

- KVM VM and vCPU ioctls only work from the process that created the VM (on a foreign fd they
  fail with EIO), so every one of them is injected. File descriptors they need (eventfds, the
  memfd behind a new memory slot) are created *inside* the hypervisor by injected syscalls and
  pulled into dvs with ``pidfd_getfd``; a pulled vCPU fd can be mmapped locally to read its
  ``kvm_run`` page (mmap has no mm check).
- KVM_SET_USER_MEMORY_REGION on an occupied slot id with a different userspace address fails
  with EINVAL and changes nothing; on a free id it creates the slot. So dvs tries slot ids from
  the top of KVM_CAP_NR_MEMSLOTS downwards with a mapping it just created (no existing slot can
  point at it): the first success is a slot that was free, checked atomically by KVM itself
  (hypervisors such as QEMU allocate slot ids from 0 upwards). EEXIST means the GPA range
  overlaps an existing slot. Deleting (size 0) a free slot would fail with EINVAL, and deleting
  an occupied one would destroy the hypervisor's memory: never probe that way.
- KVM_IOEVENTFD and KVM_IRQFD take their own reference to the eventfd, but deassigning matches
  on the eventfd behind an fd *in the hypervisor*, so the hypervisor's copy stays open while the
  registration lives and is closed right after deassigning. The memfd behind a memory slot is
  closed in the hypervisor right away (its mapping keeps it alive).
- Every change is registered with the guardian together with the syscall that reverts it, so
  ``remove()``, ``close()``, an exception, SIGINT or SIGKILL of dvs all end with the hypervisor's
  fd table and memory map as they were.
- IRQFD with KVM_IRQFD_FLAG_RESAMPLE raises a *level*: the GSI stays asserted until the guest
  acknowledges it (EOI of a level-triggered IOAPIC route), then KVM lowers it and signals the
  resample eventfd -- the right mode for a level-triggered device interrupt such as virtio-mmio.
  It needs the in-kernel irqchip (QEMU's default under KVM).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import mmap
import os
import select
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from dvs.errors import DvsError, NotPermitted, TargetGone
from dvs.hypervisor.discovery import (
    KvmHandles,
    find_kvm,
    find_syscall_instruction,
    seccomp_mode,
    vcpu_mmap_size,
)
from dvs.hypervisor.errors import (
    AttachFailed,
    GuardianLost,
    InjectionRefused,
    KvmOperationFailed,
    NoFreeMemslot,
)
from dvs.hypervisor.vcpu import CpuidEntry, Regs, Sregs, Translation, VcpuState
from dvs.lowlevel import kvm as llkvm
from dvs.lowlevel import sys as llsys
from dvs.lowlevel.ptrace import (
    Guardian,
    GuardianError,
    GuardianStatus,
    MmioBank,
    SyscallResult,
    UndoSpec,
)

PAGE_SIZE = 4096
MEMSLOT_ATTEMPTS = 64
T = TypeVar("T")


def _eventfd_count(fd: int) -> int:
    """Read and reset an eventfd counter without blocking (0 when nothing arrived)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _eventfd_wait(fd: int, timeout: float) -> int:
    """Wait until the eventfd fires; return (and reset) its count, 0 on timeout."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return _eventfd_count(fd) if ready else 0


class KvmSession:
    """Attached to one KVM hypervisor process; use as a context manager.

    After attaching every thread of the hypervisor is stopped (``running`` is False). Call
    ``run()`` to let it run while attached (each operation then stops it briefly) and
    ``hold()`` to stop it again.
    """

    def __init__(
        self,
        pid: int,
        *,
        run: bool = False,
        allow_seccomp: bool = False,
        attach_timeout: float = 10.0,
        debug: bool = False,
    ) -> None:
        find_kvm(pid)  # fail early, with the fds tried, on a process that is not one
        if seccomp_mode(pid) == 2 and not allow_seccomp:
            raise InjectionRefused(
                f"process {pid} runs under a seccomp filter; an injected syscall it does not "
                "allow could kill it (allow_seccomp=True to try anyway)"
            )
        insn = find_syscall_instruction(pid)
        try:
            self._guardian = Guardian(
                pid, insn, attach_timeout=attach_timeout, debug_fd=2 if debug else -1
            )
        except GuardianError as error:
            if error.errno in (errno_codes.EPERM, errno_codes.EACCES):
                raise NotPermitted(f"cannot trace {pid}: {error.strerror}") from error
            if error.errno == errno_codes.ESRCH:
                raise TargetGone(f"process {pid} exited during attach") from error
            raise AttachFailed(pid, error.errno or 0, str(error.strerror)) from error
        self.pid = pid
        self._closed = False
        self._pidfd = -1
        self._resources: list[_Resource] = []
        self._kvm_runs: dict[int, tuple[int, mmap.mmap]] = {}
        self._nr_memslots: int | None = None
        self._trap: MmioTrap | None = None
        try:
            # Rediscover now that no thread runs: nothing can change under us any more.
            self.handles: KvmHandles = find_kvm(pid)
            self._pidfd = llsys.pidfd_open(pid)
            if run:
                self.run()
        except BaseException:
            self.close()
            raise

    # ---- life cycle ----

    def __enter__(self) -> KvmSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def guardian_pid(self) -> int:
        """The tracer child's pid (the TracerPid of the hypervisor's threads)."""
        return self._guardian.guardian_pid

    def close(self) -> None:
        """Revert every change in the hypervisor, give back its registers, detach. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._trap is not None:
                self._trap._stop_serving()
            for resource in reversed(self._resources):
                resource._drop_local()
            self._resources.clear()
            for fd, mapping in self._kvm_runs.values():
                mapping.close()
                os.close(fd)
            self._kvm_runs.clear()
        finally:
            try:
                self._guardian.detach()
            except GuardianError:
                self._guardian.close()  # the guardian restores on EOF by itself
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def _call(self, what: str, action: Callable[[Guardian], T]) -> T:
        if self._closed:
            raise DvsError(f"{what}: the session with hypervisor {self.pid} is closed")
        try:
            return action(self._guardian)
        except GuardianError as error:
            code = error.errno or 0
            if code == errno_codes.ESRCH:
                raise TargetGone(f"hypervisor {self.pid} exited ({what})") from error
            if code in (errno_codes.EPIPE, errno_codes.ETIMEDOUT, errno_codes.ECONNRESET):
                raise GuardianLost(f"{what}: the guardian is gone ({error.strerror})") from error
            raise KvmOperationFailed(what, code, str(error.strerror)) from error

    # ---- modes ----

    @property
    def running(self) -> bool:
        return self.status().running

    def run(self) -> None:
        """Let the hypervisor run while attached."""
        self._call("run", lambda g: g.run())

    def hold(self) -> None:
        """Stop every thread of the hypervisor (vCPUs leave KVM_RUN) and keep them stopped."""
        self._call("hold", lambda g: g.hold())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the hypervisor stopped for a batch of operations, then restore the mode."""
        was_running = self.status().running
        self.hold()
        try:
            yield
        finally:
            if was_running and not self._closed:
                self.run()

    def status(self) -> GuardianStatus:
        return self._call("status", lambda g: g.status())

    # ---- raw injection ----

    def inject(
        self,
        nr: int,
        *args: int,
        scratch_args: tuple[int, ...] = (),
        data: bytes = b"",
        out_len: int = 0,
        undo: UndoSpec | None = None,
        settle_vcpu: int | None = None,
    ) -> SyscallResult:
        """Run one syscall inside the hypervisor (see dvs.lowlevel.ptrace.Guardian.syscall).

        ``settle_vcpu`` (an index) first lets that vCPU finish an exit KVM completes only
        on the next KVM_RUN, which would otherwise overwrite registers set now.
        """
        settle_fd = self._vcpu_fd(settle_vcpu) if settle_vcpu is not None else -1
        run_size = vcpu_mmap_size() if settle_vcpu is not None else 0
        return self._call(
            f"syscall {nr}",
            lambda g: g.syscall(
                nr, args, scratch_args=scratch_args, data=data, out_len=out_len, undo=undo,
                settle_vcpu_fd=settle_fd, kvm_run_size=run_size,
            ),
        )  # fmt: skip

    def _checked(self, what: str, result: SyscallResult) -> SyscallResult:
        if result.failed:
            raise KvmOperationFailed(what, result.errno)
        return result

    def _ioctl(
        self,
        fd: int,
        request: int,
        what: str,
        *,
        arg: int = 0,
        data: bytes = b"",
        out_len: int = 0,
        undo: UndoSpec | None = None,
        settle_vcpu: int | None = None,
    ) -> SyscallResult:
        if data or out_len:
            # the structure lives at scratch offset 0
            result = self.inject(
                llkvm.SYS_ioctl, fd, request, 0, scratch_args=(2,), data=data,
                out_len=out_len, undo=undo, settle_vcpu=settle_vcpu,
            )  # fmt: skip
        else:
            result = self.inject(
                llkvm.SYS_ioctl, fd, request, arg, undo=undo, settle_vcpu=settle_vcpu
            )
        return self._checked(what, result)

    def _undo(self, what: str, undo_id: int) -> None:
        if undo_id <= 0 or self._closed:
            return
        result = self._call(what, lambda g: g.undo(undo_id))
        if -4095 <= result < 0:
            raise KvmOperationFailed(what, -result)

    def _pull_fd(self, target_fd: int) -> int:
        return llsys.pidfd_getfd(self._pidfd, target_fd)

    def _target_eventfd(self, what: str) -> tuple[int, int, int]:
        """An eventfd inside the hypervisor: (its fd there, our copy, undo id of its close)."""
        result = self._checked(
            f"{what}: eventfd2",
            self.inject(
                llkvm.SYS_eventfd2, 0, llkvm.EFD_CLOEXEC | llkvm.EFD_NONBLOCK,
                undo=UndoSpec(llkvm.SYS_close, result_args=(0,)),
            ),
        )  # fmt: skip
        try:
            local = self._pull_fd(result.result)
        except BaseException:
            self._undo(f"{what}: close", result.undo_id)
            raise
        return result.result, local, result.undo_id

    # ---- KVM: capabilities, registers ----

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        return self._ioctl(
            self.handles.vm_fd, llkvm.KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", arg=capability
        ).result

    def _vcpu_fd(self, index: int) -> int:
        return self.handles.vcpu(index).fd

    def get_regs(self, vcpu: int = 0) -> Regs:
        data = self._ioctl(
            self._vcpu_fd(vcpu), llkvm.KVM_GET_REGS, "KVM_GET_REGS", out_len=llkvm.REGS_SIZE
        ).data
        return Regs(**llkvm.regs_from_bytes(data))

    def set_regs(self, regs: Regs, vcpu: int = 0) -> None:
        """KVM_SET_REGS, after letting the vCPU finish an exit still pending in KVM (else
        KVM's completion of that instruction would overwrite RIP and the result register).

        Read the registers you modify *after* this settles them: use ``update_regs``."""
        self._ioctl(
            self._vcpu_fd(vcpu), llkvm.KVM_SET_REGS, "KVM_SET_REGS",
            data=llkvm.regs_to_bytes(regs.as_dict()), settle_vcpu=vcpu,
        )  # fmt: skip

    def update_regs(self, vcpu: int = 0, **changes: int) -> Regs:
        """Settle the vCPU, read its registers, apply ``changes`` and write them back, all
        while the hypervisor stays stopped; returns what was written."""
        with self.held():
            self._ioctl(
                self._vcpu_fd(vcpu), llkvm.KVM_GET_REGS, "KVM_GET_REGS",
                out_len=llkvm.REGS_SIZE, settle_vcpu=vcpu,
            )  # fmt: skip
            regs = self.get_regs(vcpu).replace(**changes)
            self.set_regs(regs, vcpu)
        return regs

    def get_sregs(self, vcpu: int = 0) -> Sregs:
        data = self._ioctl(
            self._vcpu_fd(vcpu), llkvm.KVM_GET_SREGS, "KVM_GET_SREGS", out_len=llkvm.SREGS_SIZE
        ).data
        return Sregs.from_dict(llkvm.sregs_from_bytes(data))

    def get_cpuid(self, vcpu: int = 0) -> list[CpuidEntry]:
        """The CPUID table the hypervisor gave this vCPU (KVM_GET_CPUID2)."""
        size = llkvm.CPUID2_HEADER_SIZE + llkvm.MAX_CPUID_ENTRIES * llkvm.CPUID_ENTRY_SIZE
        request = llkvm.cpuid2_request(llkvm.MAX_CPUID_ENTRIES)
        data = self._ioctl(
            self._vcpu_fd(vcpu), llkvm.KVM_GET_CPUID2, "KVM_GET_CPUID2",
            data=request, out_len=size,
        ).data  # fmt: skip
        return [CpuidEntry(**entry) for entry in llkvm.cpuid2_from_bytes(data)]

    def translate(self, linear_address: int, vcpu: int = 0) -> Translation:
        """KVM_TRANSLATE: the vCPU's current page tables applied to ``linear_address``."""
        data = self._ioctl(
            self._vcpu_fd(vcpu), llkvm.KVM_TRANSLATE, "KVM_TRANSLATE",
            data=llkvm.translation_to_bytes(linear_address), out_len=llkvm.TRANSLATION_SIZE,
        ).data  # fmt: skip
        raw = llkvm.translation_from_bytes(data)
        return Translation(
            linear_address=raw["linear_address"],
            physical_address=raw["physical_address"],
            valid=bool(raw["valid"]),
            writeable=bool(raw["writeable"]),
            usermode=bool(raw["usermode"]),
        )

    def kvm_run(self, vcpu: int = 0) -> memoryview:
        """The vCPU's kvm_run page, mapped into dvs (the vCPU fd pulled with pidfd_getfd)."""
        if vcpu not in self._kvm_runs:
            fd = self._pull_fd(self._vcpu_fd(vcpu))
            try:
                mapping = mmap.mmap(fd, vcpu_mmap_size(), mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
            self._kvm_runs[vcpu] = (fd, mapping)
        return memoryview(self._kvm_runs[vcpu][1])

    def exit_reason(self, vcpu: int = 0) -> str:
        run = self.kvm_run(vcpu)
        offset = llkvm.KVM_RUN_EXIT_REASON_OFFSET
        code = int.from_bytes(run[offset : offset + 4], "little")
        run.release()
        return llkvm.EXIT_REASONS.get(code, f"exit-{code}")

    def vcpu_state(self, vcpu: int = 0) -> VcpuState:
        return VcpuState(
            index=vcpu,
            regs=self.get_regs(vcpu),
            sregs=self.get_sregs(vcpu),
            exit_reason=self.exit_reason(vcpu),
        )

    # ---- KVM: memory ----

    def nr_memslots(self) -> int:
        if self._nr_memslots is None:
            self._nr_memslots = self.check_extension(llkvm.KVM_CAP_NR_MEMSLOTS)
        return self._nr_memslots

    def add_memory(self, gpa: int, size: int, *, readonly: bool = False) -> MemorySlot:
        """New guest RAM at ``gpa``: a memfd mapped in the hypervisor and in dvs (shared)."""
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or gpa < 0:
            raise ValueError(f"gpa {gpa:#x} and size {size:#x} must be positive page multiples")
        slot = MemorySlot(self, gpa, size, readonly)
        self._resources.append(slot)
        return slot

    def add_ioeventfd(
        self, address: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> IoEventFd:
        """An eventfd KVM signals when the guest writes ``address`` (MMIO, or a port if
        ``pio``), optionally only for the value ``datamatch``; the guest never exits to the
        hypervisor for it."""
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"length must be 0, 1, 2, 4 or 8, got {length}")
        doorbell = IoEventFd(self, address, length, datamatch, pio)
        self._resources.append(doorbell)
        return doorbell

    def add_irqfd(self, gsi: int, *, resample: bool = False) -> IrqFd:
        """An eventfd that raises GSI ``gsi`` in the guest's in-kernel irqchip."""
        irq = IrqFd(self, gsi, resample)
        self._resources.append(irq)
        return irq

    def trap_mmio(
        self,
        base: int,
        size: int,
        *,
        reply_timeout: float = 5.0,
        reads_by_guardian: bool = False,
    ) -> MmioTrap:
        """Answer the guest's accesses to [base, base+size) from dvs (see MmioTrap).

        ``reads_by_guardian``: the registers live in memory shared with the guardian, which
        answers reads without waking dvs (faster; right for plain register files whose reads
        never depend on dvs reacting to an earlier write first).
        """
        if self._trap is not None and not self._trap.stopped:
            raise DvsError("one MMIO trap per session: stop the current one first")
        trap = MmioTrap(self, base, size, reply_timeout, reads_by_guardian)
        self._trap = trap
        return trap

    def _forget(self, resource: _Resource) -> None:
        if resource in self._resources:
            self._resources.remove(resource)


class _Resource:
    """Something dvs added to the hypervisor; ``remove()`` reverts it (also on close)."""

    def __init__(self, session: KvmSession) -> None:
        self._session = session
        self._undo_ids: list[tuple[str, int]] = []  # oldest first
        self.removed = False

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Revert it in the hypervisor (newest change first) and drop dvs's handles."""
        if self.removed:
            return
        self.removed = True
        try:
            for what, undo_id in reversed(self._undo_ids):
                self._session._undo(what, undo_id)
        finally:
            self._undo_ids.clear()
            self._drop_local()
            self._session._forget(self)

    def _drop_local(self) -> None:
        """Release dvs's own handles; the guardian reverts the hypervisor side on detach."""
        self.removed = True


class MemorySlot(_Resource):
    """Guest RAM added by dvs; ``view`` is the same memory the guest sees at ``gpa``."""

    def __init__(self, session: KvmSession, gpa: int, size: int, readonly: bool) -> None:
        super().__init__(session)
        self.gpa = gpa
        self.size = size
        self.readonly = readonly
        self.slot = -1
        self.hva = 0
        self._fd = -1
        self._map: mmap.mmap | None = None
        try:
            self._create()
        except BaseException:
            self.remove()
            raise

    def _create(self) -> None:
        s = self._session
        name = b"dvs-memslot\0"
        memfd = s._checked(
            "memfd_create",
            s.inject(
                llkvm.SYS_memfd_create, 0, llkvm.MFD_CLOEXEC, scratch_args=(0,), data=name,
                undo=UndoSpec(llkvm.SYS_close, result_args=(0,)),
            ),
        )  # fmt: skip
        self._undo_ids.append(("close memfd", memfd.undo_id))
        s._checked("ftruncate", s.inject(llkvm.SYS_ftruncate, memfd.result, self.size))
        mapped = s._checked(
            "mmap",
            s.inject(
                llkvm.SYS_mmap, 0, self.size, llkvm.PROT_READ | llkvm.PROT_WRITE,
                llkvm.MAP_SHARED, memfd.result, 0,
                undo=UndoSpec(llkvm.SYS_munmap, args=(0, self.size), result_args=(0,)),
            ),
        )  # fmt: skip
        self.hva = mapped.result
        self._undo_ids.append(("munmap", mapped.undo_id))
        self._fd = s._pull_fd(memfd.result)
        self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
        # The mapping keeps the memfd alive: close it in the hypervisor now, so its fd table
        # is unchanged while the slot lives.
        s._undo("close memfd", memfd.undo_id)
        self._undo_ids.remove(("close memfd", memfd.undo_id))
        self._install_slot()

    def _install_slot(self) -> None:
        s = self._session
        flags = llkvm.KVM_MEM_READONLY if self.readonly else 0
        top = s.nr_memslots() - 1
        tried = []
        for slot in range(top, max(top - MEMSLOT_ATTEMPTS, -1), -1):
            region = llkvm.memory_region(slot, flags, self.gpa, self.size, self.hva)
            removal = llkvm.memory_region(slot, flags, self.gpa, 0, self.hva)
            result = s.inject(
                llkvm.SYS_ioctl, s.handles.vm_fd, llkvm.KVM_SET_USER_MEMORY_REGION, 0,
                scratch_args=(2,), data=region,
                undo=UndoSpec(
                    llkvm.SYS_ioctl,
                    args=(s.handles.vm_fd, llkvm.KVM_SET_USER_MEMORY_REGION, 0),
                    buffer_args=(2,), data=removal,
                ),
            )  # fmt: skip
            if not result.failed:
                self.slot = slot
                self._undo_ids.append(("delete memory slot", result.undo_id))
                return
            if result.errno == errno_codes.EEXIST:
                raise KvmOperationFailed(
                    "KVM_SET_USER_MEMORY_REGION",
                    result.errno,
                    f"GPA range {self.gpa:#x}+{self.size:#x} overlaps an existing slot",
                )
            if result.errno != errno_codes.EINVAL:
                raise KvmOperationFailed("KVM_SET_USER_MEMORY_REGION", result.errno)
            tried.append(slot)  # EINVAL: this id is taken (our arguments are valid)
        raise NoFreeMemslot(
            f"slot ids {tried[0]}..{tried[-1]} (top of KVM_CAP_NR_MEMSLOTS={top + 1}) are all "
            "in use"
        )

    @property
    def view(self) -> memoryview:
        if self._map is None:
            raise DvsError("the memory slot was removed")
        return memoryview(self._map)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{offset:#x}+{len(data):#x} outside the {self.size:#x}-byte slot")
        self.view[offset : offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"{offset:#x}+{length:#x} outside the {self.size:#x}-byte slot")
        return bytes(self.view[offset : offset + length])

    def _drop_local(self) -> None:
        super()._drop_local()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class IoEventFd(_Resource):
    """A doorbell: KVM signals ``fd`` when the guest writes the address (see add_ioeventfd)."""

    def __init__(
        self,
        session: KvmSession,
        address: int,
        length: int,
        datamatch: int | None,
        pio: bool,
    ) -> None:
        super().__init__(session)
        self.address = address
        self.length = length
        self.datamatch = datamatch
        self.pio = pio
        self.fd = -1
        try:
            target_fd, self.fd, close_id = session._target_eventfd("ioeventfd")
            self._undo_ids.append(("close ioeventfd", close_id))
            flags = (llkvm.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
                llkvm.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0
            )
            match = datamatch or 0
            assign = llkvm.ioeventfd(address, length, target_fd, flags, match)
            deassign = llkvm.ioeventfd(
                address, length, target_fd, flags | llkvm.KVM_IOEVENTFD_FLAG_DEASSIGN, match
            )
            vm_fd = session.handles.vm_fd
            result = session._ioctl(
                vm_fd, llkvm.KVM_IOEVENTFD, "KVM_IOEVENTFD", data=assign,
                undo=UndoSpec(
                    llkvm.SYS_ioctl, args=(vm_fd, llkvm.KVM_IOEVENTFD, 0), buffer_args=(2,),
                    data=deassign,
                ),
            )  # fmt: skip
            self._undo_ids.append(("deassign ioeventfd", result.undo_id))
        except BaseException:
            self.remove()
            raise

    def count(self) -> int:
        """Guest writes since the last call (resets the counter; never blocks)."""
        return _eventfd_count(self.fd)

    def wait(self, timeout: float) -> int:
        """Wait for a guest write; the count, or 0 on timeout."""
        return _eventfd_wait(self.fd, timeout)

    def _drop_local(self) -> None:
        super()._drop_local()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class IrqFd(_Resource):
    """An interrupt line into the guest: ``trigger()`` raises GSI ``gsi``.

    With ``resample`` the line is level-triggered: it stays raised until the guest EOIs, and
    then ``resample_fd`` fires (``wait_eoi``).
    """

    def __init__(self, session: KvmSession, gsi: int, resample: bool) -> None:
        super().__init__(session)
        self.gsi = gsi
        self.resample = resample
        self.fd = -1
        self.resample_fd = -1
        try:
            target_fd, self.fd, close_id = session._target_eventfd("irqfd")
            self._undo_ids.append(("close irqfd", close_id))
            target_resample = 0
            flags = 0
            if resample:
                target_resample, self.resample_fd, close_id = session._target_eventfd(
                    "irqfd resample"
                )
                self._undo_ids.append(("close irqfd resample", close_id))
                flags = llkvm.KVM_IRQFD_FLAG_RESAMPLE
            assign = llkvm.irqfd(target_fd, gsi, flags, target_resample)
            deassign = llkvm.irqfd(target_fd, gsi, llkvm.KVM_IRQFD_FLAG_DEASSIGN)
            vm_fd = session.handles.vm_fd
            result = session._ioctl(
                vm_fd, llkvm.KVM_IRQFD, "KVM_IRQFD", data=assign,
                undo=UndoSpec(
                    llkvm.SYS_ioctl, args=(vm_fd, llkvm.KVM_IRQFD, 0), buffer_args=(2,),
                    data=deassign,
                ),
            )  # fmt: skip
            self._undo_ids.append(("deassign irqfd", result.undo_id))
        except BaseException:
            self.remove()
            raise

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def wait_eoi(self, timeout: float) -> bool:
        """With ``resample``: wait until the guest acknowledged the interrupt."""
        if self.resample_fd < 0:
            raise DvsError("this irqfd was made without resample")
        return _eventfd_wait(self.resample_fd, timeout) > 0

    def _drop_local(self) -> None:
        super()._drop_local()
        for name in ("fd", "resample_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class MmioTrap:
    """Guest accesses to [base, base+size) answered by dvs instead of the hypervisor.

    The guardian follows the KVM_RUN exits of the vCPU threads (their other syscalls stop
    being traced once every vCPU has been seen) and forwards each access in the window to a
    C loop in a dvs thread that serves it from ``bank`` (reads return its bytes, writes store
    into it). The hypervisor sees an interrupted KVM_RUN instead of the access. With
    ``reads_by_guardian`` the bank is shared with the guardian, which answers reads itself.
    """

    def __init__(
        self,
        session: KvmSession,
        base: int,
        size: int,
        reply_timeout: float,
        reads_by_guardian: bool = False,
    ) -> None:
        self._session = session
        self.base = base
        self.size = size
        self.reads_by_guardian = reads_by_guardian
        self.bank = MmioBank(base, size, session._guardian if reads_by_guardian else None)
        self.stopped = False
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="dvs-mmio", daemon=True)
        self._error: BaseException | None = None
        self._thread.start()
        vcpus = [(v.index, v.fd) for v in session.handles.vcpus]
        self._reads_before = session.status().mmio_reads if reads_by_guardian else 0
        try:
            session._call(
                "trap MMIO",
                lambda g: g.trap_start(
                    base, size, vcpus, vcpu_mmap_size(), reply_timeout, reads_by_guardian
                ),
            )
        except BaseException:
            self._stop_serving()
            raise

    def _serve(self) -> None:
        try:
            self.bank.serve(self._session._guardian.mmio_fd, self._stop_fd)
        except BaseException as error:  # reported by stop()
            self._error = error

    def __enter__(self) -> MmioTrap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set(self, offset: int, value: int, width: int = 4) -> None:
        """Set a register the guest will read."""
        self.bank.view[offset : offset + width] = value.to_bytes(width, "little")

    def get(self, offset: int, width: int = 4) -> int:
        """A register as the guest last wrote it (or as set)."""
        return int.from_bytes(self.bank.view[offset : offset + width], "little")

    @property
    def reads(self) -> int:
        if self.reads_by_guardian:
            return self._session.status().mmio_reads - self._reads_before
        return self.bank.reads

    @property
    def writes(self) -> int:
        return self.bank.writes

    def stop(self) -> None:
        """Give the window back to the hypervisor."""
        if self.stopped:
            return
        try:
            if not self._session.closed:
                self._session._call("stop trapping MMIO", lambda g: g.trap_stop())
        finally:
            self._stop_serving()
        if not self._session.closed:
            self._session._guardian.drain_mmio()

    def _stop_serving(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join(timeout=10)
        os.close(self._stop_fd)
        if self._error is not None:
            raise DvsError(f"serving trapped MMIO failed: {self._error}") from self._error


def vcpu_states(pid: int) -> list[VcpuState]:
    """Registers, control registers and paging mode of every vCPU of KVM hypervisor ``pid``.

    Attaches, stops the hypervisor for the few injected ioctls (well under a second), detaches.
    """
    with KvmSession(pid) as session:
        return [session.vcpu_state(v.index) for v in session.handles.vcpus]
