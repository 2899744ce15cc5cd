"""Every ksymtab entry format, on synthetic images: PREL32 with and without namespace, absolute
with and without namespace; negative and positive offsets; found by scanning and by bounds."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvs.vm import ksyms

BASE = 0xFFFF_FFFF_8120_0000
TABLE_AT = 0x40000
SIZE = 0x100000


def build(fmt: str, names: list[str], rng: random.Random) -> tuple[bytes, dict[str, int], int]:
    """An image with strings at 0x80000, targets on both sides of the table, one table."""
    image = bytearray(rng.randbytes(SIZE))
    size, prel = ksyms.FORMATS[fmt]
    strings_at = 0x80000
    name_pos = {}
    pos = strings_at
    image[pos] = 0
    pos += 1
    ns_pos = pos
    image[pos : pos + 4] = b"NS1\0"
    pos += 4
    for name in names:
        name_pos[name] = pos
        image[pos : pos + len(name) + 1] = name.encode() + b"\0"
        pos += len(name) + 1
    values = {}
    table_end = TABLE_AT + size * len(names)
    image[table_end : table_end + 64] = b"\xff" * 64  # something that is not an entry
    for i, name in enumerate(sorted(names)):
        entry = TABLE_AT + i * size
        # negative offsets (text before the table) and positive ones (data after it)
        target = rng.choice([rng.randrange(0, TABLE_AT), rng.randrange(0xC0000, SIZE)])
        values[name] = BASE + target
        fields = [BASE + target, BASE + name_pos[name]]
        if size in (12, 24):
            fields.append(BASE + (ns_pos if i % 3 == 0 else ns_pos + 3))  # "NS1" or ""
        for k, value in enumerate(fields):
            if prel:
                struct.pack_into("<i", image, entry + 4 * k, value - (BASE + entry + 4 * k))
            else:
                struct.pack_into("<Q", image, entry + 8 * k, value)
    return bytes(image), values, table_end


@pytest.mark.parametrize("fmt", list(ksyms.FORMATS))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(70, 300))
def test_each_format_is_found_and_decoded(fmt: str, seed: int, count: int) -> None:
    rng = random.Random(seed)
    names = sorted({f"sym_{rng.getrandbits(40):x}" for _ in range(count)})
    image, values, table_end = build(fmt, names, rng)
    scanned = ksyms.scan(image, BASE)
    assert scanned.format == fmt
    assert scanned.table_va == BASE + TABLE_AT
    assert scanned.as_dict() == values
    found, symbols = ksyms.parse_table(image, BASE, BASE + TABLE_AT, BASE + table_end, gpl=False)
    assert found == fmt
    assert {s.name: s.value for s in symbols} == values
    if ksyms.FORMATS[fmt][0] in (12, 24):
        assert {s.namespace for s in symbols} == {"NS1", ""}
