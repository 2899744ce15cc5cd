"""atheris harness for CntrFS's request decoder (the long-running companion of
test_fuse_decoder.py, which runs in CI with hypothesis).

    pip install '.[fuzz]'
    python3 tests/fuzz/atheris_fuse_decoder.py -runs=200000 [corpus_dir]

Every input becomes one raw FUSE request -- either the bytes as they are, or a well-formed
header around fuzzed opcode, nodeid, ids and argument -- served by a CntrFS server without a
mount (dvs_fuse_fuzz_request) over a scratch directory. A crash, a malformed reply, a reply
that does not echo the request's unique, or any change outside the scratch directory is a
finding. Run as root: the server switches credentials per request like a mounted one.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from fuse_requests import IN_HEADER, MIN_ARG, NO_REPLY, init_request, parse_reply

from dvs.lowlevel import fuse as llfuse

TOP = Path(tempfile.mkdtemp(prefix="dvs-atheris-"))
SOURCE = TOP / "src"
OUTSIDE = TOP / "outside"


def make_server() -> llfuse.RawServer:
    SOURCE.mkdir()
    (SOURCE / "file").write_bytes(b"x" * 8192)
    (SOURCE / "dir").mkdir()
    os.symlink("../outside", SOURCE / "escape")
    OUTSIDE.write_text("must not change")
    raw = llfuse.RawServer(str(SOURCE), flags=llfuse.NO_DEVICE | llfuse.WANT_PASSTHROUGH)
    raw.start()
    reply = raw.fuzz_request(init_request())
    assert reply is not None and parse_reply(reply)[1] == 0
    return raw


SERVER = make_server()
OPCODES = sorted(MIN_ARG)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    else:
        opcode = (
            OPCODES[fdp.ConsumeIntInRange(0, len(OPCODES) - 1)]
            if fdp.ConsumeBool()
            else fdp.ConsumeIntInRange(0, 1 << 16)
        )
        nodeid = 1 if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        arg = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        length = IN_HEADER.size + len(arg)
        if fdp.ConsumeIntInRange(0, 7) == 0:
            length = fdp.ConsumeIntInRange(0, (1 << 32) - 1)
        raw = (
            IN_HEADER.pack(
                length,
                opcode,
                fdp.ConsumeIntInRange(0, (1 << 64) - 1),
                nodeid,
                fdp.ConsumeIntInRange(0, (1 << 32) - 1),
                fdp.ConsumeIntInRange(0, (1 << 32) - 1),
                fdp.ConsumeIntInRange(0, 1 << 22),
                fdp.ConsumeIntInRange(0, 3),
                0,
            )
            + arg
        )
    try:
        reply = SERVER.fuzz_request(raw)
    except OSError as exc:
        if exc.errno == errno.EIO and len(raw) < IN_HEADER.size:
            return
        raise
    if reply is None:
        opcode = struct.unpack_from("<I", raw, 4)[0]
        if opcode not in NO_REPLY:
            raise AssertionError(f"opcode {opcode} got no reply")
        return
    _, _, unique, _ = parse_reply(reply)
    if unique != struct.unpack_from("<Q", raw, 8)[0]:
        raise AssertionError("reply does not echo the request's unique")
    if OUTSIDE.read_text() != "must not change":
        raise AssertionError("a request changed a file outside the served directory")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
