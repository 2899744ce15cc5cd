"""Guest-physical memory: the host-side view shared by virtio devices and VM introspection.

A guest's RAM is a list of regions ``[gpa, gpa + size)`` backed by host memory at ``hva``.
``GuestMemory(regions, pid)`` reads and writes it through the C core: ``pid == 0`` means the
regions are mapped in this process (a test buffer, or RAM shared with us such as a
vhost-user memfd); ``pid > 0`` means they are addresses in the hypervisor process, reached
with process_vm_readv/writev. Every range is checked against the regions first; one that is
not wholly inside guest RAM raises ``GuestMemoryFault`` and moves nothing. The guest runs
concurrently: two reads of the same address may differ, so validate a copy, not the source.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

from dvs.errors import DvsError
from dvs.lowlevel import check, ffi, lib

MAX_REGIONS: int = lib.DVS_GUEST_MAX_REGIONS


class GuestMemoryFault(DvsError):
    """A guest-physical range lies (partly) outside guest RAM."""

    def __init__(self, gpa: int, length: int) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest-physical range {gpa:#x}+{length:#x} is outside guest RAM")


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    hva: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def buffer_address(buffer: object) -> tuple[int, object]:
    """Address of a writable buffer of this process (an mmap of a core file, a bytearray),
    for use as ``hva`` of a local region; keep the returned object alive as long as it is used.
    """
    view = ffi.from_buffer(buffer, require_writable=True)
    return int(ffi.cast("uintptr_t", view)), view


class GuestMemory:
    """Bounded access to a guest's physical memory (see the module note)."""

    def __init__(self, regions: Sequence[Region], pid: int = 0) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        if len(ordered) > MAX_REGIONS:
            raise ValueError(f"{len(ordered)} regions; at most {MAX_REGIONS} are supported")
        table = ffi.new("struct dvs_guest_region[]", max(1, len(ordered)))
        for i, region in enumerate(ordered):
            table[i].gpa, table[i].size, table[i].hva = region.gpa, region.size, region.hva
        self._c = ffi.new("struct dvs_guest_mem *")
        check(lib.dvs_guest_mem_init(self._c, pid, table, len(ordered)), "guest memory regions")
        self.regions = tuple(ordered)
        self.pid = pid
        self._keepalive: list[object] = []

    @classmethod
    def local(cls, size: int, base_gpa: int = 0) -> GuestMemory:
        """Guest RAM of ``size`` bytes in an anonymous mapping of this process (for tests)."""
        backing = mmap.mmap(-1, size)
        view = ffi.from_buffer(backing)
        hva = int(ffi.cast("uintptr_t", view))
        mem = cls([Region(base_gpa, size, hva)])
        mem._keepalive += [backing, view]
        return mem

    @property
    def c_handle(self) -> object:
        """The ``struct dvs_guest_mem *`` for other dvs.lowlevel wrappers."""
        return self._c

    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def read(self, gpa: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(gpa, buf)
        return bytes(buf)

    def readinto(self, gpa: int, buf: bytearray | memoryview) -> None:
        self._rw(False, [(gpa, buf)])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._rw(True, [(gpa, data)])

    def read_batch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several ``(gpa, length)`` ranges in one C call."""
        buffers = [bytearray(length) for _, length in ranges]
        self._rw(False, [(gpa, b) for (gpa, _), b in zip(ranges, buffers, strict=True)])
        return [bytes(b) for b in buffers]

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def _rw(self, write: bool, pairs: Sequence[tuple[int, object]]) -> None:
        xfers = ffi.new("struct dvs_guest_xfer[]", max(1, len(pairs)))
        keep = []
        for i, (gpa, data) in enumerate(pairs):
            local = ffi.from_buffer(data, require_writable=not write)
            keep.append(local)
            xfers[i].gpa = gpa
            xfers[i].local = int(ffi.cast("uintptr_t", local))
            xfers[i].len = len(local)
        ret = lib.dvs_guest_mem_rw(self._c, int(write), xfers, len(pairs))
        if ret == -errno.EFAULT:
            outside = [(x.gpa, x.len) for x in xfers[0 : len(pairs)]]
            raise GuestMemoryFault(*next(r for r in outside if not self.contains(*r)))
        check(ret, "guest memory " + ("write" if write else "read"))

    def contains(self, gpa: int, length: int) -> bool:
        """True if ``[gpa, gpa + length)`` lies entirely inside guest RAM."""
        end = gpa + length
        for region in self.regions:
            if gpa >= end:
                return True
            if region.gpa <= gpa < region.end:
                gpa = region.end
        return gpa >= end
