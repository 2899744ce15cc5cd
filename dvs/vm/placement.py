"""Every guest-RAM mapping placed at its guest-physical addresses, from the guest kernel's data.

A hypervisor may back guest RAM with several mappings: QEMU one per NUMA memdev, laid end to
end in guest-physical order and, on the pc/q35 machines, cut at the PCI hole (so one mapping
can back a range below 4 GiB and another above it); Firecracker and Cloud Hypervisor one per
region (below the MMIO gap, above 4 GiB). Nothing we may read without the hypervisor's help
says which mapping is where, but the running kernel's memory does, in two ways:

* Where RAM is. ``boot_params`` (the x86 "zero page", Documentation/arch/x86/zero-page.rst)
  is copied into the kernel image at boot and kept there: ``e820_entries`` (u8 at 0x1e8) and
  ``e820_table`` (up to 128 packed ``{u64 addr, u64 size, u32 type}`` at 0x2d0) are the
  firmware's memory map. Type 1 (usable) entries are the RAM the kernel manages.
* Which bytes are where. The kernel reaches all RAM through its direct map, ``page_offset_base
  + pa``, and its objects point at each other through it. An empty ``struct list_head`` points
  to itself (``next == prev ==`` its own address), and kernel objects are full of them (wait
  queues, LRU lists, per-node data such as ``NODE_DATA(nid)``, which every node holds in its
  own memory). Two equal adjacent words ``v`` at offset ``o`` of a mapping, with ``v -
  page_offset_base`` inside RAM, therefore vote that the mapping's base (the guest-physical
  address of its byte 0) is ``v - page_offset_base - o``. True votes agree exactly and are
  page aligned (hypervisors place RAM in whole pages); coincidences (a list of one element,
  equal data) scatter and are outvoted. Votes are counted per 2 MiB chunk of a mapping, so a
  mapping that backs two ranges shows two bases.

The placement, per mapping: consecutive chunks voting for one base form a run; the kernel
image is a run too (its host address and ``phys_base`` fix it exactly). A run is continued
over chunks without votes in both directions while its guest-physical addresses stay inside
the usable RAM range its votes fell in, rounded out to 2 MiB (firmware keeps small reserved
tails inside the same RAM block, e.g. QEMU's last 128 KiB below the PCI hole; every boundary
between RAM blocks we know of is 2 MiB aligned). What is left of a mapping past such a range
continues at the next uncovered RAM above (after a run) or ends at the top of the uncovered
RAM below (before a run): hypervisors lay one mapping's RAM out in ascending order. A mapping
without votes is not placed, and said so; so is RAM that no mapping covers. The caller
(``dvs.vm.kernel``) validates the result against the kernel's own page tables.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dvs.vm.errors import GuestLayoutError
from dvs.vm.memory import FOUR_GIB, HostMapping, RamRegion

PAGE = 4096
ONE_MIB = 1 << 20
CHUNK = 2 << 20
"""Votes are counted per 2 MiB of a mapping (one huge page, the finest RAM block boundary)."""
BLOCK_ALIGN = 2 << 20
SAMPLE_PER_CHUNK = 1 << 20
"""At most this many bytes of data are read from each chunk (the votes are plentiful)."""
MIN_CHUNK_VOTES = 4
MIN_RUN_VOTES = 16

E820_RAM = 1
E820_MAX_BOOT_ENTRIES = 128
BOOT_PARAMS_E820_ENTRIES = 0x1E8
BOOT_PARAMS_E820_TABLE = 0x2D0
_E820_ENTRY = struct.Struct("<QQI")
BOOT_PARAMS_SPAN = BOOT_PARAMS_E820_TABLE + E820_MAX_BOOT_ENTRIES * _E820_ENTRY.size
_PHYS_LIMIT = 1 << 52


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def parse_boot_params_e820(zero_page: bytes) -> list[E820Entry]:
    """The e820 map of a ``struct boot_params`` (guest data: every field is checked)."""
    if len(zero_page) < BOOT_PARAMS_SPAN:
        raise GuestLayoutError("boot_params is readable", f"{len(zero_page)} bytes")
    count = zero_page[BOOT_PARAMS_E820_ENTRIES]
    if count > E820_MAX_BOOT_ENTRIES:
        raise GuestLayoutError(
            "boot_params holds at most 128 e820 entries", f"e820_entries is {count}"
        )
    entries = []
    for i in range(count):
        addr, size, kind = _E820_ENTRY.unpack_from(
            zero_page, BOOT_PARAMS_E820_TABLE + i * _E820_ENTRY.size
        )
        if size == 0 or addr + size > _PHYS_LIMIT:
            raise GuestLayoutError(
                "e820 entries are non-empty ranges of 52-bit physical addresses",
                f"entry {i}: {addr:#x}+{size:#x} type {kind}",
            )
        entries.append(E820Entry(addr, size, kind))
    return entries


def usable_ranges(entries: Sequence[E820Entry]) -> list[tuple[int, int]]:
    """Usable RAM as sorted disjoint ``(start, end)``; the legacy hole below 1 MiB is bridged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((e.addr, e.end) for e in entries if e.type == E820_RAM):
        if merged and (start <= merged[-1][1] or start <= ONE_MIB):
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# --- votes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkVote:
    """The base most self-pointers of one chunk agree on."""

    offset: int
    """Offset of the chunk in its mapping."""
    base: int
    votes: int
    total: int
    """All page-aligned votes in the chunk (for any base)."""


def chunk_votes(
    read: Callable[[int, int], bytes],
    mapping: HostMapping,
    data_runs: Sequence[tuple[int, int]],
    page_offset_base: int,
    ram_end: int,
    sample: int = SAMPLE_PER_CHUNK,
) -> list[ChunkVote]:
    """Count self-pointer votes in every 2 MiB chunk of ``mapping`` that holds data.

    ``read(hva, length)`` reads the hypervisor's memory; ``data_runs`` are the host ranges of
    the mapping that hold data (the rest reads as zeros and cannot vote).
    """
    votes = []
    pob = np.uint64(page_offset_base)
    limit = np.uint64(ram_end)
    for chunk in range(0, mapping.size, CHUNK):
        lo, hi = mapping.start + chunk, min(mapping.start + chunk + CHUNK, mapping.end)
        budget = sample
        bases = []
        for run_lo, run_hi in data_runs:
            a, b = max(lo, run_lo), min(hi, run_hi, max(lo, run_lo) + budget)
            if a >= b:
                continue
            budget -= b - a
            words = np.frombuffer(read(a, b - a), dtype="<u8")
            value = words[:-1]
            # unsigned: a value below page_offset_base wraps far above ram_end
            physical = value - pob
            hits = np.nonzero((value == words[1:]) & (physical < limit))[0]
            if hits.size:
                where = (a - mapping.start) + hits.astype(np.int64) * 8
                base = physical[hits].astype(np.int64) - where
                bases.append(base[base % PAGE == 0])
            if budget <= 0:
                break
        if not bases:
            continue
        values, counts = np.unique(np.concatenate(bases), return_counts=True)
        if counts.size == 0:
            continue
        best = int(np.argmax(counts))
        votes.append(ChunkVote(chunk, int(values[best]), int(counts[best]), int(counts.sum())))
    return votes


# --- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A host range whose guest-physical address is known exactly (the kernel image)."""

    mapping: HostMapping
    offset: int
    size: int
    gpa: int


@dataclass(frozen=True)
class Piece:
    """``mapping[offset : offset+size]`` is guest-physical ``[gpa, gpa+size)``."""

    mapping: HostMapping
    offset: int
    size: int
    gpa: int
    how: str
    """``kernel image`` (anchored by phys_base), ``votes`` (self-pointers in it, possibly
    continued over chunks without data) or ``ram map`` (no votes: the rest of a voted mapping,
    put at the uncovered RAM the e820 map leaves for it)."""
    votes: int

    @property
    def weight(self) -> tuple[bool, int]:
        """Which of two overlapping pieces wins: the kernel image, then more votes."""
        return self.how == "kernel image", self.votes

    @property
    def source(self) -> str:
        if self.how == "ram map":
            return "the e820 map's uncovered RAM, no votes"
        votes = f"{self.votes} self-pointer votes"
        if self.how == "kernel image":
            return f"kernel image, {votes}" if self.votes else "kernel image"
        return votes

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def hva(self) -> int:
        return self.mapping.start + self.offset

    def to_region(self) -> RamRegion:
        return RamRegion(self.gpa, self.size, self.hva, self.mapping, self.source)


@dataclass
class Placement:
    pieces: list[Piece]
    problems: list[str] = field(default_factory=list)
    """Mappings (or parts) not placed, RAM not covered, votes that disagreed."""

    @property
    def regions(self) -> list[RamRegion]:
        return [p.to_region() for p in sorted(self.pieces, key=lambda p: p.gpa)]

    @property
    def layout(self) -> str:
        """``linear`` or ``split-at-4g`` for one mapping (as before), else ``multi-mapping``."""
        mappings = {p.mapping.start for p in self.pieces}
        if len(mappings) > 1:
            return "multi-mapping"
        pieces = sorted(self.pieces, key=lambda p: p.gpa)
        if len(pieces) == 2 and pieces[1].gpa == FOUR_GIB and pieces[0].offset < pieces[1].offset:
            return "split-at-4g"
        return "linear" if len(pieces) == 1 else f"{len(pieces)} regions"

    def describe(self) -> list[str]:
        return [
            f"gpa {r.gpa:#x}-{r.end:#x} is {r.mapping.kind} mapping {r.mapping.start:#x}"
            f"+{r.hva - r.mapping.start:#x} ({r.placed_by})"
            for r in self.regions
        ]


@dataclass
class _Run:
    lo: int
    hi: int
    base: int
    votes: int
    anchored: bool = False


def place_mappings(
    mappings: Sequence[HostMapping],
    votes: Mapping[int, Sequence[ChunkVote]],
    usable: Sequence[tuple[int, int]],
    anchor: Anchor | None = None,
) -> Placement:
    """Place ``mappings`` (votes keyed by mapping start) in guest-physical memory (module note).

    Raises ``GuestLayoutError`` when the votes contradict the anchor: then the anchor (a
    kernel image copy) is not the running kernel.
    """
    problems: list[str] = []
    pieces: list[Piece] = []
    leftovers: list[tuple[HostMapping, int, int, Piece | None, Piece | None]] = []
    """(mapping, offset, end, piece before it, piece after it) of the host spans not placed."""
    for mapping in mappings:
        own_anchor = anchor if anchor is not None and anchor.mapping == mapping else None
        runs = _runs(mapping, votes.get(mapping.start, ()), own_anchor, problems)
        if not runs:
            problems.append(
                f"{mapping.kind} mapping {mapping.start:#x} ({mapping.size >> 20} MiB) holds "
                "no kernel data that places it in guest-physical memory; not placed"
            )
            continue
        extended = _extend(mapping, runs, usable)
        placed = [
            Piece(
                mapping,
                lo,
                hi - lo,
                run.base + lo,
                "kernel image" if run.anchored else "votes",
                run.votes,
            )
            for run, (lo, hi) in zip(runs, extended, strict=True)
        ]
        pieces += placed
        cursor, before = 0, None
        for piece in placed:
            if piece.offset > cursor:
                leftovers.append((mapping, cursor, piece.offset, before, piece))
            cursor, before = piece.offset + piece.size, piece
        if cursor < mapping.size:
            leftovers.append((mapping, cursor, mapping.size, before, None))
    pieces = _drop_overlaps(pieces, problems)
    for mapping, lo, hi, before, after in leftovers:
        if not any(p.mapping == mapping for p in pieces):
            continue  # its voted pieces lost to an overlap
        pieces += _fit_leftover(mapping, lo, hi, before, after, pieces, usable, problems)
    for start, end in _uncovered(usable, pieces):
        problems.append(
            f"guest-physical RAM {start:#x}-{end:#x} ({(end - start) >> 10} KiB) lies in no "
            "placed mapping"
        )
    return Placement(sorted(pieces, key=lambda p: p.gpa), problems)


def _runs(
    mapping: HostMapping,
    chunk_votes: Sequence[ChunkVote],
    anchor: Anchor | None,
    problems: list[str],
) -> list[_Run]:
    runs: list[_Run] = []
    for vote in sorted(chunk_votes, key=lambda v: v.offset):
        if vote.votes < MIN_CHUNK_VOTES or 3 * vote.votes < 2 * vote.total:
            continue  # too few, or no clear majority: mixed or coincidental data
        hi = min(vote.offset + CHUNK, mapping.size)
        if runs and runs[-1].base == vote.base:
            runs[-1].hi, runs[-1].votes = hi, runs[-1].votes + vote.votes
        else:
            runs.append(_Run(vote.offset, hi, vote.base, vote.votes))
    if anchor is not None:
        base = anchor.gpa - anchor.offset
        lo, hi = anchor.offset, anchor.offset + anchor.size
        against = sum(r.votes for r in runs if r.base != base and r.lo < hi and lo < r.hi)
        if against >= MIN_RUN_VOTES:
            raise GuestLayoutError(
                "the direct map's self-pointers agree with the kernel image's placement",
                f"{against} votes inside the image at {mapping.start + lo:#x} say otherwise",
            )
        runs = [r for r in runs if r.hi <= lo or hi <= r.lo or r.base == base]
        runs.append(_Run(lo, hi, base, 0, anchored=True))
        runs.sort(key=lambda r: r.lo)
    runs = [r for r in runs if r.anchored or r.votes >= MIN_RUN_VOTES]
    for run in runs:
        run.lo = max(run.lo, -run.base)  # a chunk's start may lie before GPA 0; its votes do not
    runs = [r for r in runs if r.lo < r.hi]
    while True:
        merged: list[_Run] = []
        for run in runs:
            if merged and merged[-1].base == run.base:
                last = merged[-1]
                last.lo, last.hi = min(last.lo, run.lo), max(last.hi, run.hi)
                last.votes += run.votes
                last.anchored |= run.anchored
            else:
                merged.append(run)
        runs = merged
        # guest-physical addresses rise with the offset in a mapping
        bad = next(
            (
                i
                for i in range(len(runs) - 1)
                if runs[i + 1].base + runs[i + 1].lo < runs[i].base + runs[i].hi
            ),
            None,
        )
        if bad is None:
            return runs
        weakest = min((r for r in runs[bad : bad + 2] if not r.anchored), key=lambda r: r.votes)
        problems.append(
            f"mapping {mapping.start:#x}: ignored {weakest.votes} votes for base "
            f"{weakest.base:#x} at +{weakest.lo:#x} that contradict their neighbours"
        )
        runs.remove(weakest)


def _round_out(start: int, end: int) -> tuple[int, int]:
    return start - start % BLOCK_ALIGN, -(-end // BLOCK_ALIGN) * BLOCK_ALIGN


def _home_range(usable: Sequence[tuple[int, int]], lo: int, hi: int) -> tuple[int, int] | None:
    """The usable RAM range (rounded out) that overlaps guest-physical ``[lo, hi)`` most."""
    best, best_overlap = None, 0
    for start, end in usable:
        start, end = _round_out(start, end)
        overlap = min(end, hi) - max(start, lo)
        if overlap > best_overlap:
            best, best_overlap = (start, end), overlap
    return best


def _extend(
    mapping: HostMapping, runs: Sequence[_Run], usable: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Host offset ranges of the runs, continued over chunks without votes (module note)."""
    clipped = []
    homes = []
    for run in runs:
        # a chunk that straddles a RAM block boundary lends the run a little of its neighbour
        home = _home_range(usable, run.base + run.lo, run.base + run.hi)
        if home is not None:
            lo, hi = max(run.lo, home[0] - run.base), min(run.hi, home[1] - run.base)
        else:
            lo, hi = run.lo, run.hi
        clipped.append((lo, hi))
        homes.append(home)
    extended: list[tuple[int, int]] = []
    for i, (run, (lo, hi), home) in enumerate(zip(runs, clipped, homes, strict=True)):
        lo_limit = max(extended[-1][1] if extended else 0, -run.base)
        hi_limit = clipped[i + 1][0] if i + 1 < len(runs) else mapping.size
        if home is not None:
            lo_limit = max(lo_limit, home[0] - run.base)
            hi_limit = min(hi_limit, home[1] - run.base)
        extended.append((min(lo, max(lo_limit, 0)), max(hi, hi_limit)))
    return extended


def _drop_overlaps(pieces: list[Piece], problems: list[str]) -> list[Piece]:
    kept: list[Piece] = []
    for piece in sorted(pieces, key=lambda p: p.weight, reverse=True):
        clash = next((k for k in kept if k.gpa < piece.end and piece.gpa < k.end), None)
        if clash is None:
            kept.append(piece)
            continue
        problems.append(
            f"mapping {piece.mapping.start:#x}+{piece.offset:#x} ({piece.size >> 20} MiB, "
            f"{piece.votes} votes) would overlap gpa {clash.gpa:#x}-{clash.end:#x} of mapping "
            f"{clash.mapping.start:#x} ({clash.votes} votes); not placed"
        )
    # a mapping whose voted pieces all lost keeps nothing (its leftovers are skipped too)
    return kept


def _uncovered(
    usable: Sequence[tuple[int, int]], pieces: Sequence[Piece], *, rounded: bool = False
) -> list[tuple[int, int]]:
    covered = sorted((p.gpa, p.end) for p in pieces)
    gaps = []
    for start, end in usable:
        if rounded:
            start, end = _round_out(start, end)
        cursor = start
        for lo, hi in covered:
            if hi <= cursor or lo >= end:
                continue
            if lo > cursor:
                gaps.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < end:
            gaps.append((cursor, end))
    return gaps


def _fit_leftover(
    mapping: HostMapping,
    lo: int,
    hi: int,
    before: Piece | None,
    after: Piece | None,
    pieces: Sequence[Piece],
    usable: Sequence[tuple[int, int]],
    problems: list[str],
) -> list[Piece]:
    """Put the unvoted host span ``[lo, hi)`` of ``mapping`` into uncovered RAM."""
    fitted: list[Piece] = []
    while lo < hi:
        gaps = _uncovered(usable, [*pieces, *fitted], rounded=True)
        if before is not None:
            # the rest of a mapping continues upwards, at the next uncovered RAM
            gap = next((g for g in gaps if g[0] >= before.end), None)
            if gap is not None:
                size = min(hi - lo, gap[1] - gap[0])
                before = Piece(mapping, lo, size, gap[0], "ram map", 0)
                fitted.append(before)
                lo += size
                continue
        if after is not None:
            # what precedes a mapping's first run ends at the top of the uncovered RAM below
            gap = next((g for g in reversed(gaps) if g[1] <= after.gpa), None)
            if gap is not None:
                size = min(hi - lo, gap[1] - gap[0])
                after = Piece(mapping, hi - size, size, gap[1] - size, "ram map", 0)
                fitted.append(after)
                hi -= size
                continue
        problems.append(
            f"{mapping.kind} mapping {mapping.start:#x}+{lo:#x}-{hi:#x} ({(hi - lo) >> 20} MiB) "
            "has no votes and no uncovered RAM left for it; not placed"
        )
        break
    return fitted
