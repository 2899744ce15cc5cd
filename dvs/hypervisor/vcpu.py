"""A vCPU's architectural state as KVM reports it (KVM_GET_REGS / KVM_GET_SREGS), decoded.

Semantics relied on (Intel SDM vol. 3, 2.5 and 4.1):

- Paging mode from CR0.PE (bit 0), CR0.PG (bit 31), CR4.PAE (bit 5), CR4.LA57 (bit 12) and
  EFER.LMA (bit 10): real mode without PE; no paging without PG; with LMA 4- or 5-level paging
  (LA57); else PAE or 32-bit paging.
- The page-table root in CR3: 4-KiB aligned physical address in 4/5-level and 32-bit paging
  (the low 12 bits are the PCID when CR4.PCIDE, bit 17, is set, else PWT/PCD flags); 32-byte
  aligned in PAE paging. Bits above MAXPHYADDR are reserved; 52 bits are the architectural
  maximum.
- The current privilege level is the RPL of CS in protected mode, 3 in virtual-8086 mode
  (RFLAGS.VM, bit 17) and 0 in real mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17
PHYS_ADDR_MASK = (1 << 52) - 1


@dataclass(frozen=True)
class Regs:
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int

    def replace(self, **changes: int) -> Regs:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Segment:
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name (64-bit code segment)
    g: int
    avl: int
    unusable: int


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


@dataclass(frozen=True)
class Sregs:
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, int, int, int]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Sregs:
        def seg(name: str) -> Segment:
            return Segment(**raw[name])

        def table(name: str) -> DescriptorTable:
            return DescriptorTable(**raw[name])

        bitmap = raw["interrupt_bitmap"]
        return cls(
            cs=seg("cs"), ds=seg("ds"), es=seg("es"), fs=seg("fs"), gs=seg("gs"), ss=seg("ss"),
            tr=seg("tr"), ldt=seg("ldt"), gdt=table("gdt"), idt=table("idt"),
            cr0=raw["cr0"], cr2=raw["cr2"], cr3=raw["cr3"], cr4=raw["cr4"], cr8=raw["cr8"],
            efer=raw["efer"], apic_base=raw["apic_base"],
            interrupt_bitmap=(bitmap[0], bitmap[1], bitmap[2], bitmap[3]),
        )  # fmt: skip

    @property
    def paging_mode(self) -> str:
        return paging_mode(self.cr0, self.cr4, self.efer)

    @property
    def page_table_root(self) -> int | None:
        return page_table_root(self.cr0, self.cr3, self.cr4, self.efer)

    @property
    def pcid(self) -> int | None:
        return self.cr3 & 0xFFF if self.cr4 & CR4_PCIDE else None


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    """One of: real, protected-no-paging, 32-bit, pae, 4-level, 5-level."""
    if not cr0 & CR0_PE:
        return "real"
    if not cr0 & CR0_PG:
        return "protected-no-paging"
    if efer & EFER_LMA:
        return "5-level" if cr4 & CR4_LA57 else "4-level"
    if cr4 & CR4_PAE:
        return "pae"
    return "32-bit"


def page_table_root(cr0: int, cr3: int, cr4: int, efer: int) -> int | None:
    """Physical address of the top-level page table, or None when paging is off."""
    mode = paging_mode(cr0, cr4, efer)
    if mode in ("real", "protected-no-paging"):
        return None
    if mode == "pae":
        return cr3 & 0xFFFF_FFE0
    if mode == "32-bit":
        return cr3 & 0xFFFF_F000
    return cr3 & PHYS_ADDR_MASK & ~0xFFF


def privilege_level(cr0: int, cs_selector: int, rflags: int) -> int:
    if not cr0 & CR0_PE:
        return 0
    if rflags & RFLAGS_VM:
        return 3
    return cs_selector & 3


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class Translation:
    linear_address: int
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


@dataclass(frozen=True)
class VcpuState:
    """What ``dvs vm vcpus``/``inspect`` shows per vCPU."""

    index: int
    regs: Regs
    sregs: Sregs
    exit_reason: str | None  # of the latest KVM_RUN, from the vCPU's kvm_run page

    @property
    def paging_mode(self) -> str:
        return self.sregs.paging_mode

    @property
    def cr3(self) -> int:
        return self.sregs.cr3

    @property
    def page_table_root(self) -> int | None:
        return self.sregs.page_table_root

    @property
    def cpl(self) -> int:
        return privilege_level(self.sregs.cr0, self.sregs.cs.selector, self.regs.rflags)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "paging_mode": self.paging_mode,
            "cr3": self.cr3,
            "page_table_root": self.page_table_root,
            "cpl": self.cpl,
            "exit_reason": self.exit_reason,
            "regs": self.regs.as_dict(),
            "sregs": asdict(self.sregs),
        }
