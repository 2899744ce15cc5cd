"""The exported-symbol tables ``__ksymtab`` and ``__ksymtab_gpl`` read from the kernel image.

``EXPORT_SYMBOL`` puts one ``struct kernel_symbol`` per export into ``__ksymtab`` (or
``__ksymtab_gpl``), and the name into ``__ksymtab_strings``. The linker script sorts each
table by symbol name (the module loader bisects it). Entry formats over the kernel's history:

* ``prel32-ns`` (5.4+ with CONFIG_HAVE_ARCH_PREL32_RELOCATIONS, e.g. x86-64):
  ``{s32 value_offset; s32 name_offset; s32 namespace_offset}``, 12 bytes;
* ``prel32`` (4.19-5.3): ``{s32 value_offset; s32 name_offset}``, 8 bytes;
* ``abs-ns`` (5.4+ without PREL32): ``{u64 value; u64 name; u64 namespace}``, 24 bytes;
* ``abs`` (before 4.19): ``{u64 value; u64 name}``, 16 bytes.

A PREL32 field holds ``target - address_of_the_field`` as a signed 32-bit number, so
``target = field_address + offset`` computed modulo 2**64. Offsets are negative for text before
the table and *positive* for data after it (``system_wq``) and for per-CPU exports, whose
targets are small section offsets near 0 (``0 - 0xffffffff82...`` fits in 31 bits). VMSH
subtracts positive offsets and gets exactly those wrong; here the arithmetic is one signed add.

Two ways in: ``parse_table`` reads a table whose bounds kallsyms gave
(``__start___ksymtab``...), and ``scan`` finds the tables with no symbols at all, as the longest
run of entries whose name fields point at NUL-preceded identifiers, split where the name order
restarts (``__ksymtab`` then ``__ksymtab_gpl``). The two must agree; tests check that.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dvs.vm.errors import GuestLayoutError

FORMATS: dict[str, tuple[int, bool]] = {
    # name: (entry size, PREL32 fields)
    "prel32-ns": (12, True),
    "prel32": (8, True),
    "abs-ns": (24, False),
    "abs": (16, False),
}

_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_.$]{0,511}\0")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ExportedSymbol:
    name: str
    value: int
    namespace: str
    gpl: bool


@dataclass(frozen=True)
class Ksymtab:
    format: str
    symbols: tuple[ExportedSymbol, ...]
    table_va: int
    """``__start___ksymtab``."""
    gpl_table_va: int
    """``__start___ksymtab_gpl``."""
    count: int
    gpl_count: int

    def lookup(self, name: str) -> int:
        for sym in self.symbols:
            if sym.name == name:
                return sym.value
        raise KeyError(name)

    def as_dict(self) -> dict[str, int]:
        return {s.name: s.value for s in self.symbols}


def _string_at(data: bytes, offset: int) -> bytes | None:
    # No check of the byte before: the linker merges string tails, so "PageMovable" may be
    # the end of "__ClearPageMovable".
    if not 0 < offset < len(data):
        return None
    match = _IDENT.match(data, offset)
    return match.group()[:-1] if match else None


def _cstring(data: bytes, offset: int) -> bytes | None:
    if not 0 <= offset < len(data):
        return None
    end = data.find(b"\0", offset, offset + 512)
    return None if end < 0 else data[offset:end]


def _entry(data: bytes, base_va: int, pos: int, fmt: str) -> tuple[bytes, int, bytes] | None:
    """Decode one entry at byte ``pos`` of ``data`` (the image at ``base_va``)."""
    size, prel = FORMATS[fmt]
    if pos < 0 or pos + size > len(data):
        return None
    if prel:
        fields = [
            int.from_bytes(data[pos + 4 * i : pos + 4 * i + 4], "little", signed=True)
            for i in range(size // 4)
        ]
        targets = [(base_va + pos + 4 * i + f) & _MASK64 for i, f in enumerate(fields)]
    else:
        targets = [
            int.from_bytes(data[pos + 8 * i : pos + 8 * i + 8], "little") for i in range(size // 8)
        ]
    name = _string_at(data, targets[1] - base_va)
    if name is None:
        return None
    namespace = b""
    if len(targets) == 3:
        ns = _cstring(data, targets[2] - base_va)
        if ns is None:
            return None
        namespace = ns
    return name, targets[0], namespace


def parse_table(
    data: bytes, base_va: int, start_va: int, stop_va: int, *, gpl: bool, fmt: str | None = None
) -> tuple[str, list[ExportedSymbol]]:
    """Decode ``[start_va, stop_va)`` of the image; the format is detected if not given."""
    length = stop_va - start_va
    if length < 0 or start_va < base_va or stop_va > base_va + len(data):
        raise GuestLayoutError(
            "ksymtab lies inside the kernel image", f"{start_va:#x}..{stop_va:#x}"
        )
    formats = [fmt] if fmt else list(FORMATS)
    for candidate in formats:
        size, _ = FORMATS[candidate]
        if length % size:
            continue
        symbols = []
        for pos in range(start_va - base_va, stop_va - base_va, size):
            entry = _entry(data, base_va, pos, candidate)
            if entry is None:
                break
            name, value, ns = entry
            symbols.append(ExportedSymbol(name.decode(), value, ns.decode("ascii", "replace"), gpl))
        else:
            if _sorted(symbols):
                return candidate, symbols
    raise GuestLayoutError("ksymtab entries decode", f"no format fits {start_va:#x}..{stop_va:#x}")


def _sorted(symbols: list[ExportedSymbol]) -> bool:
    names = [s.name.encode() for s in symbols]
    return all(a <= b for a, b in itertools.pairwise(names))


def from_kallsyms(data: bytes, base_va: int, lookup: dict[str, int]) -> Ksymtab:
    """Both tables from their ``__start_``/``__stop_`` symbols (``lookup`` maps names to VAs)."""
    try:
        bounds = [
            lookup[n]
            for n in (
                "__start___ksymtab",
                "__stop___ksymtab",
                "__start___ksymtab_gpl",
                "__stop___ksymtab_gpl",
            )
        ]
    except KeyError as exc:
        raise GuestLayoutError("kallsyms names the ksymtab bounds", f"missing {exc}") from None
    fmt, plain = parse_table(data, base_va, bounds[0], bounds[1], gpl=False)
    _, gpl = parse_table(data, base_va, bounds[2], bounds[3], gpl=True, fmt=fmt)
    return Ksymtab(fmt, tuple(plain + gpl), bounds[0], bounds[2], len(plain), len(gpl))


def _name_ok_mask(data: bytes) -> npt.NDArray[np.bool_]:
    """``mask[t]``: an identifier character that can start a name is at byte ``t``.

    No condition on the byte before: merged string tails and names placed outside
    ``__ksymtab_strings`` (seen for ``phys_base``) follow arbitrary bytes.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    ident_start = np.zeros(256, dtype=bool)
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_":
        ident_start[c] = True
    return ident_start[raw]


def scan(data: bytes, base_va: int, *, min_entries: int = 64) -> Ksymtab:
    """Find both tables by structure alone (see the module note)."""
    mask = _name_ok_mask(data)
    n = len(data)
    best: tuple[int, str, int] | None = None  # (entries, format, start byte)
    for fmt, (size, prel) in FORMATS.items():
        if prel:
            words = np.frombuffer(data, dtype="<i4", count=n // 4).astype(np.int64)
            pos = np.arange(len(words), dtype=np.int64) * 4
            target = pos + words  # name field at word i: target = 4*i + offset (relative to base)
        else:
            words_u = np.frombuffer(data, dtype="<u8", count=n // 8)
            target = (words_u - np.uint64(base_va)).view(np.int64)
        valid = (target > 0) & (target < n)
        ok = np.zeros(len(target), dtype=bool)
        ok[valid] = mask[target[valid]]
        unit = 4 if prel else 8
        stride = size // unit
        # entry k at field-unit index j has its name at j+1; look at each phase separately.
        for phase in range(stride):
            names = ok[phase + 1 :: stride]
            run = _longest_run(names)
            if run is None:
                continue
            length, first = run
            if best is None or length > best[0]:
                best = (length, fmt, (phase + first * stride) * unit)
    if best is None or best[0] < min_entries:
        raise GuestLayoutError("the image holds a ksymtab", "no run of exported-symbol entries")
    count, fmt, start = best
    size, _ = FORMATS[fmt]
    entries = []
    for k in range(count):
        entry = _entry(data, base_va, start + k * size, fmt)
        if entry is None:
            break
        entries.append(entry)
    # The tables are each sorted: the first drop in name order starts __ksymtab_gpl.
    split = next(
        (i for i in range(1, len(entries)) if entries[i][0] < entries[i - 1][0]), len(entries)
    )
    symbols = [
        ExportedSymbol(name.decode(), value, ns.decode("ascii", "replace"), i >= split)
        for i, (name, value, ns) in enumerate(entries)
    ]
    return Ksymtab(
        fmt,
        tuple(symbols),
        base_va + start,
        base_va + start + split * size,
        split,
        len(symbols) - split,
    )


def _longest_run(flags: npt.NDArray[np.bool_]) -> tuple[int, int] | None:
    if not flags.any():
        return None
    padded = np.concatenate([[False], flags, [False]])
    edges = np.diff(padded.astype(np.int8))
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0]
    lengths = ends - starts
    i = int(np.argmax(lengths))
    return int(lengths[i]), int(starts[i])
