"""Placing several RAM mappings in guest-physical memory: the e820 map of ``boot_params``, the
self-pointer votes counted in real memory of this process, and the placement rules on the
layouts hypervisors make (QEMU NUMA memdevs cut at the PCI hole, Firecracker regions).

The live counterpart, against QEMU guests with two NUMA nodes, is
``tests/integration/test_vm_multiregion.py``.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np
import pytest

from dvs.lowlevel.guestmem import buffer_address
from dvs.vm.errors import GuestLayoutError
from dvs.vm.memory import FOUR_GIB, HostMapping, HostView
from dvs.vm.placement import (
    BOOT_PARAMS_E820_ENTRIES,
    BOOT_PARAMS_E820_TABLE,
    BOOT_PARAMS_SPAN,
    CHUNK,
    Anchor,
    ChunkVote,
    E820Entry,
    chunk_votes,
    parse_boot_params_e820,
    place_mappings,
    usable_ranges,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
GiB = 1 << 30
POB = 0xFFFF_8C7F_8000_0000


def zero_page(entries: list[tuple[int, int, int]]) -> bytes:
    raw = bytearray(BOOT_PARAMS_SPAN)
    raw[BOOT_PARAMS_E820_ENTRIES] = len(entries)
    for i, entry in enumerate(entries):
        struct.pack_into("<QQI", raw, BOOT_PARAMS_E820_TABLE + 20 * i, *entry)
    return bytes(raw)


def qemu_e820(lowmem: int, high: int) -> list[tuple[int, int, int]]:
    """What SeaBIOS reports for a pc machine: the last 128 KiB below lowmem are reserved."""
    entries = [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (MiB, lowmem - 128 * 1024 - MiB, 1),
        (lowmem - 128 * 1024, 128 * 1024, 2),
        (0xFFFC0000, 0x40000, 2),
    ]
    if high:
        entries.append((FOUR_GIB, high, 1))
    entries.append((0xFD_0000_0000, 0x3_0000_0000, 2))
    return entries


def test_boot_params_e820_and_usable_ranges() -> None:
    entries = parse_boot_params_e820(zero_page(qemu_e820(3 * GiB, GiB)))
    assert entries[3] == E820Entry(MiB, 3 * GiB - 128 * 1024 - MiB, 1)
    # the legacy hole below 1 MiB is bridged; reserved entries are not RAM
    assert usable_ranges(entries) == [(0, 3 * GiB - 128 * 1024), (FOUR_GIB, FOUR_GIB + GiB)]
    assert parse_boot_params_e820(zero_page([])) == []


@pytest.mark.parametrize(
    ("entries", "count", "rule"),
    [
        ([(MiB, 0, 1)], None, "non-empty"),
        ([((1 << 52) - 4096, 8192, 1)], None, "52-bit"),
        ([], 129, "at most 128"),
    ],
)
def test_malformed_boot_params_are_typed_errors(
    entries: list[tuple[int, int, int]], count: int | None, rule: str
) -> None:
    raw = bytearray(zero_page(entries))
    if count is not None:
        raw[BOOT_PARAMS_E820_ENTRIES] = count
    with pytest.raises(GuestLayoutError, match=rule):
        parse_boot_params_e820(bytes(raw))
    with pytest.raises(GuestLayoutError):
        parse_boot_params_e820(bytes(raw[:100]))


def test_votes_counted_in_real_memory() -> None:
    """Self-pointers planted in a mapping of this process, read through process_vm_readv."""
    size = 8 * MiB
    area = mmap.mmap(-1, size)
    address, keep = buffer_address(area)
    mapping = HostMapping(address, address + size, "rw-p", 0, 0, "")
    base = 0x1234_5000_0000 // 4096 * 4096
    words = np.frombuffer(area, dtype="<u8")
    rng = np.random.default_rng(5)
    # chunk 0: 40 empty list heads; chunk 2: 30 heads plus coincidental equal pairs (noise)
    for chunk, heads in ((0, 40), (2, 30)):
        for slot in rng.choice(CHUNK // 16, heads, replace=False):
            offset = chunk * CHUNK + int(slot) * 16
            words[offset // 8] = words[offset // 8 + 1] = POB + base + offset
    for slot in rng.choice(CHUNK // 16, 10, replace=False):
        offset = 2 * CHUNK + int(slot) * 16 + 8
        words[offset // 8] = words[offset // 8 + 1] = POB + 0x777_000 + 24
    # chunk 3: equal words outside the direct map, and pointers to other places, do not vote
    words[3 * CHUNK // 8 : 3 * CHUNK // 8 + 64] = 0xFFFF_FFFF_8100_0000
    words[3 * CHUNK // 8 + 100] = POB + base + 3 * CHUNK + 800
    view = HostView(os.getpid(), [mapping])
    everything = [(mapping.start, mapping.end)]
    votes = chunk_votes(view.read, mapping, everything, POB, 1 << 46, sample=CHUNK)
    assert [(v.offset, v.base, v.votes) for v in votes] == [(0, base, 40), (2 * CHUNK, base, 30)]
    # only the chunks with data are read
    first = [(address, address + CHUNK)]
    assert chunk_votes(view.read, mapping, first, POB, 1 << 46, sample=CHUNK) == votes[:1]
    # by default at most 1 MiB of each chunk is read: fewer votes, the same bases
    sampled = chunk_votes(view.read, mapping, everything, POB, 1 << 46)
    assert [(v.offset, v.base) for v in sampled] == [(0, base), (2 * CHUNK, base)]
    assert all(0 < s.votes < v.votes for s, v in zip(sampled, votes, strict=True))
    del keep


def mapping_at(start: int, size: int, path: str = "") -> HostMapping:
    return HostMapping(start, start + size, "rw-p", 0, 0, path)


def votes_for(base: int, offsets: list[int], n: int = 100) -> list[ChunkVote]:
    return [ChunkVote(o, base, n, n) for o in offsets]


def layout(placement_regions: list[object]) -> list[tuple[int, int, int]]:
    return [(r.gpa, r.size, r.hva) for r in placement_regions]  # type: ignore[attr-defined]


def test_two_numa_nodes_below_4g() -> None:
    """QEMU ``-numa node,memdev=m0 -numa node,memdev=m1``: m1's mapping sits lower in the host."""
    m0, m1 = mapping_at(0x7F40_0000_0000, 256 * MiB), mapping_at(0x7F30_0000_0000, 256 * MiB)
    usable = usable_ranges(parse_boot_params_e820(zero_page(qemu_e820(512 * MiB, 0))))
    anchor = Anchor(m0, 0xA800000, 0x3400000, 0xA800000)
    votes = {m1.start: votes_for(256 * MiB, [0, CHUNK, 126 * CHUNK])}
    placement = place_mappings([m0, m1], votes, usable, anchor)
    assert layout(placement.regions) == [(0, 256 * MiB, m0.start), (256 * MiB, 256 * MiB, m1.start)]
    assert placement.problems == [] and placement.layout == "multi-mapping"
    assert [r.placed_by for r in placement.regions] == ["kernel image", "300 self-pointer votes"]


def test_a_node_cut_at_the_pci_hole_with_votes_only_above_4g() -> None:
    """2 GiB + 2 GiB: m1 backs [2G, 3G) and [4G, 5G); the kernel only used the part above."""
    m0, m1 = mapping_at(0x7F00_0000_0000, 2 * GiB), mapping_at(0x7E00_0000_0000, 2 * GiB)
    usable = usable_ranges(parse_boot_params_e820(zero_page(qemu_e820(3 * GiB, GiB))))
    anchor = Anchor(m0, 0x33A00000, 0x3400000, 0x33A00000)
    votes = {
        m0.start: votes_for(0, [8 * CHUNK, 900 * CHUNK]),
        m1.start: votes_for(3 * GiB, [512 * CHUNK, 1020 * CHUNK]),
    }
    placement = place_mappings([m0, m1], votes, usable, anchor)
    assert layout(placement.regions) == [
        (0, 2 * GiB, m0.start),
        (2 * GiB, GiB, m1.start),
        (FOUR_GIB, GiB, m1.start + GiB),
    ]
    assert placement.regions[1].placed_by.startswith("the e820 map")
    assert placement.problems == []
    # the same with votes only below the hole
    votes[m1.start] = votes_for(2 * GiB, [3 * CHUNK])
    placement = place_mappings([m0, m1], votes, usable, anchor)
    assert layout(placement.regions)[1:] == [
        (2 * GiB, GiB, m1.start),
        (FOUR_GIB, GiB, m1.start + GiB),
    ]


def test_one_mapping_split_at_4g_without_votes_above() -> None:
    ram = mapping_at(0x7F00_0000_0000, 4 * GiB)
    usable = usable_ranges(parse_boot_params_e820(zero_page(qemu_e820(3 * GiB, GiB))))
    anchor = Anchor(ram, 0x40000000, 0x3400000, 0x40000000)
    placement = place_mappings([ram], {}, usable, anchor)
    assert layout(placement.regions) == [
        (0, 3 * GiB, ram.start),
        (FOUR_GIB, GiB, ram.start + 3 * GiB),
    ]
    assert placement.layout == "split-at-4g" and placement.problems == []


def test_firecracker_style_regions_and_an_unplaceable_mapping() -> None:
    low, high = mapping_at(0x7F00_0000_0000, 3 * GiB), mapping_at(0x7E00_0000_0000, GiB)
    other = mapping_at(0x7D00_0000_0000, 64 * MiB)  # e.g. a device buffer: no kernel data
    usable = [(0, 3 * GiB), (FOUR_GIB, FOUR_GIB + GiB)]
    anchor = Anchor(low, 0x1000000, 0x3400000, 0x1000000)
    votes = {high.start: votes_for(FOUR_GIB, [500 * CHUNK])}
    placement = place_mappings([low, high, other], votes, usable, anchor)
    assert layout(placement.regions) == [(0, 3 * GiB, low.start), (FOUR_GIB, GiB, high.start)]
    (problem,) = placement.problems
    assert f"{other.start:#x} (64 MiB) holds no kernel data" in problem
    # without the high mapping's votes its RAM is reported uncovered, and it unplaced
    placement = place_mappings([low, high], {}, usable, anchor)
    assert len(placement.regions) == 1
    assert any(
        "0x100000000-0x140000000" in p and "no placed mapping" in p for p in placement.problems
    )
    assert any(f"{high.start:#x} (1024 MiB)" in p for p in placement.problems)


def test_votes_against_the_kernel_image_reject_it() -> None:
    ram = mapping_at(0x7F00_0000_0000, 512 * MiB)
    anchor = Anchor(ram, 64 * MiB, 32 * MiB, 64 * MiB)
    # a stale copy: the self-pointers in it say its bytes live 16 MiB higher
    votes = {ram.start: votes_for(16 * MiB, [33 * CHUNK, 34 * CHUNK])}
    with pytest.raises(GuestLayoutError, match="self-pointers agree"):
        place_mappings([ram], votes, [(0, 512 * MiB)], anchor)


def test_weak_and_contradicting_votes_are_outvoted() -> None:
    m0, m1 = mapping_at(0x7F00_0000_0000, 256 * MiB), mapping_at(0x7E00_0000_0000, 256 * MiB)
    usable = [(0, 512 * MiB)]
    anchor = Anchor(m0, 0, 32 * MiB, 0)
    votes = {
        m1.start: [
            *votes_for(256 * MiB, [0, 10 * CHUNK, 100 * CHUNK]),
            ChunkVote(20 * CHUNK, 0x555 * 4096, 3, 3),  # below the per-chunk minimum
            ChunkVote(30 * CHUNK, 0x666 * 4096, 50, 200),  # no majority in its chunk
            ChunkVote(40 * CHUNK, 128 * MiB, 20, 20),  # would make GPAs fall inside the mapping
        ]
    }
    placement = place_mappings([m0, m1], votes, usable, anchor)
    assert layout(placement.regions) == [(0, 256 * MiB, m0.start), (256 * MiB, 256 * MiB, m1.start)]
    (problem,) = placement.problems
    assert "ignored 20 votes" in problem


def test_two_mappings_claiming_the_same_ram() -> None:
    a, b = mapping_at(0x7F00_0000_0000, 256 * MiB), mapping_at(0x7E00_0000_0000, 256 * MiB)
    anchor = Anchor(a, 0, 32 * MiB, 0)
    votes = {b.start: votes_for(0, [50 * CHUNK], n=40)}  # a copy of the first mapping's data
    placement = place_mappings([a, b], votes, [(0, 256 * MiB)], anchor)
    assert layout(placement.regions) == [(0, 256 * MiB, a.start)]
    assert any("would overlap" in p for p in placement.problems)
