"""The page-table walker on synthetic page tables: 4- and 5-level paging, 4K/2M/1G leaves,
effective rights, CR3 decoding and PTI pairs, enumeration, and garbage memory.

QEMU 7.2's TCG here cannot be relied on for live 5-level guests everywhere, so the walker is
tested against tables built by an independent little builder in a local guest-memory buffer.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.lowlevel.guestmem import GuestMemory
from dvs.vm.errors import GuestLayoutError, TranslationFault
from dvs.vm.paging import (
    PTE_GLOBAL,
    PTE_NX,
    PTE_PRESENT,
    PTE_PS,
    PTE_USER,
    PTE_WRITABLE,
    PageTables,
    PagingMode,
    canonical,
    decode_cr3,
    kernel_root,
    user_root,
)

pytestmark = pytest.mark.timeout(300)

RAM = 64 << 20
TABLE_AREA = 0x100000  # tables are allocated from here; leaves point anywhere
SIZES = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}


class Builder:
    """Builds page tables the straightforward way, entry by entry."""

    def __init__(self, mem: GuestMemory, mode: PagingMode) -> None:
        self.mem = mem
        self.mode = mode
        self.next_table = TABLE_AREA
        self.root = self.alloc()

    def alloc(self) -> int:
        table = self.next_table
        self.next_table += 4096
        self.mem.write(table, bytes(4096))
        return table

    def map(self, va: int, pa: int, level: int, flags: int, table_flags: int) -> None:
        table = self.root
        for current in range(int(self.mode), level, -1):
            index = (va >> (12 + 9 * (current - 1))) & 0x1FF
            entry = self.mem.read_u64(table + 8 * index)
            if not entry & PTE_PRESENT:
                child = self.alloc()
                entry = child | table_flags
                self.mem.write_u64(table + 8 * index, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        index = (va >> (12 + 9 * (level - 1))) & 0x1FF
        leaf = pa | flags | PTE_PRESENT | (PTE_PS if level > 1 else 0)
        self.mem.write_u64(table + 8 * index, leaf)


def va_index(mode: PagingMode) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << (mode.va_bits - 12)) - 1)


mappings = st.lists(
    st.tuples(
        st.integers(0, (1 << 45) - 1),  # VA page-number seed
        st.sampled_from([1, 2, 3]),  # level: 4K, 2M, 1G
        st.integers(0, (1 << 28) - 1),  # PA frame seed
        st.booleans(),  # writable
        st.booleans(),  # user
        st.booleans(),  # nx
        st.booleans(),  # global
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.parametrize("mode", [PagingMode.FOUR_LEVEL, PagingMode.FIVE_LEVEL])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mappings, table_nx=st.booleans(), table_user=st.booleans())
def test_translate_and_enumerate_agree_with_the_builder(
    mode: PagingMode,
    data: list[tuple[int, int, int, bool, bool, bool, bool]],
    table_nx: bool,
    table_user: bool,
) -> None:
    mem = GuestMemory.local(RAM)
    builder = Builder(mem, mode)
    table_flags = (
        PTE_PRESENT | PTE_WRITABLE | (PTE_USER if table_user else 0) | (PTE_NX if table_nx else 0)
    )
    expected: dict[int, tuple[int, int, int]] = {}
    for seed, level, frame, w, u, nx, g in data:
        size = SIZES[level]
        va = canonical((seed * 4096) & ~(size - 1) & ((1 << mode.va_bits) - 1), mode)
        # the walk to a 1G leaf shares upper tables; avoid overlapping leaves at different sizes
        if any(v <= va < v + s or va <= v < va + size for v, (_, s, _) in expected.items()):
            continue
        pa = (frame * 4096) & ~(size - 1) & ((1 << 46) - 1)
        flags = (PTE_WRITABLE if w else 0) | (PTE_USER if u else 0) | (PTE_NX if nx else 0)
        flags |= PTE_GLOBAL if g else 0
        builder.map(va, pa, level, flags, table_flags)
        expected[va] = (pa, size, flags)
    tables = PageTables(mem, builder.root, mode)
    for va, (pa, size, flags) in expected.items():
        for probe in (va, va + size // 2 + 123, va + size - 1):
            t = tables.translate(probe)
            assert t.pa == pa + (probe - va)
            assert t.page_size == size
            assert t.writable == bool(flags & PTE_WRITABLE)
            assert t.user == (bool(flags & PTE_USER) and table_user)
            assert t.executable == (not (flags & PTE_NX) and not table_nx)
            assert t.global_ == bool(flags & PTE_GLOBAL)
    runs = tables.mappings(merge=False)
    got = {r.va: (r.pa, r.size) for r in runs}
    assert got == {va: (pa, size) for va, (pa, size, _) in expected.items()}
    merged = tables.mappings()
    assert sum(r.size for r in merged) == sum(s for _, s, _ in expected.values())
    for va, (pa, _, _) in expected.items():
        run = next(r for r in merged if r.contains(va))
        assert run.pa + (va - run.va) == pa
    # an address no leaf covers faults
    hole = canonical(0x7F00_0000_0000 | 0x1000, mode)
    if not any(v <= hole < v + s for v, (_, s, _) in expected.items()):
        with pytest.raises(TranslationFault):
            tables.translate(hole)


def test_enumeration_respects_a_range_and_merges_contiguous_pages() -> None:
    mem = GuestMemory.local(RAM)
    builder = Builder(mem, PagingMode.FOUR_LEVEL)
    base = 0xFFFF_8880_0000_0000
    for i in range(8):  # 8 contiguous 4K pages, then a 2M page right after
        builder.map(base + i * 4096, 0x200000 + i * 4096, 1, PTE_WRITABLE | PTE_NX, 0x63)
    builder.map(base + 0x200000, 0x400000, 2, PTE_WRITABLE | PTE_NX, 0x63)
    tables = PageTables(mem, builder.root)
    runs = tables.mappings()
    assert [(r.va, r.pa, r.size) for r in runs] == [
        (base, 0x200000, 0x8000),
        (base + 0x200000, 0x400000, 0x200000),
    ]
    only = tables.mappings(base + 0x3000, base + 0x5000)
    assert [(r.va, r.size) for r in only] == [(base + 0x3000, 0x2000)]


def test_ps_in_a_pml4_entry_is_a_layout_error() -> None:
    mem = GuestMemory.local(RAM)
    root = TABLE_AREA
    mem.write_u64(root + 8 * 511, 0x200000 | PTE_PRESENT | PTE_PS)
    tables = PageTables(mem, root)
    with pytest.raises(GuestLayoutError):
        tables.translate(0xFFFF_FF80_0000_0000)
    assert tables.mappings() == []
    assert tables.skipped_entries == 1


def test_tables_outside_ram_and_non_canonical_addresses_are_layout_errors() -> None:
    mem = GuestMemory.local(RAM)
    root = TABLE_AREA
    mem.write_u64(root, (RAM + 0x1000) | 0x63)  # points past the end of RAM
    tables = PageTables(mem, root)
    with pytest.raises(GuestLayoutError):
        tables.translate(0x1000)
    with pytest.raises(GuestLayoutError):
        tables.translate(0x0000_8000_0000_0000)  # non-canonical in 4-level
    assert tables.mappings() == []
    assert tables.skipped_entries == 1


@pytest.mark.parametrize("pcide", [False, True])
def test_cr3_decoding_and_pti_pairs(pcide: bool) -> None:
    cr3 = 0x1_2345_7000 | 0x18 | (0x5 if pcide else 0)
    decoded = decode_cr3(cr3 | (1 << 63) if pcide else cr3, pcide=pcide)
    assert decoded.root == 0x1_2345_7000
    assert kernel_root(decoded.root) == 0x1_2345_6000
    assert user_root(kernel_root(decoded.root)) == 0x1_2345_7000
    if pcide:
        assert decoded.pcid == 0x1D and not decoded.pwt
    else:
        assert decoded.pcid == 0 and decoded.pwt and decoded.pcd


def test_pti_user_copy_lacks_the_kernel_mapping() -> None:
    mem = GuestMemory.local(RAM)
    builder = Builder(mem, PagingMode.FOUR_LEVEL)
    builder.next_table = TABLE_AREA + 0x10000
    kernel_va = 0xFFFF_FFFF_8100_0000
    builder.map(kernel_va, 0x1000000, 2, 0, 0x63)
    user = user_root(builder.root)  # an empty odd page: the user half
    assert builder.root % 8192 == 0
    assert PageTables(mem, kernel_root(user)).translate(kernel_va).pa == 0x1000000
    with pytest.raises(TranslationFault):
        PageTables(mem, user).translate(kernel_va)


@pytest.mark.parametrize("mode", [PagingMode.FOUR_LEVEL, PagingMode.FIVE_LEVEL])
@settings(max_examples=25, deadline=None)
@given(seed=st.binary(min_size=16, max_size=16), root_page=st.integers(0, 255))
def test_garbage_tables_give_typed_errors_in_bounded_time(
    mode: PagingMode, seed: bytes, root_page: int
) -> None:
    mem = GuestMemory.local(1 << 20)
    rng = __import__("random").Random(seed)
    mem.write(0, bytes(rng.getrandbits(8) for _ in range(1 << 20)))
    tables = PageTables(mem, root_page * 4096, mode, max_tables=4096)
    for _ in range(50):
        va = canonical(rng.getrandbits(mode.va_bits) & ~0xFFF, mode)
        try:
            tables.translate(va)
        except (TranslationFault, GuestLayoutError):
            pass
    started = time.monotonic()
    try:
        tables.mappings()
    except GuestLayoutError:
        pass
    assert time.monotonic() - started < 30


def test_self_referencing_tables_hit_the_table_limit() -> None:
    mem = GuestMemory.local(1 << 20)
    root = 0x1000
    mem.write(root, struct.pack("<512Q", *([root | 0x63] * 512)))  # every entry -> itself
    tables = PageTables(mem, root, max_tables=10000)
    with pytest.raises(GuestLayoutError, match="bounded"):
        tables.mappings()
