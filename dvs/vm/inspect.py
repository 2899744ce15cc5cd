"""``dvs vm inspect``: what we can tell about a VM from its hypervisor process alone.

The data model is a tree of dataclasses that serialises to JSON unchanged: the hypervisor
process, the guest RAM regions (guest-physical -> host-virtual, one or more per hypervisor
mapping, each with what placed it; mappings that could not be placed are problems), and the
kernel found in them (version, KASLR offsets, paging mode, memory-layout bases, symbol-table
sizes, a few resolved symbols and struct member offsets from the guest's own BTF, and the
checks that validated it).
``vcpus`` is filled only when the hypervisor is a KVM VMM: dvs.hypervisor reads each vCPU's
registers by syscall injection (a few milliseconds of stopped threads). Under TCG there are no
KVM vCPUs to ask and ``vcpus`` stays ``None``; the kernel facts never depend on registers, and
a KVM guest that runs no Linux kernel is still described (regions unplaced, vCPUs, a problem).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dvs.lowlevel.guestmem import GuestMemoryFault
from dvs.vm.errors import GuestLayoutError, KernelNotFound, TranslationFault
from dvs.vm.kernel import LinuxKernel, find_kernel
from dvs.vm.memory import HypervisorProcess
from dvs.vm.paging import PageTables

SHOWN_SYMBOLS = (
    "_text",
    "init_top_pgt",
    "init_task",
    "linux_banner",
    "_printk",
    "queue_work_on",
    "system_wq",
    "vmstat_shepherd",
)
"""Resolved through kallsyms and, where exported, cross-checked against the ksymtab."""

SHOWN_OFFSETS = (
    ("task_struct", "pid"),
    ("task_struct", "comm"),
    ("task_struct", "tasks"),
    ("task_struct", "mm"),
    ("mm_struct", "pgd"),
    ("work_struct", "func"),
    ("delayed_work", "timer.expires"),
    ("page", "flags"),
)


@dataclass
class RegionInfo:
    gpa: int
    size: int
    hva: int
    backing: str
    """``anonymous``, ``shared-memory`` or ``file`` (with the path when there is one)."""
    placed_by: str = ""
    """What fixed the guest-physical address: the kernel image, self-pointer votes, or the
    e820 map's uncovered RAM (``dvs.vm.placement``)."""


@dataclass
class VcpuInfo:
    """Registers of one vCPU, when a backend can read them (not from memory alone)."""

    index: int
    registers: dict[str, int] = field(default_factory=dict)
    paging_mode: str = ""
    page_table_root: int | None = None
    cpl: int | None = None
    exit_reason: str | None = None


@dataclass
class KernelInfo:
    banner: str
    release: str
    text_va: int
    text_pa: int
    phys_base: int
    physical_start: int
    kaslr_virtual_offset: int
    kaslr_physical_offset: int
    page_offset_base: int
    vmalloc_base: int
    vmemmap_base: int
    paging_levels: int
    root_pa: int
    pti: bool
    max_pfn: int
    kallsyms_count: int
    ksymtab_format: str
    ksymtab_count: int
    ksymtab_gpl_count: int
    btf_types: int
    symbols: dict[str, int]
    struct_offsets: dict[str, int]
    struct_sizes: dict[str, int]
    checks: list[str]


@dataclass
class VmInspection:
    pid: int
    hypervisor: str
    comm: str
    exe: str
    layout: str
    regions: list[RegionInfo]
    kernel: KernelInfo | None
    seconds: float
    vcpus: list[VcpuInfo] | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_text(self) -> str:
        lines = [
            f"hypervisor   {self.hypervisor} (pid {self.pid}, {self.exe or self.comm})",
            f"RAM layout   {self.layout}",
        ]
        for r in self.regions:
            lines.append(
                f"  gpa {r.gpa:#014x}-{r.gpa + r.size:#014x} ({r.size >> 20} MiB) "
                f"at hva {r.hva:#x} [{r.backing}]" + (f" by {r.placed_by}" if r.placed_by else "")
            )
        k = self.kernel
        if k is not None:
            lines += [
                f"kernel       {k.banner}",
                f"_text        va {k.text_va:#x}  pa {k.text_pa:#x}  phys_base {k.phys_base:#x}",
                f"KASLR        virtual offset {k.kaslr_virtual_offset:#x}, physical offset "
                f"{k.kaslr_physical_offset:#x} (PHYSICAL_START {k.physical_start:#x})",
                f"paging       {k.paging_levels}-level, init_top_pgt at pa {k.root_pa:#x}, "
                f"PTI {'on' if k.pti else 'off'}",
                f"bases        page_offset {k.page_offset_base:#x}  vmalloc {k.vmalloc_base:#x}"
                f"  vmemmap {k.vmemmap_base:#x}",
                f"symbols      kallsyms {k.kallsyms_count}, ksymtab {k.ksymtab_count} + gpl "
                f"{k.ksymtab_gpl_count} ({k.ksymtab_format}), BTF types {k.btf_types}",
            ]
            lines += [f"  {name:<22} {value:#x}" for name, value in k.symbols.items()]
            lines += [f"  offsetof({name}) = {value}" for name, value in k.struct_offsets.items()]
            lines += [f"  sizeof({name}) = {value}" for name, value in k.struct_sizes.items()]
            lines += [f"check        {c}" for c in k.checks]
        if self.vcpus is not None:
            for v in self.vcpus:
                root = f"{v.page_table_root:#x}" if v.page_table_root is not None else "none"
                lines.append(
                    f"vcpu {v.index}       {v.paging_mode} paging, CPL {v.cpl}, page tables at "
                    f"{root}, last exit {v.exit_reason}"
                )
                regs = " ".join(f"{n}={x:#x}" for n, x in v.registers.items())
                lines.append(f"  {regs}")
        lines += [f"problem      {p}" for p in self.problems]
        lines.append(f"took         {self.seconds:.2f} s")
        return "\n".join(lines)


def describe_kernel(kernel: LinuxKernel) -> tuple[KernelInfo, list[str]]:
    """Summarise a located kernel; parts that fail (no BTF...) become problems, not errors."""
    problems: list[str] = []
    ks = kernel.kallsyms
    symbols = {name: ks.lookup(name) for name in SHOWN_SYMBOLS if name in ks}
    fmt, plain, gpl = "", 0, 0
    try:
        table = kernel.ksymtab
        fmt, plain, gpl = table.format, table.count, table.gpl_count
        exported = table.as_dict()
        for name, value in symbols.items():
            if name in exported and exported[name] != value:
                problems.append(f"ksymtab says {name} is {exported[name]:#x}, kallsyms {value:#x}")
    except GuestLayoutError as exc:
        problems.append(f"ksymtab: {exc}")
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    btf_types = 0
    try:
        btf = kernel.btf
        btf_types = len(btf)
        for struct_name, member in SHOWN_OFFSETS:
            try:
                offsets[f"{struct_name}.{member}"] = btf.offsetof(struct_name, member)
            except KeyError as exc:
                problems.append(f"BTF: {exc}")
        for struct_name in ("task_struct", "page", "mm_struct"):
            sizes[struct_name] = btf.struct_size(struct_name)
    except (GuestLayoutError, KeyError) as exc:
        problems.append(f"BTF: {exc}")
    info = KernelInfo(
        banner=kernel.banner,
        release=kernel.release,
        text_va=kernel.text_va,
        text_pa=kernel.text_pa,
        phys_base=kernel.phys_base,
        physical_start=kernel.physical_start,
        kaslr_virtual_offset=kernel.kaslr_virtual_offset,
        kaslr_physical_offset=kernel.kaslr_physical_offset,
        page_offset_base=kernel.page_offset_base,
        vmalloc_base=kernel.vmalloc_base,
        vmemmap_base=kernel.vmemmap_base,
        paging_levels=int(kernel.paging_mode),
        root_pa=kernel.root_pa,
        pti=kernel.pti,
        max_pfn=kernel.max_pfn,
        kallsyms_count=len(ks),
        ksymtab_format=fmt,
        ksymtab_count=plain,
        ksymtab_gpl_count=gpl,
        btf_types=btf_types,
        symbols=symbols,
        struct_offsets=offsets,
        struct_sizes=sizes,
        checks=list(kernel.checks),
    )
    return info, problems


def read_vcpus(pid: int) -> list[VcpuInfo] | None:
    """The vCPU state of a KVM hypervisor (None for TCG and other non-KVM processes)."""
    from dvs.hypervisor.discovery import is_kvm_hypervisor
    from dvs.hypervisor.session import vcpu_states

    if not is_kvm_hypervisor(pid):
        return None
    infos = []
    for state in vcpu_states(pid):
        registers = {name: state.regs.as_dict()[name] for name in VCPU_REGISTERS}
        registers |= {
            "cr0": state.sregs.cr0,
            "cr3": state.cr3,
            "cr4": state.sregs.cr4,
            "efer": state.sregs.efer,
        }
        infos.append(
            VcpuInfo(
                state.index,
                registers,
                state.paging_mode,
                state.page_table_root,
                state.cpl,
                state.exit_reason,
            )
        )
    return infos


VCPU_REGISTERS = ("rip", "rsp", "rflags")


def inspect_vm(pid: int) -> tuple[VmInspection, LinuxKernel | None]:
    """Describe the VM of hypervisor ``pid``: its guest kernel and, on KVM, its vCPUs.

    Without KVM vCPUs a missing kernel is an error (``KernelNotFound``); with them the VM is
    still described and the missing kernel becomes a problem.
    """
    started = time.monotonic()
    vcpus = read_vcpus(pid)
    try:
        kernel = find_kernel(pid)
    except KernelNotFound as exc:
        if vcpus is None:
            raise
        process = HypervisorProcess.of(pid)
        inspection = VmInspection(
            pid=pid, hypervisor=process.kind, comm=process.comm, exe=process.exe,
            layout="unknown (no Linux kernel to validate a layout)", regions=[], kernel=None,
            seconds=time.monotonic() - started, vcpus=vcpus, problems=[str(exc)],
        )  # fmt: skip
        return inspection, None
    info, problems = describe_kernel(kernel)
    ram = kernel.ram
    regions = [
        RegionInfo(
            r.gpa,
            r.size,
            r.hva,
            r.mapping.kind + (f" {r.mapping.path}" if r.mapping.path else ""),
            r.placed_by,
        )
        for r in ram.regions
    ]
    problems = [*ram.problems, *problems]
    for vcpu in vcpus or []:
        if vcpu.cpl == 0 and vcpu.page_table_root not in (None, kernel.root_pa):
            # a vCPU in the kernel runs on some process's page tables; they must still map
            # the kernel image where the memory-only finder placed it
            problems += _check_vcpu_root(kernel, vcpu)
    inspection = VmInspection(
        pid=pid,
        hypervisor=ram.process.kind,
        comm=ram.process.comm,
        exe=ram.process.exe,
        layout=ram.layout,
        regions=regions,
        kernel=info,
        seconds=time.monotonic() - started,
        vcpus=vcpus,
        problems=problems,
    )
    return inspection, kernel


def _check_vcpu_root(kernel: LinuxKernel, vcpu: VcpuInfo) -> list[str]:
    assert vcpu.page_table_root is not None
    try:
        tables = PageTables(kernel.ram.mem, vcpu.page_table_root, kernel.paging_mode)
        pa = tables.translate(kernel.text_va).pa
    except (TranslationFault, GuestMemoryFault) as exc:
        return [f"vCPU {vcpu.index}'s page tables do not map _text: {exc}"]
    if pa != kernel.text_pa:
        return [f"vCPU {vcpu.index}'s page tables map _text at {pa:#x}, not {kernel.text_pa:#x}"]
    return []
