"""The kernel's own type information (``.BTF``, CONFIG_DEBUG_INFO_BTF), read from guest memory.

BTF (Documentation/bpf/btf.rst) is a compact type graph: a 24-byte header (magic 0xeB9F,
version 1, flags, header length, then offset and length of the type section and of the string
section, both counted from the end of the header), a sequence of variable-length type records,
and NUL-terminated names. Type ids start at 1 (0 is ``void``) in record order. Every record is
``{u32 name_off; u32 info; u32 size_or_type}`` with ``info`` = vlen (bits 0-15), kind (24-28),
kind_flag (31), followed by kind-specific data: members of a struct or union
``{name_off, type, offset}`` where, with kind_flag, the offset is a bit offset in bits 0-23 and
a bitfield size in 24-31 (otherwise the whole word is a bit offset); enum values; array shapes;
and so on. The section sits in read-only data of the image (``__start_BTF``..``__stop_BTF``),
so a guest kernel describes its own struct layouts to us -- no debug package needed.

We parse far enough to answer "where is member ``a.b.c`` of ``struct x``", "how big is
``struct x``" and "what is enumerator ``E``". Untrusted input: every record is bounds-checked,
a record running past the section, an unknown kind or a type cycle raises ``GuestLayoutError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dvs.vm.errors import GuestLayoutError

BTF_MAGIC = 0xEB9F
HEADER = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
"""Magic, version 1, flags 0, header length 24: the search signature."""

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO = (
    8,
    9,
    10,
    11,
    12,
    13,
)
KIND_VAR, KIND_DATASEC, KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = (
    14,
    15,
    16,
    17,
    18,
    19,
)

# Bytes that follow the 12-byte record: (fixed, per vlen item).
_EXTRA: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0),
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
_MAX_DEPTH = 64


def _bad(detail: str) -> GuestLayoutError:
    return GuestLayoutError("the BTF section is well formed", detail)


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


class Btf:
    """A parsed ``.BTF`` section (see the module note)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise _bad(f"{len(data)} bytes is shorter than the header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC or version != 1 or hdr_len < 24 or hdr_len > len(data):
            raise _bad(f"header {data[:8].hex()}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types_start = hdr_len + type_off
        strings_start = hdr_len + str_off
        if types_start + type_len > len(data) or strings_start + str_len > len(data):
            raise _bad("type or string section runs past the data")
        self.data = data
        self.size = max(types_start + type_len, strings_start + str_len)
        self._strings = (strings_start, strings_start + str_len)
        self._offsets: list[int] = [0]  # type id -> record position; id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = types_start, types_start + type_len
        while pos < end:
            if pos + 12 > end:
                raise _bad(f"type record at {pos:#x} is cut off")
            name_off, info, _ = struct.unpack_from("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind not in _EXTRA:
                raise _bad(f"unknown kind {kind} at {pos:#x}")
            fixed, item = _EXTRA[kind]
            self._offsets.append(pos)
            if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_TYPEDEF):
                self._by_name.setdefault((kind, self.string(name_off)), len(self._offsets) - 1)
            pos += 12 + fixed + item * vlen
        if pos != end:
            raise _bad("the last type record runs past the type section")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def string(self, offset: int) -> str:
        lo, hi = self._strings
        start = lo + offset
        if not lo <= start < hi:
            raise _bad(f"string offset {offset:#x} outside the string section")
        end = self.data.find(b"\0", start, hi)
        if end < 0:
            raise _bad(f"string at {offset:#x} is not terminated")
        return self.data[start:end].decode("utf-8", "replace")

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(position, name_off, kind, vlen, size_or_type) of a type."""
        if not 0 < type_id < len(self._offsets):
            raise _bad(f"type id {type_id} does not exist")
        pos = self._offsets[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self.data, pos)
        return pos, name_off, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type

    def kind(self, type_id: int) -> int:
        return self._record(type_id)[2]

    def name(self, type_id: int) -> str:
        return self.string(self._record(type_id)[1])

    def find(self, name: str, kind: int = KIND_STRUCT) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise KeyError(f"no BTF type {name!r} of kind {kind}") from None

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(_MAX_DEPTH):
            if type_id == 0:
                return 0
            _, _, kind, _, target = self._record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        raise _bad(f"typedef/qualifier chain from {type_id} is a cycle")

    def sizeof(self, type_id: int) -> int:
        for _ in range(_MAX_DEPTH):
            type_id = self.resolve(type_id)
            if type_id == 0:
                return 0
            pos, _, kind, _, size_or_type = self._record(type_id)
            if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
                return int(size_or_type)
            if kind == KIND_PTR:
                return 8
            if kind == KIND_ARRAY:
                elem, _, nelems = struct.unpack_from("<III", self.data, pos + 12)
                return self.sizeof(int(elem)) * int(nelems)
            raise _bad(f"type {type_id} of kind {kind} has no size")
        raise _bad("size lookup does not terminate")

    def members(self, type_id: int) -> list[Member]:
        pos, _, kind, vlen, _ = self._record(self.resolve(type_id))
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise _bad(f"type {type_id} is not a struct or union")
        kind_flag = bool(struct.unpack_from("<I", self.data, pos + 4)[0] >> 31)
        out = []
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self.data, pos + 12 + 12 * i)
            if kind_flag:
                out.append(
                    Member(self.string(name_off), member_type, offset & 0xFFFFFF, offset >> 24)
                )
            else:
                out.append(Member(self.string(name_off), member_type, offset, 0))
        return out

    def member(self, type_id: int, path: str) -> Member:
        """Member ``a.b.c`` (anonymous structs and unions are searched through)."""
        bit_offset = 0
        current = type_id
        member: Member | None = None
        for part in path.split("."):
            found = self._find_member(current, part, 0)
            if found is None:
                raise KeyError(
                    f"{self.name(self.resolve(current)) or 'anonymous'} has no member {part!r}"
                )
            member, extra = found
            bit_offset += extra + member.bit_offset
            current = member.type_id
        assert member is not None
        return Member(path, member.type_id, bit_offset, member.bitfield_size)

    def _find_member(self, type_id: int, name: str, depth: int) -> tuple[Member, int] | None:
        if depth > _MAX_DEPTH:
            raise _bad("anonymous member nesting does not terminate")
        for member in self.members(type_id):
            if member.name == name:
                return member, 0
            if not member.name and self.kind(self.resolve(member.type_id)) in (
                KIND_STRUCT,
                KIND_UNION,
            ):
                inner = self._find_member(member.type_id, name, depth + 1)
                if inner is not None:
                    return inner[0], inner[1] + member.bit_offset
        return None

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of member ``path`` in ``struct struct_name``."""
        return self.member(self.find(struct_name), path).offset

    def struct_size(self, struct_name: str) -> int:
        return self.sizeof(self.find(struct_name))

    def enum_value(self, enum_name: str, enumerator: str) -> int:
        type_id = self.find(enum_name, KIND_ENUM)
        pos, _, _, vlen, _ = self._record(type_id)
        for i in range(vlen):
            name_off, value = struct.unpack_from("<Ii", self.data, pos + 12 + 8 * i)
            if self.string(name_off) == enumerator:
                return int(value)
        raise KeyError(f"enum {enum_name} has no {enumerator}")


def find_btf(data: bytes) -> list[int]:
    """Offsets of plausible BTF headers in ``data``."""
    hits = []
    pos = data.find(HEADER)
    while pos >= 0:
        hits.append(pos)
        pos = data.find(HEADER, pos + 1)
    return hits
