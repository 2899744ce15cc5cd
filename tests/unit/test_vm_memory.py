"""Guest-RAM discovery from /proc/PID/maps, the host-side scan, layouts, and the finder's
typed failure on a process that holds no kernel (garbage memory)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time

import pytest

from dvs.errors import TargetNotFound
from dvs.lowlevel.guestmem import buffer_address
from dvs.vm import kallsyms
from dvs.vm.errors import KernelNotFound, RamNotFound
from dvs.vm.kernel import find_kernel
from dvs.vm.memory import (
    FOUR_GIB,
    HostMapping,
    HostView,
    HypervisorProcess,
    data_ranges,
    linear_layout,
    parse_maps,
    ram_candidates,
    split_at_4g_layout,
)

pytestmark = pytest.mark.timeout(120)

QEMU_MAPS = """\
5579627b6000-557962bbd000 r--p 00000000 fe:00 2170954                    /usr/bin/qemu-system-x86_64
557968448000-5579692ef000 rw-p 00000000 00:00 0                          [heap]
7fcd33e00000-7fcd53e00000 rw-p 00000000 00:00 0
7fcd5c000000-7fcd9bfff000 rwxp 00000000 00:00 0
7fcda1bb9000-7fcda23b9000 rw-p 00000000 00:00 0
7fcda1400000-7fcda174a000 r--p 00000000 fe:00 5350125                    /cache/initramfs.cpio.gz
7fcdb0000000-7fcdf0000000 rw-s 00000000 00:01 4242                       /memfd:mem (deleted)
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_candidates_are_large_rw_non_executable_ram_mappings() -> None:
    maps = parse_maps(QEMU_MAPS)
    assert len(maps) == 8
    found = ram_candidates(maps)
    assert [(m.start, m.size >> 20, m.kind) for m in found] == [
        (0x7FCDB0000000, 1024, "shared-memory"),
        (0x7FCD33E00000, 512, "anonymous"),
    ]


def test_layouts() -> None:
    mapping = HostMapping(0x7F0000000000, 0x7F0000000000 + (5 << 30), "rw-p", 0, 0, "")
    low, high = split_at_4g_layout(mapping, 1 << 30)
    assert (low.gpa, low.size, low.hva) == (0, 4 << 30, mapping.start)
    assert (high.gpa, high.size, high.hva) == (FOUR_GIB, 1 << 30, mapping.start + (4 << 30))
    (only,) = linear_layout(mapping, mapping.start + 0x1200000, 0x1200000)
    assert (only.gpa, only.hva) == (0, mapping.start)
    (clipped,) = linear_layout(mapping, mapping.start + 0x3000000, 0x1000000)
    assert (clipped.gpa, clipped.hva, clipped.size) == (
        0,
        mapping.start + 0x2000000,
        mapping.size - 0x2000000,
    )
    with pytest.raises(ValueError):
        split_at_4g_layout(mapping, 5 << 30)


def test_scan_finds_needles_across_chunk_boundaries_once() -> None:
    size = 8 << 20
    area = mmap.mmap(-1, size)
    address, keep = buffer_address(area)
    needle = kallsyms.DIGIT_TOKENS
    places = [0, (1 << 20) - 7, 3 << 20, size - len(needle)]
    for at in places:
        area[at : at + len(needle)] = needle
    mapping = HostMapping(address, address + size, "rw-p", 0, 0, "")
    view = HostView(os.getpid(), [mapping])
    assert list(view.scan(needle, chunk=1 << 20)) == [address + p for p in places]
    # pagemap: only the pages we wrote hold data
    runs = data_ranges(os.getpid(), mapping)
    assert all(any(a <= address + p < b for a, b in runs) for p in places)
    assert sum(b - a for a, b in runs) < size // 2
    del keep


def test_no_process_and_no_ram_are_typed_errors() -> None:
    with pytest.raises(TargetNotFound):
        HypervisorProcess.of(2**22 + 12345)
    with pytest.raises(RamNotFound):
        HostView(os.getpid(), [])


def test_garbage_memory_gives_kernel_not_found_quickly() -> None:
    """A process full of random bytes, sprinkled with token-table signatures and banners."""
    script = (
        "import mmap, random, sys, time\n"
        "m = mmap.mmap(-1, 64 << 20)\n"
        "rng = random.Random(7)\n"
        "m[:] = rng.randbytes(64 << 20)\n"
        f"sig = {kallsyms.DIGIT_TOKENS!r}\n"
        "for i in range(200):\n"
        "    at = rng.randrange(0, (64 << 20) - 100)\n"
        "    m[at:at + len(sig)] = sig\n"
        "    m[at + 4096:at + 4096 + 14] = b'Linux version '\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(KernelNotFound):
            find_kernel(child.pid)
        assert time.monotonic() - started < 60
    finally:
        child.kill()
        child.wait()


def test_random_bytes_with_a_fake_token_table() -> None:
    rng = random.Random(3)
    blob = bytearray(rng.randbytes(1 << 20))
    tokens = [bytes([i]) if 0x20 <= i < 0x7F else b"ab" for i in range(256)]
    table = b"\0".join(tokens) + b"\0"
    blob[0x80000 : 0x80000 + len(table)] = table
    assert kallsyms.find_token_tables(bytes(blob)) == []  # no token index after it
