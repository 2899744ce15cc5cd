"""Errors of the hypervisor mechanics, as children of the dvs tree (dvs.errors)."""

from __future__ import annotations

import os

from dvs.errors import DvsError, NotPermitted, TargetNotFound


class NotAKvmHypervisor(TargetNotFound):
    """The process exists but holds no KVM VM file descriptor."""

    def __init__(self, pid: int, detail: str = "") -> None:
        tried = [f"/proc/{pid}/fd: no anon_inode:kvm-vm" + (f" ({detail})" if detail else "")]
        super().__init__(f"KVM hypervisor pid {pid}", tried)
        self.pid = pid


class InjectionRefused(NotPermitted):
    """Injecting syscalls into this process is unsafe or impossible (the message says why)."""


class KvmOperationFailed(DvsError):
    """A KVM ioctl (or a syscall around it) run inside the hypervisor returned an error."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        self.operation = operation
        self.errno = errno
        message = f"{operation} inside the hypervisor failed: {os.strerror(errno)}"
        super().__init__(f"{message} ({detail})" if detail else message)


class NoFreeMemslot(DvsError):
    """Every memory slot id tried from the top of KVM_CAP_NR_MEMSLOTS is in use."""


class AttachFailed(DvsError):
    """The guardian could not take hold of the hypervisor (the message says which step)."""

    def __init__(self, pid: int, errno: int, detail: str) -> None:
        self.pid = pid
        self.errno = errno
        super().__init__(f"attaching to hypervisor {pid} failed: {detail}")


class GuardianLost(DvsError):
    """The guardian process exited or stopped answering; it restores the target on its own."""
