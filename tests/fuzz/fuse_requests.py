"""Raw FUSE requests for fuzzing CntrFS's decoder (tests/fuzz, shared with the atheris
harness). Layouts from include/uapi/linux/fuse.h: every request starts with the 40-byte
fuse_in_header (len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding); every
reply with the 16-byte fuse_out_header (len, error, unique).
"""

from __future__ import annotations

import struct

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")

FUSE_LOOKUP, FUSE_FORGET, FUSE_OPEN, FUSE_OPENDIR, FUSE_INIT = 1, 2, 14, 27, 26
FUSE_INTERRUPT, FUSE_NOTIFY_REPLY, FUSE_BATCH_FORGET = 36, 41, 42
NO_REPLY = {FUSE_FORGET, FUSE_INTERRUPT, FUSE_NOTIFY_REPLY, FUSE_BATCH_FORGET}

# opcode -> bytes of fixed argument the decoder requires (csrc/fuse/decode.c)
MIN_ARG = {
    1: 0,
    2: 8,
    3: 16,
    4: 88,
    5: 0,
    6: 0,
    8: 16,
    9: 8,
    10: 0,
    11: 0,
    12: 8,
    13: 8,
    14: 8,
    15: 40,
    16: 40,
    17: 0,
    18: 24,
    20: 16,
    21: 8,
    22: 8,
    23: 8,
    24: 0,
    25: 24,
    26: 16,
    27: 8,
    28: 40,
    29: 24,
    30: 16,
    31: 48,
    32: 48,
    33: 48,
    34: 8,
    35: 16,
    36: 8,
    37: 0,
    38: 0,
    39: 0,
    40: 0,
    41: 0,
    42: 8,
    43: 32,
    44: 40,
    45: 16,
    46: 24,
    47: 56,
    48: 0,
    49: 0,
    50: 8,
    51: 16,
    52: 24,
    53: 56,
}
# opcodes whose argument ends in NUL-terminated names
WITH_NAMES = {1, 6, 8, 9, 10, 11, 12, 13, 21, 22, 24, 35, 45}


def request(
    opcode: int,
    arg: bytes = b"",
    *,
    unique: int = 1,
    nodeid: int = 1,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    length: int | None = None,
    extlen: int = 0,
) -> bytes:
    total = IN_HEADER.size + len(arg)
    header = IN_HEADER.pack(
        total if length is None else length, opcode, unique, nodeid, uid, gid, pid, extlen, 0
    )
    return header + arg


def init_request(unique: int = 1) -> bytes:
    # fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
    flags = 0xFFFFFFFF & ~(1 << 31)
    arg = struct.pack("<IIIII", 7, 45, 131072, flags, 0xFFFF) + bytes(44)
    return request(FUSE_INIT, arg, unique=unique, nodeid=0)


def parse_reply(reply: bytes) -> tuple[int, int, int, bytes]:
    """(len, error, unique, payload) of a reply; raises if the reply is malformed."""
    if len(reply) < OUT_HEADER.size:
        raise ValueError(f"reply shorter than a header: {len(reply)}")
    length, error, unique = OUT_HEADER.unpack_from(reply)
    if length != len(reply):
        raise ValueError(f"reply header says {length} bytes, {len(reply)} arrived")
    if error > 0 or error < -4095:
        raise ValueError(f"reply error {error} is not -errno")
    if error and length != OUT_HEADER.size:
        raise ValueError("an error reply carries a payload")
    return length, error, unique, reply[OUT_HEADER.size :]
