"""Guest-physical memory access: region bounds, both backends (this process and a remote
process through process_vm_*), batches that cross region boundaries, and garbage ranges."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvs.lowlevel.guestmem import GuestMemory, GuestMemoryFault, Region

pytestmark = pytest.mark.timeout(120)


def test_local_read_write_roundtrip() -> None:
    mem = GuestMemory.local(1 << 20, base_gpa=0x100000)
    mem.write(0x100010, b"hello guest")
    assert mem.read(0x100010, 11) == b"hello guest"
    mem.write_u64(0x1FFFF8, 0x1122334455667788)
    assert mem.read_u64(0x1FFFF8) == 0x1122334455667788
    assert mem.read_batch([(0x100010, 5), (0x100016, 5)]) == [b"hello", b"guest"]


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0x0, 1), (0xFFFFF, 2), (0x1FFFFF, 2), (0x200000, 1), (2**64 - 8, 16), (0x100000, 1 << 21)],
)
def test_ranges_outside_ram_fault_and_move_nothing(gpa: int, length: int) -> None:
    mem = GuestMemory.local(1 << 20, base_gpa=0x100000)
    mem.write(0x100000, b"\xaa" * 16)
    with pytest.raises(GuestMemoryFault):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryFault):
        mem.write(gpa, b"\x00" * length)
    assert mem.read(0x100000, 16) == b"\xaa" * 16


def test_a_batch_with_one_bad_range_moves_nothing() -> None:
    mem = GuestMemory.local(4096)
    with pytest.raises(GuestMemoryFault) as info:
        mem._rw(True, [(0, bytearray(b"x" * 8)), (4090, bytearray(8))])
    assert info.value.gpa == 4090
    assert mem.read(0, 8) == b"\x00" * 8


def test_invalid_region_tables_are_refused() -> None:
    with pytest.raises(OSError):
        GuestMemory([Region(0, 0x2000, 0x10000), Region(0x1000, 0x1000, 0x20000)])  # overlap
    with pytest.raises(OSError):
        GuestMemory([Region(2**64 - 0x1000, 0x2000, 0)])  # wraps
    with pytest.raises(ValueError):
        GuestMemory([Region(i * 0x1000, 0x1000, 0) for i in range(65)])


def _host_buffers(n: int, size: int) -> tuple[list[ctypes.Array[ctypes.c_char]], list[int]]:
    bufs = [ctypes.create_string_buffer(size) for _ in range(n)]
    return bufs, [ctypes.addressof(b) for b in bufs]


def test_regions_split_like_qemu_ram() -> None:
    """Guest RAM split around a hole: adjacent GPAs, non-adjacent host memory."""
    bufs, addrs = _host_buffers(2, 0x1000)
    mem = GuestMemory([Region(0x0, 0x1000, addrs[0]), Region(0x1000, 0x1000, addrs[1])])
    mem.write(0xFF8, b"ABCDEFGHIJKLMNOP")  # straddles the split
    assert bufs[0].raw[-8:] == b"ABCDEFGH"
    assert bufs[1].raw[:8] == b"IJKLMNOP"
    assert mem.read(0xFF8, 16) == b"ABCDEFGHIJKLMNOP"
    hole = GuestMemory([Region(0x0, 0x1000, addrs[0]), Region(0x2000, 0x1000, addrs[1])])
    with pytest.raises(GuestMemoryFault):
        hole.read(0xFF8, 16)


def test_remote_backend_reads_another_process() -> None:
    bufs, addrs = _host_buffers(2, 0x1000)
    bufs[0].raw = b"R" * 0x1000
    bufs[1].raw = b"S" * 0x1000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child holds a copy of the same address space
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    try:
        bufs[0].raw = b"P" * 0x1000  # changes only the parent's copy
        remote = GuestMemory([Region(0, 0x1000, addrs[0]), Region(0x1000, 0x1000, addrs[1])], pid)
        assert remote.read(0xFFE, 4) == b"RRSS"
        remote.write(0x10, b"written")
        assert remote.read(0x10, 7) == b"written"
        assert bufs[0].raw[0x10:0x17] == b"PPPPPPP"
        many = remote.read_batch([(i * 32, 4) for i in range(200)])  # > one C batch
        assert many[0] == b"RRRR" and many[-1] == b"SSSS"
    finally:
        os.close(r)
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(0, 2**64 - 1), length=st.integers(0, 2**20))
def test_bounds_agree_with_a_python_model(gpa: int, length: int) -> None:
    mem = GuestMemory.local(0x4000, base_gpa=0x10000)
    inside = 0x10000 <= gpa and gpa + length <= 0x14000
    assert mem.contains(gpa, length) == (inside or length == 0)  # empty ranges are trivially in
    if length <= 0x4000:
        if inside:
            assert len(mem.read(gpa, length)) == length
        elif length:
            with pytest.raises(GuestMemoryFault):
                mem.read(gpa, length)
