"""Kernel symbol and type tables read from the kit's vmlinux (offline, no guest).

The vmlinux is stripped, but its ELF section headers still say where ``__ksymtab``,
``__ksymtab_gpl`` and ``.BTF`` are: an oracle independent of our in-memory search. The parsers
get only the loaded image bytes (what guest memory holds), never the ELF headers.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvs.testing.guest import guest_kit
from dvs.vm import btf as btf_mod
from dvs.vm import kallsyms, ksyms
from dvs.vm.errors import GuestLayoutError

pytestmark = pytest.mark.timeout(300)


class Vmlinux:
    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        headers = [
            struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
        ]
        names = headers[shstrndx]
        strtab = data[names[4] : names[4] + names[5]]
        self.sections = {}
        for h in headers:
            name = strtab[h[0] : strtab.index(b"\0", h[0])].decode()
            self.sections[name] = (h[3], h[4], h[5])  # addr, file offset, size
        text_addr, text_off, _ = self.sections[".text"]
        # The first PT_LOAD (text, rodata, ksymtab, BTF) is contiguous from .text in the file.
        self.base = text_addr
        self.image = data[text_off : text_off + 0x4000000]

    def section(self, name: str) -> tuple[int, int]:
        addr, _, size = self.sections[name]
        return addr, size


@pytest.fixture(scope="module")
def vmlinux() -> Vmlinux:
    return Vmlinux(guest_kit().vmlinux)


@pytest.fixture(scope="module")
def symbols(vmlinux: Vmlinux) -> kallsyms.Kallsyms:
    tables = kallsyms.find_token_tables(vmlinux.image)
    assert len(tables) == 1
    return kallsyms.parse(vmlinux.image, *tables[0])


def test_kallsyms_decodes_text_data_and_percpu_symbols(
    vmlinux: Vmlinux, symbols: kallsyms.Kallsyms
) -> None:
    assert len(symbols) > 50000
    assert symbols.relative_base == vmlinux.base
    assert symbols.lookup("_text") == vmlinux.base
    assert symbols.type_of("_printk") == "T"
    assert symbols.type_of("init_task") == "D"  # KALLSYMS_ALL: data symbols too
    assert symbols.lookup("__start___ksymtab") == vmlinux.section("__ksymtab")[0]
    assert symbols.lookup("__start_BTF") == vmlinux.section(".BTF")[0]
    assert symbols.lookup("fixed_percpu_data") == 0  # absolute per-CPU offset
    addresses = [a for _, _, a in symbols.items() if a >= 1 << 63]
    assert addresses == sorted(addresses)
    assert symbols.symbolize(symbols.lookup("_printk") + 5) == ("_printk", 5)


def test_kallsyms_follows_a_kaslr_slide(vmlinux: Vmlinux, symbols: kallsyms.Kallsyms) -> None:
    """KASLR relocates kallsyms_relative_base; every non-per-CPU address moves with it."""
    slide = 0x2A600000
    image = bytearray(vmlinux.image)
    pos = symbols.layout.relative_base
    assert pos is not None
    struct.pack_into("<Q", image, pos, vmlinux.base + slide)
    moved = kallsyms.parse(bytes(image), symbols.layout.token_table, symbols.layout.token_index)
    assert moved.lookup("_printk") == symbols.lookup("_printk") + slide
    assert moved.lookup("init_task") == symbols.lookup("init_task") + slide
    assert moved.lookup("fixed_percpu_data") == 0


def test_ksymtab_scan_agrees_with_kallsyms_bounds_and_section_headers(
    vmlinux: Vmlinux, symbols: kallsyms.Kallsyms
) -> None:
    lookup = {n: a for n, _, a in symbols.items()}
    bounded = ksyms.from_kallsyms(vmlinux.image, vmlinux.base, lookup)
    scanned = ksyms.scan(vmlinux.image, vmlinux.base)
    assert scanned.symbols == bounded.symbols
    assert scanned.format == "prel32-ns"
    start, size = vmlinux.section("__ksymtab")
    gpl_start, gpl_size = vmlinux.section("__ksymtab_gpl")
    assert (scanned.table_va, scanned.count) == (start, size // 12)
    assert (scanned.gpl_table_va, scanned.gpl_count) == (gpl_start, gpl_size // 12)
    exported = scanned.as_dict()
    # negative offsets (text before the table) and positive ones (data after it, per-CPU)
    for name in ("_printk", "queue_work_on", "system_wq", "init_task", "this_cpu_off"):
        assert exported[name] == lookup[name], name
    assert exported["this_cpu_off"] < 0x100000
    assert exported["system_wq"] > scanned.table_va
    assert {s.namespace for s in scanned.symbols} > {""}


def test_ksymtab_values_follow_the_image_base(vmlinux: Vmlinux) -> None:
    slide = 0x13C00000
    plain = ksyms.scan(vmlinux.image, vmlinux.base).as_dict()
    moved = ksyms.scan(vmlinux.image, vmlinux.base + slide).as_dict()
    assert moved["_printk"] == plain["_printk"] + slide


def test_btf_member_offsets(vmlinux: Vmlinux) -> None:
    start, size = vmlinux.section(".BTF")
    offset = start - vmlinux.base
    assert btf_mod.find_btf(vmlinux.image)[0] == offset
    btf = btf_mod.Btf(vmlinux.image[offset : offset + size])
    assert len(btf) > 50000
    assert btf.offsetof("list_head", "prev") == 8
    assert btf.offsetof("work_struct", "func") == 24
    assert btf.offsetof("delayed_work", "work.func") == 24
    assert btf.offsetof("delayed_work", "timer.expires") > btf.offsetof("delayed_work", "timer")
    assert btf.struct_size("page") == 64
    assert btf.offsetof("page", "flags") == 0
    assert 0 < btf.enum_value("pageflags", "PG_reserved") < 64
    with pytest.raises(KeyError):
        btf.offsetof("task_struct", "no_such_member")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_garbage_never_crashes_the_parsers(data: bytes) -> None:
    blob = data + kallsyms.DIGIT_TOKENS + data
    for table in kallsyms.find_token_tables(blob):
        with pytest.raises(GuestLayoutError):
            kallsyms.parse(blob, *table)
    with pytest.raises(GuestLayoutError):
        ksyms.scan(data, 0xFFFF_FFFF_8100_0000)
    try:
        btf_mod.Btf(btf_mod.HEADER + data)
    except GuestLayoutError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4000), st.binary(min_size=1, max_size=64))
def test_corrupted_btf_gives_typed_errors(vmlinux: Vmlinux, at: int, junk: bytes) -> None:
    start, size = vmlinux.section(".BTF")
    offset = start - vmlinux.base
    blob = bytearray(vmlinux.image[offset : offset + min(size, 1 << 16)])
    struct.pack_into("<I", blob, 12, len(blob) - 24 - 1024)  # type section inside the blob
    struct.pack_into("<II", blob, 16, len(blob) - 24 - 1024, 1024)
    blob[24 + at : 24 + at + len(junk)] = junk
    try:
        parsed = btf_mod.Btf(bytes(blob))
        for type_id in range(1, min(len(parsed), 200)):
            try:
                parsed.name(type_id)
                parsed.sizeof(type_id)
            except GuestLayoutError:
                pass
    except GuestLayoutError:
        pass


def test_kallsyms_layout_of_newer_kernels(symbols: kallsyms.Kallsyms, vmlinux: Vmlinux) -> None:
    """6.4+ moved offsets and relative_base behind the token index ("layout B"): rebuild the
    tables in that order from the 6.1 image and decode them again."""
    lay = symbols.layout
    image = vmlinux.image
    count = len(symbols)
    assert lay.relative_base is not None and lay.names % 8 == 0
    body = image[lay.names : lay.token_index + 512]
    buf = bytearray(struct.pack("<II", count, 0)) + body
    buf += b"\0" * (-len(buf) % 8)
    buf += image[lay.addresses : lay.addresses + 4 * count]
    buf += b"\0" * (-len(buf) % 8)
    buf += image[lay.relative_base : lay.relative_base + 8]
    shift = 8 - lay.names
    moved = kallsyms.parse(bytes(buf), lay.token_table + shift, lay.token_index + shift)
    assert moved.layout.layout == "B"
    assert moved.names == symbols.names
    assert (moved.addresses == symbols.addresses).all()
