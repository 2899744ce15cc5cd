"""Acting inside a running KVM hypervisor from outside (VMSH's engine, rebuilt).

KVM refuses VM and vCPU ioctls from any process but the VM's creator, so dvs stops the
hypervisor with ptrace and runs syscalls inside it (a guardian child process does the
tracing; see csrc/ptrace/hv.h). ``discovery`` finds the VM/vCPU fds and kvm_run mappings,
``session.KvmSession`` offers registers, extra guest memory, doorbells (ioeventfd),
interrupts (irqfd) and MMIO trapping, ``vcpu`` decodes vCPU state, and
``session.vcpu_states`` is what ``dvs vm vcpus`` (and ``dvs vm inspect``) print.
"""

from __future__ import annotations

from dvs.hypervisor.discovery import KvmHandles, VcpuHandle, find_kvm, is_kvm_hypervisor
from dvs.hypervisor.session import (
    IoEventFd,
    IrqFd,
    KvmSession,
    MemorySlot,
    MmioTrap,
    vcpu_states,
)
from dvs.hypervisor.vcpu import Regs, Sregs, VcpuState

__all__ = [
    "IoEventFd",
    "IrqFd",
    "KvmHandles",
    "KvmSession",
    "MemorySlot",
    "MmioTrap",
    "Regs",
    "Sregs",
    "VcpuHandle",
    "VcpuState",
    "find_kvm",
    "is_kvm_hypervisor",
    "vcpu_states",
]
