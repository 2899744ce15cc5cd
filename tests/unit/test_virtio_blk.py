"""virtio-blk requests against a real backing file, submitted by the mock driver the way a
guest's virtio_blk would: the device answers with a status byte and the file shows what
happened. Malformed requests get an error status (and are counted by rule); only queue
rules stop the device."""

from __future__ import annotations

import hashlib
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import BLK_ENGINES, BlkDevice, BlkEngine, VirtQueue, VirtqueueBroken
from dvs.testing.remote_memory import forked_guest_memory
from dvs.virtio.reference import (
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_S_UNSUPP,
    BLK_T_DISCARD,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    BLK_T_WRITE_ZEROES,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MockDriver,
    Submitted,
    blk_header,
    blk_range,
)

pytestmark = pytest.mark.timeout(120)

DISK = 8 << 20


class Rig:
    """A guest (mock driver + local memory), one request queue, a device on a file."""

    def __init__(
        self,
        path: Path,
        engine: BlkEngine,
        *,
        read_only: bool = False,
        mem: GuestMemory | None = None,
    ) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.device = BlkDevice(
            self.fd, read_only=read_only, device_id=b"dvs-test-disk", engine=engine, depth=8
        )
        self.mem = mem if mem is not None else GuestMemory.local(16 << 20)
        self.driver = MockDriver(self.mem, size=128, span=12 << 20)
        self.queue = VirtQueue(self.mem, **self.driver.layout, max_segs=self.device.max_segs)

    def close(self) -> None:
        self.device.close()
        os.close(self.fd)

    def submit(self, readable: list[bytes], writable: list[int], **kw: bool) -> Submitted:
        return self.driver.add(readable, writable, **kw)

    def run(self, *subs: Submitted) -> list[tuple[int, bytes]]:
        """Serve the queue until every request came back (asynchronous engines complete from
        poll); return (used length, writable bytes) per submitted request."""
        target = (self.driver.last_used + len(subs)) & 0xFFFF
        for _ in range(1000):
            result = self.device.process(self.queue)
            assert not result.more
            if self.driver.used_idx() == target:
                break
            self.device.poll(wait=True)
        used = {u.id: u.length for u in self.driver.reap()}
        assert len(used) == len(subs)
        return [(used[s.head], self.driver.read_writable(s)) for s in subs]

    def request(
        self, rtype: int, sector: int = 0, data: bytes = b"", read: int = 0
    ) -> tuple[int, bytes]:
        sub = self.submit(
            [blk_header(rtype, sector), *([data] if data else [])], [*([read] if read else []), 1]
        )
        _, out = self.run(sub)[0]
        return out[-1], out[:-1]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK))
    return path


@pytest.fixture(params=BLK_ENGINES)
def engine(request: pytest.FixtureRequest) -> BlkEngine:
    value: BlkEngine = request.param
    return value


@pytest.fixture
def rig(disk: Path, engine: BlkEngine) -> Iterator[Rig]:
    r = Rig(disk, engine)
    yield r
    r.close()


def test_config_space_and_features_describe_the_file(rig: Rig) -> None:
    assert rig.device.capacity_sectors == DISK // 512
    cfg = rig.device.config_space()
    assert int.from_bytes(cfg[0:8], "little") == DISK // 512
    assert int.from_bytes(cfg[12:16], "little") == rig.device.max_segs - 2  # seg_max
    features = rig.device.features
    for bit in (32, 28, 29, 9, 13, 14):  # VERSION_1 INDIRECT EVENT_IDX FLUSH DISCARD WZ
        assert features >> bit & 1
    assert not features >> 5 & 1  # not read-only


def test_write_then_read_back_through_the_file(rig: Rig, disk: Path) -> None:
    data = os.urandom(8192)
    status, _ = rig.request(BLK_T_OUT, sector=10, data=data)
    assert status == BLK_S_OK
    with open(disk, "rb") as f:
        f.seek(10 * 512)
        assert f.read(8192) == data
    status, got = rig.request(BLK_T_IN, sector=10, read=8192)
    assert status == BLK_S_OK and got == data
    assert rig.request(BLK_T_FLUSH)[0] == BLK_S_OK
    stats = rig.device.stats()
    assert (stats.reads, stats.writes, stats.flushes) == (1, 1, 1)
    assert stats.bytes_read == stats.bytes_written == 8192 and stats.errors == 0


def test_a_read_lands_in_many_scattered_buffers_with_a_split_header(rig: Rig, disk: Path) -> None:
    header = blk_header(BLK_T_IN, sector=3)
    sub = rig.submit([header[:5], header[5:11], header[11:]], [512, 1000, 24, 1], indirect=True)
    ((used_len, out),) = rig.run(sub)
    assert used_len == 1537 and out[-1] == BLK_S_OK
    assert out[:-1] == disk.read_bytes()[3 * 512 : 3 * 512 + 1536]


def test_many_requests_in_one_pass(rig: Rig, disk: Path) -> None:
    original = disk.read_bytes()
    subs = [rig.submit([blk_header(BLK_T_IN, s * 8)], [4096, 1]) for s in range(40)]
    answers = rig.run(*subs)
    for s, (used_len, out) in enumerate(answers):
        assert used_len == 4097 and out[-1] == BLK_S_OK
        assert out[:-1] == original[s * 4096 : (s + 1) * 4096]


def test_get_id_answers_the_configured_serial(rig: Rig) -> None:
    status, data = rig.request(BLK_T_GET_ID, read=20)
    assert status == BLK_S_OK and data == b"dvs-test-disk".ljust(20, b"\0")


def test_discard_and_write_zeroes_read_back_as_zeroes(rig: Rig, disk: Path) -> None:
    ranges = blk_range(0, 256) + blk_range(1024, 8)  # 128 KiB from 0, 4 KiB from sector 1024
    assert rig.request(BLK_T_DISCARD, data=ranges)[0] == BLK_S_OK
    content = disk.read_bytes()
    assert content[: 256 * 512] == bytes(256 * 512)
    assert content[1024 * 512 : 1032 * 512] == bytes(4096)
    assert content[256 * 512 : 257 * 512] != bytes(512)
    for flags in (0, 1):  # with and without "may unmap"
        assert (
            rig.request(BLK_T_WRITE_ZEROES, data=blk_range(2000 + flags * 100, 16, flags))[0]
            == BLK_S_OK
        )
        start = (2000 + flags * 100) * 512
        assert disk.read_bytes()[start : start + 8192] == bytes(8192)
    assert disk.stat().st_size == DISK
    assert rig.device.stats().discards == 1 and rig.device.stats().write_zeroes == 2


@pytest.mark.parametrize(
    ("request_parts", "writable", "status", "rule"),
    [
        (
            [blk_header(BLK_T_IN, 0)],
            [100, 1],
            BLK_S_IOERR,
            "data length is not a multiple of 512 bytes",
        ),
        (
            [blk_header(BLK_T_IN, DISK // 512 - 1)],
            [1024, 1],
            BLK_S_IOERR,
            "sector range ends beyond the capacity",
        ),
        (
            [blk_header(BLK_T_IN, 2**64 - 1)],
            [512, 1],
            BLK_S_IOERR,
            "sector range ends beyond the capacity",
        ),
        (
            [blk_header(BLK_T_OUT, 0), b"x" * 512],
            [512, 1],
            BLK_S_IOERR,
            "data buffers have the wrong direction for the type",
        ),
        (
            [blk_header(BLK_T_IN, 0), b"x" * 512],
            [512, 1],
            BLK_S_IOERR,
            "data buffers have the wrong direction for the type",
        ),
        ([blk_header(99, 0)], [1], BLK_S_UNSUPP, "unsupported request type"),
        ([b"short"], [1], BLK_S_IOERR, "fewer than 16 device-readable header bytes"),
        ([blk_header(BLK_T_GET_ID)], [8, 1], BLK_S_IOERR, "GET_ID data is not 20 bytes"),
        (
            [blk_header(BLK_T_DISCARD), b"x" * 20],
            [1],
            BLK_S_IOERR,
            "range data is not a positive multiple of 16 bytes",
        ),
        (
            [blk_header(BLK_T_DISCARD), blk_range(0, 8, 1)],
            [1],
            BLK_S_UNSUPP,
            "unmap flag set on a discard range",
        ),
        (
            [blk_header(BLK_T_WRITE_ZEROES), blk_range(0, 8, 6)],
            [1],
            BLK_S_UNSUPP,
            "reserved range flag bits set",
        ),
        (
            [blk_header(BLK_T_DISCARD), blk_range(DISK // 512 - 4, 8)],
            [1],
            BLK_S_IOERR,
            "sector range ends beyond the capacity",
        ),
        (
            [blk_header(BLK_T_DISCARD), blk_range(0, 1 << 30)],
            [1],
            BLK_S_IOERR,
            "range longer than the device's sector limit",
        ),
        (
            [blk_header(BLK_T_DISCARD), blk_range(0, 1) * 17],
            [1],
            BLK_S_IOERR,
            "more ranges than the device's segment limit",
        ),
    ],
)
def test_malformed_requests_get_an_error_status_and_the_disk_is_untouched(
    rig: Rig, disk: Path, request_parts: list[bytes], writable: list[int], status: int, rule: str
) -> None:
    before = hashlib.sha256(disk.read_bytes()).digest()
    sub = rig.submit(request_parts, writable)
    ((_, out),) = rig.run(sub)
    assert out[-1] == status
    assert rig.device.stats().request_rules == {rule: 1}
    assert hashlib.sha256(disk.read_bytes()).digest() == before
    # the queue keeps working after a bad request
    assert rig.request(BLK_T_GET_ID, read=20)[0] == BLK_S_OK


def test_a_request_without_room_for_a_status_is_returned_with_length_zero(rig: Rig) -> None:
    sub = rig.submit([blk_header(BLK_T_FLUSH)], [])
    ((used_len, _),) = rig.run(sub)
    assert used_len == 0
    assert rig.device.stats().request_rules == {"no device-writable byte for the status": 1}


def test_a_read_only_device_refuses_writes_and_serves_reads(disk: Path, engine: BlkEngine) -> None:
    before = disk.read_bytes()
    rig = Rig(disk, engine, read_only=True)
    try:
        assert rig.device.features >> 5 & 1
        assert not rig.device.features >> 13 & 1  # no discard offered
        assert rig.request(BLK_T_OUT, 0, data=b"\0" * 512)[0] == BLK_S_IOERR
        assert rig.request(BLK_T_WRITE_ZEROES, data=blk_range(0, 8))[0] == BLK_S_IOERR
        status, data = rig.request(BLK_T_IN, 0, read=512)
        assert status == BLK_S_OK and data == before[:512]
        assert rig.request(BLK_T_FLUSH)[0] == BLK_S_OK
        assert rig.device.stats().request_rules == {"write to a read-only device": 2}
    finally:
        rig.close()
    assert disk.read_bytes() == before


def test_a_backend_failure_is_an_ioerr_not_a_crash(disk: Path) -> None:
    """The device believes it may write, but the fd is read-only: pwritev fails with EBADF."""
    fd = os.open(disk, os.O_RDONLY)
    mem = GuestMemory.local(16 << 20)
    try:
        device = BlkDevice(fd)
        driver = MockDriver(mem, size=16)
        queue = VirtQueue(mem, **driver.layout)
        sub = driver.add([blk_header(BLK_T_OUT, 0), b"y" * 512], [1])
        device.process(queue)
        assert driver.read_writable(sub) == bytes([BLK_S_IOERR])
        assert device.stats().request_rules == {"the backing store failed the operation": 1}
    finally:
        os.close(fd)


def test_a_queue_rule_stops_the_device_queue(rig: Rig) -> None:
    good = rig.submit([blk_header(BLK_T_GET_ID)], [20, 1])
    d = rig.driver
    buf = d.alloc(16)
    d.write_desc(100, buf, 16, DESC_F_WRITE | DESC_F_NEXT, 101)
    d.write_desc(101, buf, 1, DESC_F_WRITE | DESC_F_NEXT, 100)  # a loop
    d.put_avail(d.avail_idx, 100)
    d.set_avail_idx(d.avail_idx + 1)
    with pytest.raises(VirtqueueBroken) as info:
        rig.device.process(rig.queue)
    assert "loop" in str(info.value)
    assert rig.queue.needs_reset
    assert [u.id for u in d.reap()] == [good.head]  # what came before was served
    with pytest.raises(VirtqueueBroken):
        rig.device.process(rig.queue)


def test_requests_in_another_process_memory_go_through_the_bounce_buffer(
    disk: Path, engine: BlkEngine
) -> None:
    with forked_guest_memory(16 << 20) as remote:
        rig = Rig(disk, engine, mem=remote)
        try:
            data = os.urandom(64 << 10)
            assert rig.request(BLK_T_OUT, 64, data=data)[0] == BLK_S_OK
            assert disk.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data
            status, got = rig.request(BLK_T_IN, 64, read=len(data))
            assert status == BLK_S_OK and got == data
            assert rig.request(BLK_T_GET_ID, read=20)[1].startswith(b"dvs-test-disk")
        finally:
            rig.close()


def test_asynchronous_completion_hands_requests_back_when_the_backend_is_full(disk: Path) -> None:
    """The completion model of an asynchronous engine: the backend takes two operations at a
    time and completes them later from poll(); the device defers the rest and retries."""
    fd = os.open(disk, os.O_RDWR)
    mem = GuestMemory.local(16 << 20)
    try:
        device = BlkDevice(fd, engine="deferred", depth=2)
        driver = MockDriver(mem, size=32, span=12 << 20)
        queue = VirtQueue(mem, **driver.layout, max_segs=device.max_segs)
        payloads = [os.urandom(4096) for _ in range(3)]
        subs = [
            driver.add([blk_header(BLK_T_OUT, 100 + 8 * i), p], [1]) for i, p in enumerate(payloads)
        ]
        ranges = blk_range(0, 8) + blk_range(16, 8) + blk_range(32, 8)
        subs.append(driver.add([blk_header(BLK_T_DISCARD), ranges], [1]))
        subs += [driver.add([blk_header(BLK_T_IN, 100 + 8 * i)], [4096, 1]) for i in range(3)]

        first = device.process(queue)
        assert first.stalled and first.completed == 0  # accepted two, handed the third back
        assert device.stats().deferred >= 1
        done = 0
        for _ in range(50):
            done += device.poll()
            result = device.process(queue)
            if not result.stalled and device.stats().in_flight == 0:
                break
        else:
            pytest.fail("the deferred requests never completed")
        assert driver.used_idx() == len(subs)
        assert queue.should_notify()
        statuses = [driver.read_writable(s)[-1] for s in subs]
        assert statuses == [BLK_S_OK] * len(subs)
        for i, p in enumerate(payloads):
            assert driver.read_writable(subs[4 + i])[:-1] == p
        content = disk.read_bytes()
        for sector in (0, 16, 32):  # all three ranges of the discard ran
            assert content[sector * 512 : (sector + 8) * 512] == bytes(4096)
        assert device.poll(wait=True) == 0  # nothing left in flight
    finally:
        os.close(fd)


def test_the_io_uring_engine_completes_through_the_ring_fd(disk: Path) -> None:
    """Requests go to the shared ring and come back when its fd turns readable."""
    fd = os.open(disk, os.O_RDWR)
    mem = GuestMemory.local(16 << 20)
    try:
        device = BlkDevice(fd, engine="io_uring", depth=16, ring_writes=True)
        assert device.engine == "io_uring" and device.event_fd >= 0
        driver = MockDriver(mem, size=64, span=12 << 20)
        queue = VirtQueue(mem, **driver.layout, max_segs=device.max_segs)
        data = os.urandom(64 << 10)
        # 40 pieces (scattered 4 KiB + 512-byte buffers) against a 32-entry completion queue:
        # some requests must wait for others to complete
        writes = [
            driver.add(
                [
                    blk_header(BLK_T_OUT, 128 * i),
                    *[data[j : j + 4096] for j in range(0, 16384, 4096)],
                ],
                [1],
                scatter=True,
            )
            for i in range(10)
        ]
        first = device.process(queue)
        assert first.completed == 0  # nothing completes inside process: it all went to the ring
        for _ in range(100):
            if driver.used_idx() == len(writes):
                break
            select.select([device.event_fd], [], [], 5)
            device.poll()
            device.process(queue)
        assert driver.used_idx() == len(writes)
        assert device.stats().deferred > 0  # the ring was full once and requests waited
        assert all(driver.read_writable(w) == bytes([BLK_S_OK]) for w in writes)
        content = disk.read_bytes()
        assert all(
            content[128 * i * 512 : 128 * i * 512 + 16384] == data[:16384] for i in range(10)
        )
    finally:
        os.close(fd)
