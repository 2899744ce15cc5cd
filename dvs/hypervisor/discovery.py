"""Finding a KVM hypervisor's handles from outside, read-only (no ptrace needed).

Semantics relied on:

- ``/proc/PID/fd/N`` links name KVM's anonymous inodes: ``anon_inode:kvm-vm`` is a VM fd,
  ``anon_inode:kvm-vcpu:<index>`` a vCPU fd (index = the vCPU id given to KVM_CREATE_VCPU),
  ``/dev/kvm`` the system fd. A process with more than one VM fd is refused (which VM would
  dvs act on?), as are duplicate vCPU indices.
- ``/proc/PID/maps`` shows each vCPU's ``kvm_run`` mapping with the pathname
  ``anon_inode:kvm-vcpu:<index>`` (shared, KVM_GET_VCPU_MMAP_SIZE bytes; kvm_run at offset 0).
- A thread's ``/proc/.../syscall`` is not a reliable sign of a vCPU thread: KVM's own worker
  thread (``kvm-nx-lpage-recovery``, PF_USER_WORKER) shows a stale ``ioctl(vcpu, KVM_RUN)``.
  Threads are listed with their flags so the engine can leave workers alone.
- Injection needs a ``syscall`` instruction (0f 05) in the target's executable memory. The vDSO
  has several (its fallback paths) and exists in every dynamically or statically linked
  process; libc's text is the fallback. Only the two bytes matter: the engine executes that
  one instruction and stops at the syscall's exit, so the bytes around it are never run.
- ``Seccomp: 2`` in /proc/PID/status means a filter is installed: an injected syscall the filter
  does not expect could be refused or kill the hypervisor, so dvs refuses unless told otherwise.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dvs.errors import NotPermitted, TargetGone, TargetNotFound
from dvs.hypervisor.errors import InjectionRefused, NotAKvmHypervisor
from dvs.lowlevel import kvm as llkvm

PF_USER_WORKER = 0x0000_4000  # include/linux/sched.h (6.4+): kernel worker in a user process

_VCPU_NAME = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class VcpuHandle:
    index: int
    fd: int  # the fd number inside the hypervisor
    kvm_run_address: int | None  # where the hypervisor mapped kvm_run (None: not mapped)
    kvm_run_size: int


@dataclass(frozen=True)
class KvmHandles:
    pid: int
    vm_fd: int
    system_fd: int | None
    vcpus: tuple[VcpuHandle, ...]

    def vcpu(self, index: int) -> VcpuHandle:
        for vcpu in self.vcpus:
            if vcpu.index == index:
                return vcpu
        known = ", ".join(str(v.index) for v in self.vcpus) or "none"
        raise KeyError(f"no vCPU {index} in pid {self.pid} (vCPUs: {known})")


@dataclass(frozen=True)
class ThreadInfo:
    tid: int
    name: str
    flags: int

    @property
    def kernel_worker(self) -> bool:
        return bool(self.flags & PF_USER_WORKER)


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/PID/maps text (pathnames may contain spaces)."""
    mappings = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5].strip() if len(parts) > 5 else ""
        mappings.append(Mapping(start, end, parts[1], int(parts[2], 16), path))
    return mappings


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None


def _fd_links(pid: int) -> dict[int, str]:
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        raise TargetNotFound(str(pid), [f"{base}: no such process"]) from None
    except PermissionError:
        raise NotPermitted(f"cannot list {base}: dvs needs root or ptrace access") from None
    links = {}
    for name in names:
        try:
            links[int(name)] = os.readlink(f"{base}/{name}")
        except (FileNotFoundError, ValueError):
            continue  # closed meanwhile
        except PermissionError:
            raise NotPermitted(
                f"cannot read {base}/{name}: dvs needs ptrace access to {pid}"
            ) from None
    return links


def handles_from(pid: int, fd_links: dict[int, str], maps: Sequence[Mapping]) -> KvmHandles:
    """Pick the KVM handles out of a process's fd links and maps (pure; see module note)."""
    vm_fds = sorted(fd for fd, link in fd_links.items() if link == "anon_inode:kvm-vm")
    if not vm_fds:
        raise NotAKvmHypervisor(pid)
    if len(vm_fds) > 1:
        raise NotAKvmHypervisor(pid, f"{len(vm_fds)} VM fds {vm_fds}: which VM is meant?")
    system_fds = sorted(fd for fd, link in fd_links.items() if link == "/dev/kvm")
    run_maps: dict[int, Mapping] = {}
    for mapping in maps:
        match = _VCPU_NAME.match(mapping.path)
        if match and mapping.offset == 0:
            run_maps.setdefault(int(match.group(1)), mapping)
    vcpus: dict[int, VcpuHandle] = {}
    for fd, link in sorted(fd_links.items()):
        match = _VCPU_NAME.match(link)
        if not match:
            continue
        index = int(match.group(1))
        if index in vcpus:
            raise NotAKvmHypervisor(pid, f"two fds ({vcpus[index].fd}, {fd}) for vCPU {index}")
        run = run_maps.get(index)
        vcpus[index] = VcpuHandle(
            index=index,
            fd=fd,
            kvm_run_address=run.start if run else None,
            kvm_run_size=run.size if run else 0,
        )
    return KvmHandles(
        pid=pid,
        vm_fd=vm_fds[0],
        system_fd=system_fds[0] if system_fds else None,
        vcpus=tuple(vcpus[i] for i in sorted(vcpus)),
    )


def find_kvm(pid: int) -> KvmHandles:
    """The VM fd, vCPU fds and kvm_run mappings of hypervisor ``pid``."""
    links = _fd_links(pid)
    return handles_from(pid, links, read_maps(pid))


def is_kvm_hypervisor(pid: int) -> bool:
    try:
        return any(link == "anon_inode:kvm-vm" for link in _fd_links(pid).values())
    except (TargetNotFound, NotPermitted):
        return False


def threads(pid: int) -> list[ThreadInfo]:
    """Every thread of ``pid`` with its name and kernel task flags."""
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out.append(ThreadInfo(tid, name, int(fields[6])))
    return out


def seccomp_mode(pid: int) -> int:
    """0 none, 1 strict, 2 filter (from /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    return 0


def find_syscall_instruction(pid: int, maps: Sequence[Mapping] | None = None) -> int:
    """Address of a ``syscall`` instruction in ``pid``'s executable memory (see module note)."""
    maps = list(maps) if maps is not None else read_maps(pid)

    def rank(m: Mapping) -> int:
        if m.path == "[vdso]":
            return 0
        if re.search(r"/libc[.-]", m.path):
            return 1
        return 2

    candidates = sorted(
        (m for m in maps if "x" in m.perms and m.path != "[vsyscall]" and m.size <= 64 << 20),
        key=rank,
    )
    tried = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for mapping in candidates:
            try:
                mem.seek(mapping.start)
                data = mem.read(mapping.size)
            except OSError as error:
                tried.append(f"{mapping.path or hex(mapping.start)}: {error}")
                continue
            at = data.find(b"\x0f\x05")
            if at >= 0:
                return mapping.start + at
            tried.append(f"{mapping.path or hex(mapping.start)}: no 0f 05")
    raise InjectionRefused(
        f"no syscall instruction in the executable memory of {pid}: " + "; ".join(tried[:5])
    )


def vcpu_mmap_size() -> int:
    """KVM_GET_VCPU_MMAP_SIZE (a /dev/kvm system ioctl: any process may ask)."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, llkvm.KVM_GET_VCPU_MMAP_SIZE)
    finally:
        os.close(fd)
