"""``dvs vm vcpus PID``: the vCPU state of a running KVM hypervisor, read by syscall injection.

It attaches (every hypervisor thread stops for a few milliseconds), reads each vCPU's
registers and control registers with injected KVM_GET_REGS/KVM_GET_SREGS, and detaches; the
hypervisor keeps running with its registers, fds and memory map unchanged.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvs.cli import Cli
    from dvs.hypervisor.vcpu import VcpuState


def format_vcpu(state: VcpuState) -> str:
    r = state.regs
    s = state.sregs
    root = state.page_table_root
    lines = [
        f"vCPU {state.index}: {state.paging_mode} paging, CPL {state.cpl}, "
        f"CR3 {state.cr3:#x}" + (f" (page tables at {root:#x})" if root is not None else "")
        + f", last exit: {state.exit_reason}",
        f"  rip {r.rip:#018x}  rsp {r.rsp:#018x}  rflags {r.rflags:#x}",
        f"  rax {r.rax:#018x}  rbx {r.rbx:#018x}  rcx {r.rcx:#018x}  rdx {r.rdx:#018x}",
        f"  rsi {r.rsi:#018x}  rdi {r.rdi:#018x}  rbp {r.rbp:#018x}",
        f"  cr0 {s.cr0:#x}  cr2 {s.cr2:#x}  cr4 {s.cr4:#x}  efer {s.efer:#x}  "
        f"apic_base {s.apic_base:#x}",
        f"  cs {s.cs.selector:#06x} base {s.cs.base:#x} l={s.cs.l} db={s.cs.db} dpl={s.cs.dpl}  "
        f"gdt {s.gdt.base:#x}/{s.gdt.limit:#x}  idt {s.idt.base:#x}/{s.idt.limit:#x}",
    ]  # fmt: skip
    return "\n".join(lines)


def _vcpus(args: argparse.Namespace) -> int:
    from dvs.hypervisor.discovery import find_kvm
    from dvs.hypervisor.session import vcpu_states

    handles = find_kvm(args.pid)
    states = vcpu_states(args.pid)
    if args.json:
        print(
            json.dumps(
                {
                    "pid": args.pid,
                    "vm_fd": handles.vm_fd,
                    "vcpus": [
                        {**state.as_dict(), "fd": handles.vcpu(state.index).fd} for state in states
                    ],
                },
                indent=2,
            )
        )
        return 0
    vcpu_list = ", ".join(f"{v.index} (fd {v.fd})" for v in handles.vcpus)
    print(f"KVM hypervisor {args.pid}: VM fd {handles.vm_fd}, vCPUs {vcpu_list}")
    for state in states:
        print(format_vcpu(state))
    return 0


def register(cli: Cli) -> None:
    cmd = cli.command(
        "vcpus",
        "show the registers, CR3 and paging mode of every vCPU of a KVM hypervisor process",
        _vcpus,
        group="vm",
    )
    cmd.add_argument("pid", type=int, help="the hypervisor's process id (e.g. QEMU)")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
