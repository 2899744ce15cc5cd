"""Fuzzing CntrFS's request decoder and dispatcher without a mount.

The C server has an entry point that takes one raw request buffer (as read from /dev/fuse)
and returns the reply bytes (dvs_fuse_fuzz_request), served by a private thread against a
real source directory. Hypothesis feeds it random bytes and structurally plausible
requests -- right and wrong lengths, every opcode, forged nodeids and file handles, names
without terminators -- and checks the rules from csrc/fuse/decode.c: the process survives;
every reply is well formed and echoes the request's unique; a length that disagrees with
the header gets EINVAL; opcodes outside the protocol get EINVAL (ENOSYS for protocol
opcodes we do not serve, as the protocol requires); requests without replies (FORGET,
INTERRUPT, ...) never get one; and nothing outside the served directory changes.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_requests import (
    FUSE_LOOKUP,
    FUSE_OPEN,
    FUSE_OPENDIR,
    IN_HEADER,
    MIN_ARG,
    NO_REPLY,
    WITH_NAMES,
    init_request,
    parse_reply,
    request,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.lowlevel import fuse as llfuse

pytestmark = pytest.mark.root  # the served requests switch credentials like a real server


class Fuzzed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.source = root / "src"
        self.source.mkdir()
        (self.source / "file").write_bytes(b"x" * 4096)
        (self.source / "dir").mkdir()
        (self.source / "dir" / "inner").write_text("inner")
        os.symlink("../../outside", self.source / "escape")
        self.outside = root / "outside"
        self.outside.write_text("must not change")
        self.raw = llfuse.RawServer(
            str(self.source), flags=llfuse.NO_DEVICE | llfuse.WANT_PASSTHROUGH
        )
        self.raw.start()
        self.unique = 100
        _, error, _, _ = parse_reply(self.send(init_request()))
        assert error == 0
        self.nodeids = [1, 0, 2, 1 << 32 | 2, 0xFFFFFFFFFFFFFFFF]
        self.fhs = [0, 1, 1 << 32 | 1, 0xFFFFFFFFFFFFFFFF]
        file_node = self.lookup(1, b"file")
        dir_node = self.lookup(1, b"dir")
        self.nodeids += [file_node, dir_node]
        self.fhs.append(self.open(FUSE_OPEN, file_node))
        self.fhs.append(self.open(FUSE_OPENDIR, dir_node))

    def send(self, data: bytes) -> bytes:
        reply = self.raw.fuzz_request(data)
        assert reply is not None
        return reply

    def lookup(self, parent: int, name: bytes) -> int:
        _, error, _, payload = parse_reply(
            self.send(request(FUSE_LOOKUP, name + b"\0", nodeid=parent))
        )
        assert error == 0
        return int(struct.unpack_from("<Q", payload)[0])

    def open(self, opcode: int, node: int) -> int:
        _, error, _, payload = parse_reply(
            self.send(
                request(
                    opcode,
                    struct.pack("<II", os.O_RDWR if opcode == FUSE_OPEN else 0, 0),
                    nodeid=node,
                )
            )
        )
        assert error == 0, error
        return int(struct.unpack_from("<Q", payload)[0])


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    f = Fuzzed(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.raw.stop()
    f.raw.free()
    assert f.outside.read_text() == "must not change"


def check_reply(data: bytes, reply: bytes | None) -> int | None:
    """Common rules; returns the reply's error (None: no reply)."""
    length, opcode, unique = struct.unpack_from("<IIQ", data)
    if reply is None:
        assert opcode in NO_REPLY, f"opcode {opcode} got no reply"
        return None
    _, error, echoed, _ = parse_reply(reply)
    assert echoed == unique
    if length != len(data):
        assert error == -errno.EINVAL
    elif opcode not in MIN_ARG:
        assert error in (-errno.EINVAL, -errno.ENOSYS), (opcode, error)
        if opcode == 0 or opcode >= 64:
            assert error == -errno.EINVAL
    return error


SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(data=st.binary(min_size=0, max_size=400))
def test_random_bytes_never_crash(fuzzed: Fuzzed, data: bytes) -> None:
    try:
        reply = fuzzed.raw.fuzz_request(data)
    except OSError as exc:
        assert exc.errno == errno.EIO and len(data) < IN_HEADER.size
        return
    check_reply(data, reply)


def _arg(draw: st.DrawFn, fuzzed: Fuzzed, opcode: int) -> bytes:
    size = MIN_ARG.get(opcode, 0)
    parts = []
    if size >= 8 and draw(st.booleans()):
        parts.append(struct.pack("<Q", draw(st.sampled_from(fuzzed.fhs))))
        size -= 8
    parts.append(draw(st.binary(min_size=size, max_size=size)))
    if opcode in WITH_NAMES or draw(st.booleans()):
        name = draw(
            st.one_of(
                st.sampled_from([b"file", b"dir", b"escape", b".", b"..", b"", b"a/b", b"x" * 300]),
                st.binary(min_size=1, max_size=40),
            )
        )
        terminated = draw(st.booleans()) or (opcode in WITH_NAMES and draw(st.booleans()))
        parts.append(name + (b"\0" if terminated else b""))
        if draw(st.booleans()):
            parts.append(b"target\0")
    parts.append(draw(st.binary(max_size=64)))
    arg = b"".join(parts)
    if draw(st.integers(0, 4)) == 0:
        arg = arg[: draw(st.integers(0, len(arg)))]  # truncated argument
    return arg


@st.composite
def structured(draw: st.DrawFn, fuzzed: Fuzzed) -> bytes:
    opcode = draw(st.one_of(st.sampled_from(sorted(MIN_ARG)), st.integers(0, 5000)))
    arg = _arg(draw, fuzzed, opcode)
    fuzzed.unique += 1
    length = None
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, (1 << 32) - 1))
    return request(
        opcode,
        arg,
        unique=fuzzed.unique,
        nodeid=draw(st.one_of(st.sampled_from(fuzzed.nodeids), st.integers(0, (1 << 64) - 1))),
        uid=draw(st.sampled_from([0, 1000, 65534, 0xFFFFFFFF])),
        gid=draw(st.sampled_from([0, 1000, 0xFFFFFFFF])),
        pid=draw(st.sampled_from([0, 1, os.getpid(), 0x7FFFFFFF])),
        length=length,
        extlen=draw(st.sampled_from([0, 0, 0, 1, 0xFFFF])),
    )


@SETTINGS
@given(data=st.data())
def test_structured_requests_get_well_formed_replies(fuzzed: Fuzzed, data: st.DataObject) -> None:
    raw = data.draw(structured(fuzzed))
    reply = fuzzed.raw.fuzz_request(raw)
    error = check_reply(raw, reply)
    length, opcode = struct.unpack_from("<II", raw)
    extlen = struct.unpack_from("<H", raw, 36)[0] * 8
    argbytes = len(raw) - IN_HEADER.size - extlen
    if (
        length == len(raw)
        and opcode in MIN_ARG
        and (extlen > len(raw) - IN_HEADER.size or argbytes < MIN_ARG[opcode])
    ):
        if opcode in NO_REPLY:
            assert error is None
        else:
            assert error == -errno.EINVAL


@pytest.mark.parametrize("opcode", sorted(MIN_ARG))
def test_every_opcode_with_short_or_lying_length(fuzzed: Fuzzed, opcode: int) -> None:
    for arg in (b"", b"\0" * max(MIN_ARG[opcode] - 1, 0)):
        raw = request(opcode, arg, unique=7)
        error = check_reply(raw, fuzzed.raw.fuzz_request(raw))
        if MIN_ARG[opcode] > len(arg):
            assert error == (None if opcode in NO_REPLY else -errno.EINVAL)
    lying = request(opcode, b"\0" * 64, unique=8, length=IN_HEADER.size + 200)
    expected = None if opcode in NO_REPLY else -errno.EINVAL
    assert check_reply(lying, fuzzed.raw.fuzz_request(lying)) == expected


def test_server_still_serves_after_fuzzing(fuzzed: Fuzzed) -> None:
    node = fuzzed.lookup(1, b"dir")
    inner = fuzzed.lookup(node, b"inner")
    assert inner != node
    # the symlink leading outside is an entry like any other: it is never followed
    _, error, _, _ = parse_reply(fuzzed.send(request(FUSE_LOOKUP, b"escape\0", nodeid=1)))
    assert error in (0, -errno.ENOENT)
    assert fuzzed.outside.read_text() == "must not change"
