"""The vhost-user back-end against a front-end written here: the real protocol over a real
unix socket with real memfd guest RAM and eventfds, a mock driver in that RAM, and a real
backing file -- everything QEMU does, minus the guest kernel (the integration test has
that). Also every way a front-end can break the protocol: the connection is dropped with the
rule named, and the server accepts the next front-end."""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.lowlevel import ffi
from dvs.lowlevel.guestmem import GuestMemory, Region
from dvs.virtio.reference import (
    BLK_S_OK,
    BLK_T_IN,
    BLK_T_OUT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MockDriver,
    blk_header,
)
from dvs.virtio.server import BlkServer

pytestmark = pytest.mark.timeout(60)

GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE = 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
NEED_REPLY = 1 << 3
PROTOCOL_FEATURES_BIT = 30
PF_REPLY_ACK, PF_CONFIG = 3, 9

RAM = 4 << 20
FRONTEND_VA = 0x7F12_3400_0000  # where the "front-end" claims the RAM is mapped


class FrontEnd:
    """A minimal vhost-user front-end, like QEMU's, on one connection."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = 1) -> None:  # fmt: skip
        message = struct.pack("<III", request, flags, len(payload)) + payload
        socket.send_fds(self.sock, [message], fds or [])

    def recv(self) -> tuple[int, int, bytes]:
        header = self._exactly(12)
        request, flags, size = struct.unpack("<III", header)
        return request, flags, self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the back-end closed the connection")
            data += chunk
        return data

    def call(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        reply, flags, body = self.recv()
        assert reply == request and flags & 0x4  # the reply bit
        return body

    def u64(self, request: int) -> int:
        value: int = struct.unpack("<Q", self.call(request))[0]
        return value

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlkServer]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with BlkServer(image, tmp_path / "vu.sock", device_id="proto-test") as s:
        yield s


@pytest.fixture
def ram() -> Iterator[tuple[int, GuestMemory]]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM)
    mapping = mmap.mmap(fd, RAM)
    view = ffi.from_buffer(mapping)
    mem = GuestMemory([Region(0, RAM, int(ffi.cast("uintptr_t", view)))])
    yield fd, mem
    del view, mem
    mapping.close()
    os.close(fd)


def _negotiate(fe: FrontEnd) -> int:
    features = fe.u64(GET_FEATURES)
    assert features >> PROTOCOL_FEATURES_BIT & 1 and features >> 32 & 1
    fe.send(SET_FEATURES, struct.pack("<Q", features))
    protocol = fe.u64(GET_PROTOCOL_FEATURES)
    assert protocol >> PF_CONFIG & 1 and protocol >> PF_REPLY_ACK & 1
    fe.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol))
    fe.send(SET_OWNER)
    return features


def _start_queue(fe: FrontEnd, ram_fd: int, driver: MockDriver) -> tuple[int, int, int]:
    region = struct.pack("<QQQQ", 0, RAM, FRONTEND_VA, 0)
    fe.send(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, [ram_fd], flags=1 | NEED_REPLY)
    assert struct.unpack("<Q", fe.recv()[2])[0] == 0  # REPLY_ACK: success
    fe.send(SET_VRING_NUM, struct.pack("<II", 0, driver.size))
    fe.send(SET_VRING_BASE, struct.pack("<II", 0, 0))
    ua = {k: FRONTEND_VA + getattr(driver, k) for k in ("desc", "used", "avail")}
    fe.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, ua["desc"], ua["used"], ua["avail"], 0))
    kick, call, err = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(3))
    fe.send(SET_VRING_CALL, struct.pack("<Q", 0), [call])
    fe.send(SET_VRING_ERR, struct.pack("<Q", 0), [err])
    fe.send(SET_VRING_KICK, struct.pack("<Q", 0), [kick])
    fe.send(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
    return kick, call, err


def _wait(fd: int, timeout: float = 10) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_frontend_drives_requests_through_shared_memory(
    server: BlkServer, ram: tuple[int, GuestMemory], tmp_path: Path
) -> None:
    ram_fd, mem = ram
    fe = FrontEnd(server.socket_path)
    _negotiate(fe)
    assert fe.u64(GET_QUEUE_NUM) == 1
    config = fe.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
    assert struct.unpack_from("<Q", config, 12)[0] == (4 << 20) // 512  # capacity

    driver = MockDriver(mem, size=64, base=0x10000, span=2 << 20)
    kick, call, err = _start_queue(fe, ram_fd, driver)
    data = os.urandom(4096)
    # like a driver: the read is sent once the write has completed (the device may run
    # requests in any order)
    write = driver.add([blk_header(BLK_T_OUT, 8), data], [1])
    os.eventfd_write(kick, 1)
    assert _wait(call), "no interrupt from the back-end"
    assert [u.id for u in driver.reap()] == [write.head]
    os.eventfd_read(call)
    read = driver.add([blk_header(BLK_T_IN, 8)], [4096, 1], indirect=True)
    os.eventfd_write(kick, 1)
    assert _wait(call), "no interrupt from the back-end"
    used = {u.id: u.length for u in driver.reap()}
    assert driver.read_writable(write) == bytes([BLK_S_OK])
    assert driver.read_writable(read) == data + bytes([BLK_S_OK]) and used[read.head] == 4097
    assert (tmp_path / "disk.img").read_bytes()[8 * 512 : 8 * 512 + 4096] == data

    base = fe.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
    assert struct.unpack("<II", base) == (0, 2)  # stopped; resume from avail index 2
    assert not _wait(err, 0)
    stats = server.stats()
    assert stats.vhost.requests == 2 and stats.vhost.protocol_error is None
    fe.close()
    for fd in (kick, call, err):
        os.close(fd)


def test_a_broken_ring_is_reported_on_the_error_fd(
    server: BlkServer, ram: tuple[int, GuestMemory]
) -> None:
    ram_fd, mem = ram
    fe = FrontEnd(server.socket_path)
    _negotiate(fe)
    driver = MockDriver(mem, size=16, base=0x10000, span=1 << 20)
    kick, call, err = _start_queue(fe, ram_fd, driver)
    buf = driver.alloc(32)
    driver.write_desc(0, buf, 16, DESC_F_NEXT, 1)
    driver.write_desc(1, buf, 16, DESC_F_NEXT | DESC_F_WRITE, 1)  # points at itself
    driver.put_avail(0, 0)
    driver.set_avail_idx(1)
    os.eventfd_write(kick, 1)
    assert _wait(err), "the broken ring was not signalled"
    stats = server.stats()
    assert stats.vhost.broken_queue == 0
    assert stats.vhost.queue_rule == "descriptor chain longer than the queue size (loop)"
    # the connection itself stays up: the front-end may reset the device
    assert fe.u64(GET_QUEUE_NUM) == 1
    fe.close()
    for fd in (kick, call, err):
        os.close(fd)


def _region(gpa: int, size: int, va: int = FRONTEND_VA) -> bytes:
    return struct.pack("<QQQQ", gpa, size, va, 0)


@pytest.mark.parametrize(
    ("message", "rule"),
    [
        (lambda fd: (GET_FEATURES, b"", [], 2), "message flags do not carry protocol version 1"),
        (lambda fd: (SET_FEATURES, b"\0" * 4, [], 1), "payload size wrong for the request"),
        (lambda fd: (SET_FEATURES, b"\xff" * 8, [], 1),
         "features set that the back-end did not offer"),
        (lambda fd: (SET_VRING_NUM, struct.pack("<II", 7, 64), [], 1),
         "queue index beyond the device's queues"),
        (lambda fd: (SET_VRING_KICK, struct.pack("<Q", 0), [], 1),
         "wrong number of file descriptors for the request"),
        (lambda fd: (SET_MEM_TABLE, struct.pack("<II", 1, 0) + _region(0, RAM), [], 1),
         "wrong number of file descriptors for the request"),
        (lambda fd: (SET_MEM_TABLE, struct.pack("<II", 2, 0) + _region(0, RAM) + _region(4096, RAM),
                     [fd, fd], 1), "invalid memory region table"),
        (lambda fd: (SET_MEM_TABLE, struct.pack("<II", 9, 0) + _region(0, RAM) * 9, [fd], 1),
         "payload size wrong for the request"),
        (lambda fd: (GET_CONFIG, struct.pack("<III", 250, 60, 0) + bytes(60), [], 1),
         "config space access out of range"),
        (lambda fd: (SET_VRING_BASE, struct.pack("<II", 0, 70000), [], 1),
         "split-ring base above 65535"),
        (lambda fd: (5000, b"\0" * 5000, [], 1), "payload size wrong for the request"),
    ],
    ids=[
        "version", "short-payload", "unoffered-features", "queue-index", "kick-without-fd",
        "table-without-fd", "overlapping-regions", "too-many-regions", "config-range",
        "vring-base", "huge-payload",
    ],
)  # fmt: skip
def test_protocol_violations_drop_the_connection_and_the_server_carries_on(
    server: BlkServer, ram: tuple[int, GuestMemory], message: object, rule: str
) -> None:
    ram_fd, _ = ram
    fe = FrontEnd(server.socket_path)
    request, payload, fds, flags = message(ram_fd)  # type: ignore[operator]
    fe.send(request, payload, fds, flags=flags)
    assert fe.closed_by_peer()
    fe.close()
    next_frontend = FrontEnd(server.socket_path)
    assert next_frontend.u64(GET_QUEUE_NUM) == 1  # served again
    next_frontend.close()
    assert server.stats().protocol_errors[-1] == rule


def test_two_queues_are_offered_and_served_independently(
    tmp_path: Path, ram: tuple[int, GuestMemory]
) -> None:
    ram_fd, mem = ram
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with BlkServer(image, tmp_path / "mq.sock", num_queues=2) as server:
        fe = FrontEnd(server.socket_path)
        features = _negotiate(fe)
        assert features >> 12 & 1  # VIRTIO_BLK_F_MQ
        assert fe.u64(GET_QUEUE_NUM) == 2
        config = fe.call(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
        assert struct.unpack_from("<H", config, 12 + 34)[0] == 2  # num_queues
        drivers = [
            MockDriver(mem, size=16, base=0x10000 + i * 0x100000, span=0x80000) for i in (0, 1)
        ]
        region = struct.pack("<QQQQ", 0, RAM, FRONTEND_VA, 0)
        fe.send(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, [ram_fd])
        fds = []
        for index, driver in enumerate(drivers):
            fe.send(SET_VRING_NUM, struct.pack("<II", index, driver.size))
            fe.send(SET_VRING_BASE, struct.pack("<II", index, 0))
            ua = [FRONTEND_VA + getattr(driver, k) for k in ("desc", "used", "avail")]
            fe.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, *ua, 0))
            kick, call = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
            fe.send(SET_VRING_CALL, struct.pack("<Q", index), [call])
            fe.send(SET_VRING_KICK, struct.pack("<Q", index), [kick])
            fe.send(SET_VRING_ENABLE, struct.pack("<II", index, 1), flags=1 | NEED_REPLY)
            assert struct.unpack("<Q", fe.recv()[2])[0] == 0  # started before we go on
            fds += [kick, call]
        subs = [d.add([blk_header(BLK_T_IN, i)], [512, 1]) for i, d in enumerate(drivers)]
        os.eventfd_write(fds[2], 1)  # kick queue 1 only
        assert _wait(fds[3])
        assert [u.id for u in drivers[1].reap()] == [subs[1].head]
        assert drivers[0].reap() == []  # queue 0 was not kicked and has not been served
        os.eventfd_write(fds[0], 1)
        assert _wait(fds[1])
        assert [u.id for u in drivers[0].reap()] == [subs[0].head]
        fe.close()
        for fd in fds:
            os.close(fd)


def test_a_poll_window_serves_requests_the_driver_did_not_kick_for(
    tmp_path: Path, ram: tuple[int, GuestMemory]
) -> None:
    """With polling on, the device keeps watching the ring after it ran empty (here: from
    the moment the queue starts): with EVENT_IDX the driver sees no need to kick
    (avail_event stays behind), and is served all the same."""
    ram_fd, mem = ram
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with BlkServer(image, tmp_path / "poll.sock", engine="sync", poll_us=3_000_000) as server:
        fe = FrontEnd(server.socket_path)
        _negotiate(fe)
        driver = MockDriver(mem, size=16, base=0x10000, span=1 << 20)
        kick, call, err = _start_queue(fe, ram_fd, driver)
        first = driver.add([blk_header(BLK_T_IN, 0)], [512, 1])  # no kick
        assert _wait(call), "the polling device did not serve the un-kicked request"
        assert [u.id for u in driver.reap()] == [first.head]
        os.eventfd_read(call)
        old = driver.avail_idx
        second = driver.add([blk_header(BLK_T_IN, 1)], [512, 1])
        assert not driver.needs_kick(old)  # the device is polling: no kick wanted
        assert _wait(call), "the polling device did not serve the un-kicked request"
        assert [u.id for u in driver.reap()] == [second.head]
        stats = server.stats().vhost
        assert stats.kicks == 0 and stats.requests == 2 and stats.polled >= 1
        fe.close()
        for fd in (kick, call, err):
            os.close(fd)
