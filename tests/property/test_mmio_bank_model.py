"""Property test: the C loop serving trapped MMIO (dvs_hv_mmio_serve) behaves like a plain
Python model of a register bank for any sequence of accesses, including lengths a guest cannot
produce, addresses outside or straddling the window, and short messages.

Semantics relied on: one SOCK_SEQPACKET message per access (struct dvs_hv_mmio_msg); a read is
answered on the same socket with the same seq; bytes are little-endian as the guest sees them;
anything not entirely inside [base, base+size) reads as all-ones and is never stored.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.lowlevel.ptrace import MmioBank

MSG = struct.Struct("<QQQIIii")  # struct dvs_hv_mmio_msg
BASE = 0xC000_0000
SIZE = 64

access = st.tuples(
    st.booleans(),  # is_write
    st.integers(BASE - 16, BASE + SIZE + 16),  # gpa
    st.sampled_from([0, 1, 2, 4, 8, 9, 16]),  # len (0, 9, 16 are malformed)
    st.integers(0, (1 << 64) - 1),  # data
)


class Model:
    def __init__(self) -> None:
        self.bytes = bytearray(SIZE)
        self.outside = 0

    def access(self, is_write: bool, gpa: int, length: int, data: int) -> int | None:
        if length == 0 or length > 8:
            self.outside += 1
            return None  # dropped, no answer
        offset = gpa - BASE
        inside = 0 <= offset and offset + length <= SIZE
        if not inside:
            self.outside += 1
        if is_write:
            if inside:
                self.bytes[offset : offset + length] = data.to_bytes(8, "little")[:length]
            return None
        if not inside:
            return (1 << 64) - 1
        return int.from_bytes(self.bytes[offset : offset + length], "little")


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(access, max_size=40), st.booleans())
def test_serve_loop_matches_the_model(
    accesses: list[tuple[bool, int, int, int]], junk: bool
) -> None:
    guardian_end, dvs_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop = os.eventfd(0, os.EFD_CLOEXEC)
    bank = MmioBank(BASE, SIZE)
    model = Model()
    server = threading.Thread(target=bank.serve, args=(dvs_end.fileno(), stop))
    server.start()
    try:
        guardian_end.settimeout(10)
        if junk:
            guardian_end.send(b"\x01\x02\x03")  # a short message: counted, ignored
            model.outside += 1
        for seq, (is_write, gpa, length, data) in enumerate(accesses, 1):
            expected = model.access(is_write, gpa, length, data)
            guardian_end.send(MSG.pack(seq, gpa, data, length, int(is_write), 1, 0))
            if expected is not None:
                reply = MSG.unpack(guardian_end.recv(MSG.size))
                assert reply[0] == seq
                assert reply[2] == expected
        # a final read synchronises: every earlier message has been handled
        guardian_end.send(MSG.pack(10_000, BASE, 0, 1, 0, 1, 0))
        assert MSG.unpack(guardian_end.recv(MSG.size))[0] == 10_000
        assert bytes(bank.view) == bytes(model.bytes)
        assert bank.outside == model.outside
    finally:
        os.eventfd_write(stop, 1)
        server.join(timeout=10)
        os.close(stop)
        guardian_end.close()
        dvs_end.close()
