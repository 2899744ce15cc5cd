"""x86-64 page tables read from guest-physical memory: translation and enumeration.

What the hardware defines (Intel SDM vol. 3A ch. 4, AMD APM vol. 2 ch. 5), and we rely on:

* 4-level paging translates 48-bit canonical virtual addresses through PML4 -> PDPT -> PD ->
  PT, 9 index bits per level above a 12-bit page offset; 5-level paging (CR4.LA57) adds a PML5
  on top and 57-bit addresses. Each table is one 4 KiB page of 512 little-endian 64-bit entries.
* Entry bits: 0 present, 1 writable, 2 user, 3 PWT, 4 PCD, 5 accessed, 6 dirty, 7 PS (a 1 GiB
  leaf in a PDPT, a 2 MiB leaf in a PD; reserved in PML4/PML5), 8 global (leaves only), 63 NX.
  The physical address sits in bits 12..51; in a large leaf bit 12 is the PAT bit, so a 2 MiB
  frame is bits 21..51 and a 1 GiB frame bits 30..51. Bits 52..62 are ignored by the walk
  (software bits, protection keys).
* Effective rights are combined along the walk: writable and user only if every level says so;
  no-execute if any level says so.
* CR3 holds the root table's frame in bits 12..51. Its low 12 bits are PCID when CR4.PCIDE is
  set, else PWT/PCD flags; bit 63 (no-flush) only exists in values *written* to CR3, and bits
  61/62 are LAM controls. ``decode_cr3`` strips all of that.
* Linux page-table isolation (PTI) allocates each PGD as an 8 KiB-aligned pair: the kernel's
  table in the even page and the user copy in the odd one; the user CR3 has bit 12 set.
  ``kernel_root`` clears it, so a CR3 sampled while a vCPU was in user mode still gives the
  table that maps the whole kernel.

Everything read here is guest data: a table outside guest RAM, a PS bit where it is reserved
or a non-canonical address raise ``GuestLayoutError``; an address that is simply not mapped
raises ``TranslationFault``. Enumeration reads tables level by level, every table of a level in
one batched read, and is bounded by ``max_tables`` so a hostile guest whose tables all point at
themselves cannot make it run away.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dvs.lowlevel.guestmem import GuestMemoryFault
from dvs.vm.errors import GuestLayoutError, TranslationFault

PAGE_SIZE = 4096
ENTRIES_PER_TABLE = 512

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PS = 1 << 7
PTE_GLOBAL = 1 << 8
PTE_NX = 1 << 63
PHYS_ADDR_MASK = 0x000F_FFFF_FFFF_F000
PTI_USER_PGD_BIT = 1 << 12

_U64 = np.uint64


class PagingMode(enum.IntEnum):
    FOUR_LEVEL = 4
    FIVE_LEVEL = 5

    @property
    def va_bits(self) -> int:
        return 12 + 9 * int(self)


def level_span(level: int) -> int:
    """Bytes covered by one entry of a table at ``level`` (1 = PT ... 5 = PML5)."""
    return 1 << (12 + 9 * (level - 1))


def is_canonical(va: int, mode: PagingMode) -> bool:
    top = va >> (mode.va_bits - 1)
    return 0 <= va < 1 << 64 and top in (0, (1 << (65 - mode.va_bits)) - 1)


def canonical(va: int, mode: PagingMode) -> int:
    """Sign-extend a ``mode.va_bits``-bit address to 64 bits."""
    bits = mode.va_bits
    va &= (1 << bits) - 1
    if va >> (bits - 1):
        va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return va


@dataclass(frozen=True)
class Cr3:
    root: int
    """Physical address of the top-level table."""
    pcid: int
    pwt: bool
    pcd: bool


def decode_cr3(cr3: int, *, pcide: bool = False) -> Cr3:
    """Split a CR3 value into the root table address and PCID or cache flags."""
    low = cr3 & 0xFFF
    return Cr3(
        root=cr3 & PHYS_ADDR_MASK,
        pcid=low if pcide else 0,
        pwt=not pcide and bool(low & PTE_PWT),
        pcd=not pcide and bool(low & PTE_PCD),
    )


def kernel_root(root: int) -> int:
    """The kernel half of a PTI PGD pair (the even page); identity without PTI."""
    return root & ~PTI_USER_PGD_BIT


def user_root(root: int) -> int:
    """The user copy of a PTI PGD pair (the odd page)."""
    return root | PTI_USER_PGD_BIT


class PhysicalMemory(Protocol):
    """What the walker needs from guest memory (``GuestMemory`` provides it)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def read_batch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    def contains(self, gpa: int, length: int) -> bool: ...


@dataclass(frozen=True)
class Translation:
    va: int
    pa: int
    page_size: int
    writable: bool
    user: bool
    executable: bool
    global_: bool
    entries: tuple[int, ...]
    """The entries read, top level first (for diagnostics)."""

    @property
    def page_pa(self) -> int:
        return self.pa & ~(self.page_size - 1)


@dataclass(frozen=True)
class MappingRun:
    """Virtually and physically contiguous pages with the same effective rights."""

    va: int
    pa: int
    size: int
    writable: bool
    user: bool
    executable: bool
    global_: bool

    @property
    def end(self) -> int:
        return self.va + self.size

    def contains(self, va: int) -> bool:
        return self.va <= va < self.end


def _leaf_frame(entry: int, level: int) -> int:
    return entry & PHYS_ADDR_MASK & ~(level_span(level) - 1)


class PageTables:
    """One address space: a root table plus the paging mode, over guest-physical memory."""

    def __init__(
        self,
        mem: PhysicalMemory,
        root: int,
        mode: PagingMode = PagingMode.FOUR_LEVEL,
        *,
        max_tables: int = 1 << 18,
    ) -> None:
        self.mem = mem
        self.root = root & PHYS_ADDR_MASK
        self.mode = mode
        self.max_tables = max_tables

    def _read_table_entry(self, table: int, index: int, level: int, va: int) -> int:
        try:
            raw = self.mem.read(table + 8 * index, 8)
        except GuestMemoryFault:
            raise GuestLayoutError(
                "page tables lie in guest RAM",
                f"level-{level} table at {table:#x} (walking {va:#x}) is outside RAM",
            ) from None
        return int.from_bytes(raw, "little")

    def translate(self, va: int) -> Translation:
        """Translate one virtual address; ``TranslationFault`` if it is not mapped."""
        if not is_canonical(va, self.mode):
            raise GuestLayoutError(
                "virtual addresses are canonical", f"{va:#x} in {self.mode.va_bits}-bit paging"
            )
        table = self.root
        writable = user = True
        nx = False
        entries: list[int] = []
        for level in range(int(self.mode), 0, -1):
            index = (va >> (12 + 9 * (level - 1))) & 0x1FF
            entry = self._read_table_entry(table, index, level, va)
            entries.append(entry)
            if not entry & PTE_PRESENT:
                raise TranslationFault(va, level, entry)
            writable &= bool(entry & PTE_WRITABLE)
            user &= bool(entry & PTE_USER)
            nx |= bool(entry & PTE_NX)
            large = bool(entry & PTE_PS)
            if large and level > 3:
                raise GuestLayoutError(
                    "PS is clear in PML4/PML5 entries", f"level {level} entry {entry:#x}"
                )
            if level == 1 or large:
                span = level_span(level)
                return Translation(
                    va=va,
                    pa=_leaf_frame(entry, level) | (va & (span - 1)),
                    page_size=span,
                    writable=writable,
                    user=user,
                    executable=not nx,
                    global_=bool(entry & PTE_GLOBAL),
                    entries=tuple(entries),
                )
            table = entry & PHYS_ADDR_MASK
        raise AssertionError("unreachable: level 1 always ends the walk")

    def table_entry(self, va: int, level: int) -> tuple[int, int, int]:
        """``(table address, index, entry)`` of the level-``level`` entry that maps ``va``.

        Every level above must be a present non-leaf entry (``TranslationFault`` or
        ``GuestLayoutError`` otherwise); the entry itself may be anything.
        """
        if not is_canonical(va, self.mode):
            raise GuestLayoutError(
                "virtual addresses are canonical", f"{va:#x} in {self.mode.va_bits}-bit paging"
            )
        table = self.root
        for current in range(int(self.mode), level - 1, -1):
            index = (va >> (12 + 9 * (current - 1))) & 0x1FF
            entry = self._read_table_entry(table, index, current, va)
            if current == level:
                return table, index, entry
            if not entry & PTE_PRESENT:
                raise TranslationFault(va, current, entry)
            if entry & PTE_PS:
                raise GuestLayoutError(
                    "the walk reaches the requested level", f"level-{current} leaf {entry:#x}"
                )
            table = entry & PHYS_ADDR_MASK
        raise ValueError(f"level {level} is not in {int(self.mode)}-level paging")

    def try_translate(self, va: int) -> Translation | None:
        try:
            return self.translate(va)
        except TranslationFault:
            return None

    def va_to_pa(self, va: int) -> int:
        return self.translate(va).pa

    def mappings(
        self, start: int = 0, end: int = 1 << 64, *, merge: bool = True
    ) -> list[MappingRun]:
        """Every present leaf mapping within ``[start, end)`` (canonical addresses).

        Entries that point outside guest RAM, or set PS where it is reserved, are skipped
        and counted in ``self.skipped_entries``; exceeding ``max_tables`` tables per level
        raises ``GuestLayoutError``.
        """
        self.skipped_entries = 0
        top = int(self.mode)
        # Per pending table: physical address, virtual base, inherited W / U / NX.
        tables = np.array([self.root], dtype=_U64)
        bases = np.array([0], dtype=_U64)
        inherited = np.array([PTE_WRITABLE | PTE_USER], dtype=_U64)  # NX tracked as bit 63
        leaves: list[tuple[npt.NDArray[np.uint64], ...]] = []
        start_c, end_c = np.uint64(start), np.uint64(min(end, (1 << 64) - 1))
        for level in range(top, 0, -1):
            if len(tables) == 0:
                break
            if len(tables) > self.max_tables:
                raise GuestLayoutError(
                    "page tables are a bounded tree",
                    f"{len(tables)} level-{level} tables (limit {self.max_tables})",
                )
            entries = self._read_tables(tables)
            span = level_span(level)
            index = np.arange(ENTRIES_PER_TABLE, dtype=_U64)
            va = bases[:, None] + index[None, :] * _U64(span)
            if level == top:
                va = self._sign_extend(va)
            last = va + _U64(span - 1)
            present = (entries & _U64(PTE_PRESENT)) != 0
            in_range = (last >= start_c) & (va < end_c)
            live = present & in_range
            large = (entries & _U64(PTE_PS)) != 0
            if level > 3:
                bad = live & large
                self.skipped_entries += int(bad.sum())
                live &= ~large
                large = np.zeros_like(large)
            rights = (inherited[:, None] & entries & _U64(PTE_WRITABLE | PTE_USER)) | (
                (inherited[:, None] | entries) & _U64(PTE_NX)
            )
            is_leaf = live & (large if level > 1 else np.ones_like(live))
            if is_leaf.any():
                mask = ~_U64(span - 1) & _U64(PHYS_ADDR_MASK)
                leaf_entries = entries[is_leaf]
                leaves.append(
                    (
                        va[is_leaf],
                        leaf_entries & mask,
                        np.full(int(is_leaf.sum()), span, dtype=_U64),
                        rights[is_leaf] | (leaf_entries & _U64(PTE_GLOBAL)),
                    )
                )
            descend = live & ~is_leaf
            tables = entries[descend] & _U64(PHYS_ADDR_MASK)
            bases = va[descend]
            inherited = rights[descend]
        if not leaves:
            return []
        va_all = np.concatenate([leaf[0] for leaf in leaves])
        pa_all = np.concatenate([leaf[1] for leaf in leaves])
        size_all = np.concatenate([leaf[2] for leaf in leaves])
        flags_all = np.concatenate([leaf[3] for leaf in leaves])
        order = np.argsort(va_all, kind="stable")
        va_all, pa_all, size_all, flags_all = (
            va_all[order],
            pa_all[order],
            size_all[order],
            flags_all[order],
        )
        if merge and len(va_all) > 1:
            follows = (
                (va_all[1:] == va_all[:-1] + size_all[:-1])
                & (pa_all[1:] == pa_all[:-1] + size_all[:-1])
                & (flags_all[1:] == flags_all[:-1])
            )
            starts = np.concatenate([[0], np.nonzero(~follows)[0] + 1])
            sizes = np.add.reduceat(size_all, starts)
            va_all, pa_all, flags_all, size_all = (
                va_all[starts],
                pa_all[starts],
                flags_all[starts],
                sizes,
            )
        return [
            MappingRun(
                va=int(v),
                pa=int(p),
                size=int(s),
                writable=bool(f & _U64(PTE_WRITABLE)),
                user=bool(f & _U64(PTE_USER)),
                executable=not bool(f & _U64(PTE_NX)),
                global_=bool(f & _U64(PTE_GLOBAL)),
            )
            for v, p, s, f in zip(
                va_all.tolist(), pa_all.tolist(), size_all.tolist(), flags_all.tolist(), strict=True
            )
        ]

    def _sign_extend(self, va: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        bits = self.mode.va_bits
        high = ((1 << 64) - 1) ^ ((1 << bits) - 1)
        negative = (va >> _U64(bits - 1)) & _U64(1)
        return np.where(negative != 0, va | _U64(high), va)

    def _read_tables(self, tables: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Read every table in one batch; a table outside RAM reads as all not-present."""
        addresses = tables.tolist()
        inside = [self.mem.contains(a, PAGE_SIZE) for a in addresses]
        wanted = [(a, PAGE_SIZE) for a, ok in zip(addresses, inside, strict=True) if ok]
        self.skipped_entries += len(addresses) - len(wanted)
        out = np.zeros((len(addresses), ENTRIES_PER_TABLE), dtype=_U64)
        if wanted:
            chunks = self.mem.read_batch(wanted)
            rows = np.frombuffer(b"".join(chunks), dtype="<u8").reshape(-1, ENTRIES_PER_TABLE)
            out[np.array(inside, dtype=bool)] = rows
        return out
