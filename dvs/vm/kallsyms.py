"""The kernel's in-memory symbol table (kallsyms), found and decoded without any symbol file.

What ``scripts/kallsyms.c`` links into every kernel built with CONFIG_KALLSYMS (read-only data,
so it sits in the image in guest RAM, relocated by KASLR like everything else):

* ``kallsyms_num_syms`` (u32) and ``kallsyms_names``: one entry per symbol, sorted by
  address: a length (one byte; since 6.1 a second byte follows when the first has bit 7 set,
  ULEB128-style) then that many token indices. Expanding the tokens gives the type letter
  (``T``, ``t``, ``D``...; CONFIG_KALLSYMS_ALL adds data symbols) followed by the name.
* ``kallsyms_markers``: the offset into ``names`` of every 256th entry (u32 since 6.1 on
  x86-64; unsigned long before), then ``kallsyms_seqs_of_names`` (3 bytes per symbol, names in
  sorted order; 6.2, backported into Debian's 6.1) when present.
* ``kallsyms_token_table``: 256 NUL-terminated strings, token i at index i; a byte value that
  occurs in some name by itself stays a one-character token, so '0'..'9' are always the
  consecutive strings "0\\0" .. "9\\0" at indices 0x30..0x39 -- our search signature.
  ``kallsyms_token_index``: 256 u16 offsets of the tokens in the table.
* Addresses: with CONFIG_KALLSYMS_BASE_RELATIVE, ``kallsyms_offsets`` (s32 each) and the u64
  ``kallsyms_relative_base`` (the relocated address of the lowest symbol). With
  KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP) a non-negative offset is an absolute value (per-CPU
  symbols) and a negative one means ``relative_base - 1 - offset``; otherwise offsets are
  unsigned and added to the base. Without BASE_RELATIVE, ``kallsyms_addresses`` holds u64s.
* Order: up to 6.3 ``offsets, relative_base, num_syms, names, markers, [seqs], token_table,
  token_index`` (layout "A"); from 6.4 ``num_syms, names, markers, seqs, token_table,
  token_index, offsets, relative_base`` (layout "B"). Both are recognised.

The tables do not list themselves, so finding them is a signature search followed by
structural checks (token index matches the token table, markers match the decoded names,
addresses ascend); everything is bounds-checked against the buffer and a malformed table
raises ``GuestLayoutError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dvs.vm.errors import GuestLayoutError

DIGIT_TOKENS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
"""Tokens 0x30..0x39 of every token table: the search signature."""

_KERNEL_HALF = 0xFFFF_8000_0000_0000
_MAX_SYMBOLS = 1 << 22
_MARKER_WINDOW = 16 << 20
"""How far before the token table the markers may start (names + seqs of 4M symbols)."""


def _bad(detail: str) -> GuestLayoutError:
    return GuestLayoutError("kallsyms tables are consistent", detail)


@dataclass(frozen=True)
class KallsymsLayout:
    """Byte positions of each table inside the buffer that was parsed."""

    token_table: int
    token_index: int
    markers: int
    names: int
    num_syms: int
    addresses: int
    relative_base: int | None
    """``None`` for absolute ``kallsyms_addresses``."""
    layout: str
    """"A" (tables before the names, up to 6.3) or "B" (after the token index, 6.4+)."""
    absolute_percpu: bool
    seqs_of_names: bool


@dataclass
class Kallsyms:
    names: list[str]
    types: str
    addresses: npt.NDArray[np.uint64]
    layout: KallsymsLayout
    relative_base: int | None
    _by_name: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, name in enumerate(self.names):
            self._by_name.setdefault(name, i)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def lookup(self, name: str) -> int:
        """Address of the first symbol called ``name``; ``KeyError`` if there is none."""
        return int(self.addresses[self._by_name[name]])

    def get(self, name: str) -> int | None:
        index = self._by_name.get(name)
        return None if index is None else int(self.addresses[index])

    def type_of(self, name: str) -> str:
        return self.types[self._by_name[name]]

    def items(self) -> Iterator[tuple[str, str, int]]:
        """``(name, type letter, address)`` in address order."""
        yield from zip(self.names, self.types, self.addresses.tolist(), strict=True)

    def symbolize(self, address: int) -> tuple[str, int] | None:
        """The symbol at or below ``address`` and the offset into it."""
        index = int(np.searchsorted(self.addresses, np.uint64(address), side="right")) - 1
        if index < 0:
            return None
        return self.names[index], address - int(self.addresses[index])


def _read_tokens(buf: bytes, start: int) -> tuple[list[bytes], int] | None:
    tokens: list[bytes] = []
    pos = start
    for _ in range(256):
        end = buf.find(b"\0", pos, pos + 256)
        if end < 0:
            return None
        tokens.append(buf[pos:end])
        pos = end + 1
    return tokens, pos


def _tokens_with_index(buf: bytes, start: int) -> tuple[list[bytes], int] | None:
    """256 tokens at ``start`` followed (after alignment padding) by their u16 index."""
    parsed = _read_tokens(buf, start)
    if parsed is None:
        return None
    tokens, end = parsed
    if any(len(t) == 0 for t in tokens):
        return None
    expected = []
    offset = 0
    for token in tokens:
        expected.append(offset)
        offset += len(token) + 1
    if offset > 0xFFFF:
        return None
    want = struct.pack("<256H", *expected)
    for pad in range(0, 16, 2):
        pos = ((end + 1) & ~1) + pad
        if buf[pos : pos + 512] == want:
            return tokens, pos
    return None


def token_table_at(buf: bytes, digits: int) -> tuple[int, int, list[bytes]] | None:
    """Validate a digit-signature hit; return (token_table, token_index, tokens)."""
    start = digits
    for _ in range(0x30):  # walk back over the 48 tokens before "0"
        if start < 2 or buf[start - 1] != 0:
            return None
        start = buf.rfind(b"\0", max(0, start - 258), start - 1) + 1
    found = _tokens_with_index(buf, start)
    if found is None:
        return None
    return start, found[1], found[0]


def find_token_tables(buf: bytes) -> list[tuple[int, int]]:
    """Positions ``(token_table, token_index)`` of every valid token table in ``buf``."""
    found = []
    hit = buf.find(DIGIT_TOKENS)
    while hit >= 0:
        table = token_table_at(buf, hit)
        if table is not None:
            found.append((table[0], table[1]))
        hit = buf.find(DIGIT_TOKENS, hit + 1)
    return found


def _u32(buf: bytes, pos: int) -> int:
    if pos < 0 or pos + 4 > len(buf):
        raise _bad(f"read at {pos:#x} outside the {len(buf):#x}-byte window")
    return int(struct.unpack_from("<I", buf, pos)[0])


def _u64(buf: bytes, pos: int) -> int:
    if pos < 0 or pos + 8 > len(buf):
        raise _bad(f"read at {pos:#x} outside the {len(buf):#x}-byte window")
    return int(struct.unpack_from("<Q", buf, pos)[0])


def _markers_before(buf: bytes, token_table: int) -> list[tuple[int, int]]:
    """Candidate ``(position, count)`` of u32 marker arrays ending before the token table.

    Markers start with 0 and grow by the encoded size of 256 names each (at least 512
    bytes, at most 256 * 130). The array is followed by padding, optionally by
    ``seqs_of_names`` (3 bytes per symbol), then the token table. Vectorised: a Python loop
    over every zero word of a megabytes-long window would dominate the whole search.
    """
    window = min(token_table, _MARKER_WINDOW) & ~3
    base = token_table - window
    base += (-base) % 4
    words = np.frombuffer(buf, dtype="<u4", count=(token_table - base) // 4, offset=base)
    if len(words) < 2:
        return []
    diffs = np.diff(words.astype(np.int64))
    good = (diffs >= 512) & (diffs <= 256 * 130)
    starts = np.nonzero((words[:-1] == 0) & good)[0]
    if len(starts) == 0:
        return []
    breaks = np.concatenate([np.nonzero(~good)[0], [len(good)]])
    counts = breaks[np.searchsorted(breaks, starts)] - starts + 1
    ends = base + 4 * (starts + counts)
    tails = token_table - ends
    low = 3 * 256 * (counts - 1)
    fits = (tails <= 8) | ((tails > low) & (tails <= low + 3 * 256 + 16))
    return [
        (base + 4 * int(z), int(c))
        for z, c in zip(starts[fits].tolist(), counts[fits].tolist(), strict=True)
    ]


def _decode_names(
    buf: bytes, start: int, count: int, tokens: list[bytes]
) -> tuple[list[bytes], list[int], int]:
    """Decode ``count`` names; return (expanded names, entry offsets, end position)."""
    names: list[bytes] = []
    offsets: list[int] = []
    pos = start
    limit = len(buf)
    for _ in range(count):
        if pos >= limit:
            raise _bad("names run past the window")
        offsets.append(pos - start)
        length = buf[pos]
        pos += 1
        if length & 0x80:
            if pos >= limit:
                raise _bad("names run past the window")
            length = (length & 0x7F) | (buf[pos] << 7)
            pos += 1
        if length == 0 or pos + length > limit:
            raise _bad(f"name entry at {pos:#x} has length {length}")
        names.append(b"".join([tokens[b] for b in buf[pos : pos + length]]))
        pos += length
    return names, offsets, pos


def parse(buf: bytes, token_table: int, token_index: int) -> Kallsyms:
    """Decode the kallsyms tables around a validated token table in ``buf``."""
    found = _tokens_with_index(buf, token_table)
    if found is None or found[1] != token_index:
        raise _bad(f"no valid token table at {token_table:#x}")
    tokens = found[0]
    table = (token_table, token_index, tokens)
    errors: list[str] = []
    for markers, marker_count in _markers_before(buf, token_table):
        marks = np.frombuffer(buf, dtype="<u4", count=marker_count, offset=markers)
        last = int(marks[-1])
        low, high = 256 * (marker_count - 1) + 1, 256 * marker_count
        # num_syms directly precedes names (4 or 8 bytes before); names end right before the
        # markers (up to 8 bytes of padding). The last marker bounds where names can start.
        names_end_max = markers
        for names in range(names_end_max - last - 1, max(-1, names_end_max - last - 256 * 260), -1):
            for gap in (4, 8):
                if names - gap < 0:
                    continue
                count = _u32(buf, names - gap)
                if not low <= count <= high:
                    continue
                try:
                    result = _finish(buf, tokens, names, gap, count, markers, marks, table)
                except GuestLayoutError as exc:
                    errors.append(str(exc))
                    continue
                if result is not None:
                    return result
    raise _bad(
        "no markers/names/offsets combination around the token table at "
        f"{token_table:#x} is consistent" + (f" (last: {errors[-1]})" if errors else "")
    )


def _finish(
    buf: bytes,
    tokens: list[bytes],
    names_pos: int,
    gap: int,
    count: int,
    markers: int,
    marks: npt.NDArray[np.uint32],
    table: tuple[int, int, list[bytes]],
) -> Kallsyms | None:
    if count > _MAX_SYMBOLS:
        return None
    raw_names, offsets, end = _decode_names(buf, names_pos, count, tokens)
    if not 0 <= markers - end <= 8:
        return None
    if any(offsets[256 * k] != int(m) for k, m in enumerate(marks.tolist())):
        return None
    token_table, token_index, _ = table
    seqs = token_table - (markers + 4 * len(marks)) > 8
    num_syms = names_pos - gap
    layouts: list[tuple[str, int, int | None]] = []
    # Layout A: [offsets][relative_base u64][num_syms] right before the names.
    base_pos = num_syms - 8
    if base_pos >= 0 and base_pos % 8 == 0:
        for addresses in (base_pos - 4 * count, base_pos - 4 * count - 4):
            layouts.append(("A", addresses, base_pos))
    # Layout B: [offsets][relative_base] after the token index.
    after = token_index + 512
    for addresses in (after + (-after) % 8, after + (-after) % 4):
        rb = addresses + 4 * count
        layouts.append(("B", addresses, rb + (-rb) % 8))
    # Absolute addresses (no KALLSYMS_BASE_RELATIVE): [u64 addresses][num_syms].
    layouts.append(("A", num_syms - 8 * count - (num_syms % 8), None))
    for kind, addresses_pos, base_pos2 in layouts:
        values = _addresses(buf, addresses_pos, count, base_pos2)
        if values is None:
            continue
        symbol_addresses, absolute_percpu = values
        decoded = [n.decode("ascii", "replace") for n in raw_names]
        layout = KallsymsLayout(
            token_table=token_table,
            token_index=token_index,
            markers=markers,
            names=names_pos,
            num_syms=num_syms,
            addresses=addresses_pos,
            relative_base=base_pos2,
            layout=kind,
            absolute_percpu=absolute_percpu,
            seqs_of_names=seqs,
        )
        return Kallsyms(
            names=[d[1:] for d in decoded],
            types="".join(d[:1] for d in decoded),
            addresses=symbol_addresses,
            layout=layout,
            relative_base=None if base_pos2 is None else _u64(buf, base_pos2),
        )
    return None


def _addresses(
    buf: bytes, pos: int, count: int, base_pos: int | None
) -> tuple[npt.NDArray[np.uint64], bool] | None:
    """Symbol addresses from the table at ``pos`` if they look right (kernel half, ascending)."""
    if pos < 0:
        return None
    if base_pos is None:
        if pos % 8 or pos + 8 * count > len(buf):
            return None
        values = np.frombuffer(buf, dtype="<u8", count=count, offset=pos).astype(np.uint64)
        absolute_percpu = False
    else:
        if pos % 4 or pos + 4 * count > len(buf) or base_pos + 8 > len(buf):
            return None
        base = _u64(buf, base_pos)
        if base < _KERNEL_HALF:
            return None
        offsets = np.frombuffer(buf, dtype="<i4", count=count, offset=pos).astype(np.int64)
        absolute_percpu = bool((offsets < 0).any())
        if absolute_percpu:
            relative = np.uint64(base - 1) + (-offsets).clip(min=0).astype(np.uint64)
            values = np.where(offsets >= 0, offsets.clip(min=0).astype(np.uint64), relative)
        else:
            values = np.uint64(base) + offsets.astype(np.uint32).astype(np.uint64)
    kernel = values >= np.uint64(_KERNEL_HALF)
    if kernel.sum() < count // 2:
        return None
    in_kernel = values[kernel]
    if len(in_kernel) > 1 and not bool((np.diff(in_kernel.astype(np.float64)) >= 0).all()):
        return None
    return values.astype(np.uint64), absolute_percpu
