"""The placement recovers every hypervisor RAM layout of the kinds we know from sparse votes.

Layouts are drawn the way QEMU makes them (NUMA memdevs end to end in guest-physical order,
the whole cut at ``lowmem`` with the rest at 4 GiB, SeaBIOS's e820 map with its reserved
128 KiB below ``lowmem``) and the way Firecracker makes them (one mapping below the MMIO gap,
one at 4 GiB), with the host mappings in any order. Each mapping gets votes in a few random
chunks only (the kernel used little of it), the kernel image anchors one mapping. Whenever
every mapping has at least one vote, the placement must be exactly the truth.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvs.vm.memory import FOUR_GIB, HostMapping
from dvs.vm.placement import CHUNK, Anchor, ChunkVote, E820Entry, place_mappings, usable_ranges

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def truth_pieces(sizes: list[int], lowmem: int) -> list[list[tuple[int, int, int]]]:
    """Per mapping: ``(offset, size, gpa)`` pieces of QEMU's RAM container cut at lowmem."""
    out = []
    linear = 0
    for size in sizes:
        pieces = []
        offset = 0
        while offset < size:
            at = linear + offset
            if at < lowmem:
                length = min(size - offset, lowmem - at)
                pieces.append((offset, length, at))
            else:
                length = size - offset
                pieces.append((offset, length, FOUR_GIB + at - lowmem))
            offset += length
        out.append(pieces)
        linear += size
    return out


def seabios_e820(lowmem: int, high: int) -> list[E820Entry]:
    entries = [
        E820Entry(0, 0x9FC00, 1),
        E820Entry(MiB, lowmem - 128 * 1024 - MiB, 1),
        E820Entry(lowmem - 128 * 1024, 128 * 1024, 2),
    ]
    if high:
        entries.append(E820Entry(FOUR_GIB, high, 1))
    return entries


@st.composite
def qemu_layouts(draw: st.DrawFn) -> tuple[list[int], int]:
    nodes = draw(st.integers(1, 4))
    sizes = [draw(st.integers(32, 2048)) * 2 * MiB for _ in range(nodes)]
    total = sum(sizes)
    # pc: lowmem 3 GiB once RAM reaches 3.5 GiB; q35: 2 GiB from 2.75 GiB; else all below 4 GiB
    lowmem = draw(st.sampled_from([x for x in (3 << 30, 2 << 30) if total > x] or [total]))
    return sizes, lowmem


@settings(max_examples=300, deadline=None)
@given(layout=qemu_layouts(), data=st.data())
def test_qemu_numa_layouts(layout: tuple[list[int], int], data: st.DataObject) -> None:
    sizes, lowmem = layout
    truth = truth_pieces(sizes, lowmem)
    host_order = data.draw(st.permutations(range(len(sizes))))
    mappings = []
    for rank, index in enumerate(host_order):
        start = 0x7E00_0000_0000 + rank * (8 << 30) + data.draw(st.integers(0, 511)) * 4096
        mappings.append((index, HostMapping(start, start + sizes[index], "rw-s", 0, 1, "/memfd:m")))
    mappings.sort()
    votes: dict[int, list[ChunkVote]] = {}
    for (_, mapping), pieces in zip(mappings, truth, strict=True):
        chunks = data.draw(
            st.lists(st.integers(0, mapping.size // CHUNK - 1), min_size=1, max_size=4, unique=True)
        )
        votes[mapping.start] = []
        for chunk in chunks:
            offset = chunk * CHUNK
            _, _, gpa = next(p for p in pieces if p[0] <= offset < p[0] + p[1])
            piece_offset = next(p[0] for p in pieces if p[0] <= offset < p[0] + p[1])
            base = gpa - piece_offset
            votes[mapping.start].append(ChunkVote(offset, base, 50, 60))
    # the kernel image: 2 MiB aligned, in usable RAM, inside one piece
    kernel_index = data.draw(st.integers(0, len(sizes) - 1))
    offset, length, gpa = data.draw(st.sampled_from(truth[kernel_index]))
    image_offset = data.draw(st.integers(0, max(0, (length - 64 * MiB) // (2 * MiB)))) * 2 * MiB
    image_size = min(32 * MiB, length - image_offset)
    kernel_mapping = mappings[kernel_index][1]
    anchor = Anchor(kernel_mapping, offset + image_offset, image_size, gpa + image_offset)
    high = sum(sizes) - lowmem
    usable = usable_ranges(seabios_e820(lowmem, high))

    placement = place_mappings([m for _, m in mappings], votes, usable, anchor)

    want = sorted(
        (gpa, size, mapping.start + offset)
        for (_, mapping), pieces in zip(mappings, truth, strict=True)
        for offset, size, gpa in pieces
    )
    got = [(r.gpa, r.size, r.hva) for r in placement.regions]
    # adjacent pieces of one mapping that continue linearly are one region for us
    assert _merged(got) == _merged(want)
    assert placement.problems == []


def _merged(regions: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for gpa, size, hva in sorted(regions):
        if out and out[-1][0] + out[-1][1] == gpa and out[-1][2] + out[-1][1] == hva:
            out[-1] = (out[-1][0], out[-1][1] + size, out[-1][2])
        else:
            out.append((gpa, size, hva))
    return out


@settings(max_examples=100, deadline=None)
@given(
    low_mib=st.integers(64, 3072),
    high_mib=st.integers(2, 4096),
    high_first=st.booleans(),
    vote_chunk=st.integers(0, 1 << 20),
)
def test_firecracker_regions(
    low_mib: int, high_mib: int, high_first: bool, vote_chunk: int
) -> None:
    """Firecracker: RAM below 3 GiB (at most), the rest at 4 GiB, one mapping each."""
    low_size, high_size = low_mib * MiB, high_mib * MiB
    low = HostMapping(0x7F00_0000_0000, 0x7F00_0000_0000 + low_size, "rw-p", 0, 0, "")
    high_start = 0x7E00_0000_0000 if high_first else 0x7F80_0000_0000
    high = HostMapping(high_start, high_start + high_size, "rw-p", 0, 0, "")
    chunk = vote_chunk % -(-high_size // CHUNK) * CHUNK
    votes = {high.start: [ChunkVote(chunk, FOUR_GIB, 30, 30)]}
    anchor = Anchor(low, 0x1000000, min(32 * MiB, low_size - 0x1000000), 0x1000000)
    usable = [(0, low_size), (FOUR_GIB, FOUR_GIB + high_size)]
    placement = place_mappings([high, low], votes, usable, anchor)
    got = [(r.gpa, r.size, r.hva) for r in placement.regions]
    assert got == [(0, low_size, low.start), (FOUR_GIB, high_size, high.start)]
    assert placement.problems == []
