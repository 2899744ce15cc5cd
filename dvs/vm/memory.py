"""Guest RAM inside a hypervisor process, found from ``/proc/PID/maps`` alone.

Every hypervisor that runs a guest on KVM or in an emulator (QEMU-TCG) keeps the guest's RAM
in its own address space: QEMU allocates each RAM block as one private anonymous mapping (or a
memfd / file / hugetlbfs mapping with ``memory-backend-*``), Firecracker and Cloud Hypervisor
one anonymous mapping per region. So the candidates are large readable and writable mappings
that are not executable (QEMU's TCG code buffer is ``rwx``) and not a file's private copy
(library data). Which candidate is RAM, and at which guest-physical address, is not written
anywhere we may read without KVM; the kernel finder (``dvs.vm.kernel``) settles it by finding
the guest kernel in a candidate, placing every candidate by the kernel's own data
(``dvs.vm.placement``: its e820 map and the self-pointers of its direct map), and checking
that the kernel's own page tables walk consistently through the guest-physical -> host-virtual
map built here.

QEMU's i440fx ``pc`` and ``q35`` machines put RAM below the PCI hole at GPA 0 and the rest at
4 GiB, both from the one ``pc.ram`` mapping (``lowmem`` bytes, then the remainder): a
``split_at_4g`` layout. Guest-physical addresses 0xA0000-0xFFFFF (VGA, option ROMs, BIOS) are
backed by the same mapping but are not RAM to the guest; we keep them in the low region, as
QEMU's own ``dump-guest-memory`` does not, because the kernel maps and reserves them too.

Reads go through ``dvs.lowlevel.guestmem.GuestMemory`` (process_vm_readv, bounds-checked in C).
``HostView`` uses the same interface with guest-physical == host-virtual over the candidates,
which lets the finder scan and read a mapping before any GPA is known.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvs.errors import TargetGone, TargetNotFound
from dvs.lowlevel.guestmem import MAX_REGIONS, GuestMemory, Region
from dvs.vm.errors import RamNotFound

MIN_RAM_MAPPING = 16 << 20
"""Smaller mappings are never guest RAM here (thread stacks are 8 MiB)."""

_SHARED_RAM_PREFIXES = ("/memfd:", "/dev/shm/", "/dev/hugepages", "/hugetlbfs", "/SYSV")

FOUR_GIB = 1 << 32
PAGE = 4096
PFN_MASK = (1 << 55) - 1


@dataclass(frozen=True)
class HostMapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def kind(self) -> str:
        """``anonymous``, ``shared-memory`` (memfd, shm, hugetlbfs) or ``file``."""
        if not self.path or self.path.startswith("[anon"):
            return "anonymous"
        if self.path.startswith(_SHARED_RAM_PREFIXES) or "(deleted)" in self.path:
            return "shared-memory"
        if self.path.startswith("["):
            return "special"
        return "file"

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


def parse_maps(text: str) -> list[HostMapping]:
    mappings = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition("-")
        try:
            mappings.append(
                HostMapping(
                    start=int(start, 16),
                    end=int(end, 16),
                    perms=fields[1],
                    offset=int(fields[2], 16),
                    inode=int(fields[4]),
                    path=fields[5].strip() if len(fields) > 5 else "",
                )
            )
        except ValueError:
            continue
    return mappings


def read_maps(pid: int) -> list[HostMapping]:
    try:
        return parse_maps(Path(f"/proc/{pid}/maps").read_text())
    except FileNotFoundError:
        raise TargetNotFound(str(pid), [f"/proc/{pid}/maps does not exist"]) from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} exited") from None


def ram_candidates(
    mappings: Sequence[HostMapping], min_size: int = MIN_RAM_MAPPING
) -> list[HostMapping]:
    """Mappings that could hold guest RAM, largest first."""
    found = [
        m
        for m in mappings
        if m.size >= min_size
        and m.readable
        and m.writable
        and not m.executable
        and (m.kind in ("anonymous", "shared-memory") or (m.kind == "file" and m.shared))
    ]
    return sorted(found, key=lambda m: (-m.size, m.start))


@dataclass(frozen=True)
class HypervisorProcess:
    pid: int
    comm: str
    exe: str
    kind: str
    """``qemu``, ``firecracker``, ``cloud-hypervisor``, ``crosvm`` or ``unknown``."""

    @classmethod
    def of(cls, pid: int) -> HypervisorProcess:
        base = Path(f"/proc/{pid}")
        if not base.exists():
            raise TargetNotFound(str(pid), [f"/proc/{pid} does not exist"])
        try:
            comm = (base / "comm").read_text().strip()
        except OSError:
            comm = ""
        try:
            exe = os.readlink(base / "exe")
        except OSError:
            exe = ""
        name = (Path(exe).name or comm).lower()
        kind = "unknown"
        for known in ("qemu", "firecracker", "cloud-hypervisor", "crosvm"):
            if known in name or known in comm.lower():
                kind = known
                break
        return cls(pid=pid, comm=comm, exe=exe, kind=kind)


def _zero_page_frames() -> set[int]:
    """Page frames of the shared zero page (and the huge zero page), seen from this process.

    A read of never-written anonymous memory maps these frames; they hold no guest data, so
    scans skip them. Needs root for real PFNs in pagemap; returns an empty set otherwise.
    """
    frames: set[int] = set()
    size = 4 << 20
    try:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return frames
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        huge = (base + (2 << 20) - 1) & ~((2 << 20) - 1)
        with contextlib.suppress(OSError, AttributeError):
            area.madvise(mmap.MADV_HUGEPAGE, huge - base, 2 << 20)
        _ = area[0], area[huge - base]
        with open("/proc/self/pagemap", "rb") as pagemap:
            for address, count in ((base, 1), (huge, 512)):
                pagemap.seek(address // PAGE * 8)
                for (entry,) in struct.iter_unpack("<Q", pagemap.read(8 * count)):
                    if entry >> 63 & 1 and entry & PFN_MASK:
                        frames.add(entry & PFN_MASK)
    except (OSError, ValueError, TypeError):
        pass
    finally:
        with contextlib.suppress(BufferError):
            area.close()
    return frames


def data_ranges(pid: int, mapping: HostMapping) -> list[tuple[int, int]]:
    """Host ranges of ``mapping`` that can hold data: pages present (not the zero page) or swapped.

    Falls back to the whole mapping when pagemap is unreadable.
    """
    if pid <= 0:
        return [(mapping.start, mapping.end)]
    zero = _zero_page_frames()
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            pagemap.seek(mapping.start // PAGE * 8)
            raw = pagemap.read(mapping.size // PAGE * 8)
    except OSError:
        return [(mapping.start, mapping.end)]
    if len(raw) != mapping.size // PAGE * 8:
        return [(mapping.start, mapping.end)]
    entries = np.frombuffer(raw, dtype="<u8")
    present = (entries >> np.uint64(63)) & np.uint64(1) != 0
    swapped = (entries >> np.uint64(62)) & np.uint64(1) != 0
    frames = entries & np.uint64(PFN_MASK)
    if zero:
        present &= ~np.isin(frames, np.array(sorted(zero), dtype=np.uint64))
    useful = np.concatenate([[False], present | swapped, [False]])
    edges = np.diff(useful.astype(np.int8))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    return [
        (mapping.start + int(a) * PAGE, mapping.start + int(b) * PAGE)
        for a, b in zip(starts, ends, strict=True)
    ]


class HostView:
    """Bounded reads of host-virtual addresses inside the RAM candidates of ``pid``."""

    def __init__(
        self,
        pid: int,
        candidates: Sequence[HostMapping],
        *,
        use_pagemap: bool = True,
        data_runs: dict[int, list[tuple[int, int]]] | None = None,
    ) -> None:
        """``pid`` 0 reads this process (a core file mapped here); ``use_pagemap`` skips
        pages the hypervisor never populated (only meaningful for anonymous memory)."""
        if not candidates:
            raise RamNotFound(str(pid), ["no readable, writable, non-executable mapping >= 16 MiB"])
        self.pid = pid
        self.use_pagemap = use_pagemap and pid > 0
        self.data_runs = data_runs or {}
        """Known data ranges per mapping start (e.g. the non-hole parts of a sparse core)."""
        self.candidates = tuple(sorted(candidates, key=lambda m: m.start)[:MAX_REGIONS])
        self.mem = GuestMemory([Region(m.start, m.size, m.start) for m in self.candidates], pid)

    def mapping_of(self, address: int) -> HostMapping | None:
        for m in self.candidates:
            if m.contains(address):
                return m
        return None

    def read(self, address: int, length: int) -> bytes:
        return self.mem.read(address, length)

    def read_clipped(self, address: int, length: int) -> tuple[int, bytes]:
        """Read ``[address, address+length)`` clipped to the mapping holding ``address``."""
        mapping = self.mapping_of(address)
        if mapping is None:
            return address, b""
        lo = max(mapping.start, address)
        hi = min(mapping.end, address + length)
        return lo, self.mem.read(lo, hi - lo) if hi > lo else b""

    def data_runs_of(self, mapping: HostMapping) -> list[tuple[int, int]]:
        """Host ranges of ``mapping`` that can hold data (the rest reads as zeros)."""
        if mapping.start in self.data_runs:
            return self.data_runs[mapping.start]
        if self.use_pagemap:
            return data_ranges(self.pid, mapping)
        return [(mapping.start, mapping.end)]

    def scan(self, needle: bytes, chunk: int = 32 << 20) -> Iterator[int]:
        """Host addresses of ``needle`` in the candidates, lazily, skipping pages without data.

        Mappings are searched largest first, in address order within each.
        """
        overlap = len(needle) - 1
        buf = bytearray(chunk + overlap)
        for mapping in sorted(self.candidates, key=lambda m: -m.size):
            for run_start, run_end in self.data_runs_of(mapping):
                for start in range(run_start, run_end, chunk):
                    length = min(chunk + overlap, run_end - start)
                    view = memoryview(buf)[:length]
                    self.mem.readinto(start, view)
                    pos = buf.find(needle, 0, length)
                    while pos >= 0:
                        if pos < chunk:
                            yield start + pos
                        pos = buf.find(needle, pos + 1, length)


@dataclass(frozen=True)
class RamRegion:
    """Guest-physical ``[gpa, gpa+size)`` is host-virtual ``[hva, hva+size)`` in ``mapping``."""

    gpa: int
    size: int
    hva: int
    mapping: HostMapping
    placed_by: str = ""
    """What fixed the guest-physical address (see ``dvs.vm.placement.Piece.how``)."""

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def to_region(self) -> Region:
        return Region(self.gpa, self.size, self.hva)


def linear_layout(mapping: HostMapping, anchor_hva: int, anchor_gpa: int) -> list[RamRegion]:
    """The whole mapping as one region, placed so that ``anchor_hva`` is ``anchor_gpa``."""
    base = anchor_gpa - (anchor_hva - mapping.start)
    if base < 0:
        # The mapping starts before GPA 0 would: keep only the part from GPA 0 on.
        skip = -base
        return [RamRegion(0, mapping.size - skip, mapping.start + skip, mapping)]
    return [RamRegion(base, mapping.size, mapping.start, mapping)]


def split_at_4g_layout(mapping: HostMapping, high_size: int) -> list[RamRegion]:
    """QEMU's pc/q35 RAM: the first ``size - high_size`` bytes at GPA 0, the rest at 4 GiB."""
    low = mapping.size - high_size
    if high_size <= 0 or low <= 0 or low > FOUR_GIB:
        raise ValueError(f"cannot split {mapping.size:#x} bytes with {high_size:#x} above 4 GiB")
    return [
        RamRegion(0, low, mapping.start, mapping),
        RamRegion(FOUR_GIB, high_size, mapping.start + low, mapping),
    ]


class GuestRam:
    """Guest-physical memory of a running hypervisor: regions plus bounded access."""

    def __init__(
        self,
        process: HypervisorProcess,
        regions: Sequence[RamRegion],
        layout: str,
        problems: Sequence[str] = (),
    ) -> None:
        self.process = process
        self.regions = tuple(sorted(regions, key=lambda r: r.gpa))
        self.layout = layout
        self.problems = tuple(problems)
        """What could not be placed: mappings without kernel data, RAM no mapping covers."""
        self.mem = GuestMemory([r.to_region() for r in self.regions], process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def __iter__(self) -> Iterator[RamRegion]:
        return iter(self.regions)

    def gpa_to_hva(self, gpa: int) -> int | None:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r.hva + (gpa - r.gpa)
        return None

    def hva_to_gpa(self, hva: int) -> int | None:
        for r in self.regions:
            if r.hva <= hva < r.hva + r.size:
                return r.gpa + (hva - r.hva)
        return None
