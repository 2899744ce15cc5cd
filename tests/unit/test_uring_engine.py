"""The I/O engines against the real kernel: io_uring rings (restricted, single issuer), the
pread/pwrite thread pool and the memory disk share one request format and one behaviour:
data round trips, queue-full hand-back, short transfers continued, LINK/DRAIN semantics,
syscall counting, and the ring's opcode allow-list enforced by the kernel itself."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dvs.lowlevel import uring as u

pytestmark = pytest.mark.timeout(60)

KINDS: list[u.EngineKind] = ["io_uring", "threads", "memdisk"]
IORING_OP_NOP = 0
IORING_OP_READ = 22
IORING_OP_OPENAT = 18
IOSQE_FIXED_FILE = 1


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, np.arange(1 << 18, dtype=np.uint32).tobytes(), 0)  # 1 MiB
    yield fd
    os.close(fd)


def _fill(ios: u.IoArray, op: int, buf: u.Buffer, offsets: np.ndarray, size: int = 4096) -> None:
    n = len(offsets)
    a = ios.np[:n]
    a["opcode"] = op
    a["file"] = 0
    a["len"] = size
    a["offset"] = offsets
    a["addr"] = buf.addr + np.arange(n, dtype=np.uint64) * size
    a["buf"] = 0
    a["user_data"] = np.arange(n) + 1000


@pytest.mark.parametrize("kind", KINDS)
def test_write_then_read_round_trips(kind: u.EngineKind, data_file: int) -> None:
    buf = u.Buffer(64 * 4096)
    with u.Engine(kind, files=[data_file], buffers=[buf], entries=16) as engine:
        rng = np.random.default_rng(1)
        offsets = rng.permutation(256)[:64].astype(np.uint64) * 4096
        payload = rng.integers(0, 256, 64 * 4096, dtype=np.uint8)
        buf.np[: payload.size] = payload
        writes = u.IoArray(64)
        _fill(writes, u.OP_WRITE, buf, offsets)
        done = engine.run(writes)
        assert sorted(done.np["user_data"]) == list(range(1000, 1064))
        assert (done.np["res"] == 4096).all()
        buf.np[:] = 0
        reads = u.IoArray(64)
        _fill(reads, u.OP_READ, buf, offsets)
        done = engine.run(reads)
        assert (done.np["res"] == 4096).all()
        assert np.array_equal(buf.np[: payload.size], payload)
        stats = engine.stats()
        assert stats.completed == 128 and stats.in_flight == 0
        assert stats.bytes_read == stats.bytes_written == 64 * 4096
    if kind != "memdisk":  # the memory disk keeps its data to itself
        assert os.pread(data_file, 4096, int(offsets[0])) == payload[:4096].tobytes()
    buf.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_queue_hands_requests_back(kind: u.EngineKind, data_file: int) -> None:
    buf = u.Buffer(1024 * 4096)
    with u.Engine(kind, files=[data_file], buffers=[buf], entries=8) as engine:
        cap = engine.max_in_flight
        n = cap * 3
        ios = u.IoArray(n)
        _fill(ios, u.OP_READ, buf, (np.arange(n, dtype=np.uint64) % 256) * 4096)
        taken = engine.submit(ios, 0, n)
        assert taken == cap, "exactly the queue's capacity is accepted"
        assert engine.submit(ios, taken, n - taken) == 0
        assert engine.stats().queue_full >= 1
        done = u.DoneArray(n)
        seen: list[int] = []
        while len(seen) < n:
            got = engine.reap(done, min_wait=1)
            seen += done.np["user_data"][:got].tolist()
            assert (done.np["res"][:got] == 4096).all()
            taken += engine.submit(ios, taken, n - taken)
        assert sorted(seen) == list(range(1000, 1000 + n)), "nothing lost, nothing twice"
    buf.close()


@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_a_read_past_the_end_of_file_is_short(kind: u.EngineKind, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "short", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 6000)
    buf = u.Buffer(8192)
    with u.Engine(kind, files=[fd], buffers=[buf]) as engine:
        ios = u.IoArray(1)
        ios.set(0, u.OP_READ, addr=buf.addr, length=8192, buf=0, user_data=7)
        done = engine.run(ios)
        assert done.np["res"][0] == 6000 and done.np["user_data"][0] == 7
        assert bytes(buf.np[:6000]) == b"x" * 6000
    os.close(fd)
    buf.close()


def test_a_short_ring_read_is_continued_until_complete() -> None:
    """A read from a pipe returns what is there; the ring resubmits for the remainder."""
    r, w = os.pipe()
    buf = u.Buffer(4096)
    try:
        with u.Engine("io_uring", files=[r], buffers=[buf]) as engine:
            ios = u.IoArray(1)
            ios.set(0, u.OP_READ, addr=buf.addr, length=4096, buf=0, user_data=1)
            assert engine.submit(ios) == 1
            done = u.DoneArray(1)
            os.write(w, b"a" * 1000)
            deadline = 200
            while engine.stats().requeued == 0 and deadline:
                assert engine.reap(done, min_wait=0) == 0, "no completion for a partial read"
                threading.Event().wait(0.01)
                deadline -= 1
            assert engine.stats().requeued >= 1
            os.write(w, b"b" * 3096)
            assert engine.reap(done, min_wait=1) == 1
            assert done.np["res"][0] == 4096
            assert bytes(buf.np) == b"a" * 1000 + b"b" * 3096
    finally:
        os.close(r)
        os.close(w)
        buf.close()


@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_a_failed_link_cancels_the_rest_of_its_chain(kind: u.EngineKind, tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(b"z" * 8192)
    fd = os.open(path, os.O_RDONLY)
    buf = u.Buffer(8192)
    with u.Engine(kind, files=[fd], buffers=[buf]) as engine:
        ios = u.IoArray(3)
        ios.set(0, u.OP_WRITE, addr=buf.addr, length=4096, buf=0, flags=u.IO_LINK, user_data=1)
        ios.set(1, u.OP_FDATASYNC, flags=u.IO_LINK, user_data=2)
        ios.set(2, u.OP_READ, addr=buf.addr, length=4096, offset=4096, buf=0, user_data=3)
        done = engine.run(ios)
        res = dict(zip(done.np["user_data"].tolist(), done.np["res"].tolist(), strict=True))
        assert res[1] == -errno.EBADF
        assert res[2] == -errno.ECANCELED and res[3] == -errno.ECANCELED
    os.close(fd)
    buf.close()


@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_drain_runs_after_everything_before_it(kind: u.EngineKind, data_file: int) -> None:
    buf = u.Buffer(33 * 4096)
    with u.Engine(kind, files=[data_file], buffers=[buf], entries=64) as engine:
        buf.np[: 32 * 4096] = 0xAB
        ios = u.IoArray(33)
        _fill(ios, u.OP_WRITE, buf, np.arange(32, dtype=np.uint64) * 4096)
        ios.set(32, u.OP_FSYNC, flags=u.IO_DRAIN, user_data=99)
        done = engine.run(ios)
        order = done.np["user_data"].tolist()
        # the drained fsync completes after all 32 writes completed
        assert order.index(99) == 32 or all(r == 4096 for r in done.np["res"][: order.index(99)])
        assert (done.np["res"] >= 0).all()
    assert os.pread(data_file, 4096, 31 * 4096) == b"\xab" * 4096
    buf.close()


def test_the_kernel_enforces_the_ring_opcode_allow_list(data_file: int) -> None:
    with u.Engine("io_uring", files=[data_file]) as engine:
        info = engine.ring_info()
        assert info is not None and info.restricted
        # openat is not on the list; reads must name a registered file
        assert engine.inject_raw(IORING_OP_OPENAT, IOSQE_FIXED_FILE, 0, 1, wait=True) == (
            -errno.EACCES
        )
        assert engine.inject_raw(IORING_OP_READ, 0, data_file, 2, wait=True) == -errno.EACCES
        assert engine.inject_raw(IORING_OP_NOP, IOSQE_FIXED_FILE, 0, 3, wait=True) == 0
    with u.Engine("io_uring", files=[data_file], restrictions=False) as open_engine:
        info = open_engine.ring_info()
        assert info is not None and not info.restricted
        assert open_engine.inject_raw(IORING_OP_NOP, 0, -1, 4, wait=True) == 0


def test_a_completion_naming_no_request_is_dropped_and_counted(data_file: int) -> None:
    with u.Engine("io_uring", files=[data_file]) as engine:
        # slot 5, generation 0xdead: no such request was ever in flight
        engine.inject_raw(IORING_OP_NOP, IOSQE_FIXED_FILE, 0, (0xDEAD << 32) | 5, wait=False)
        done = u.DoneArray(4)
        for _ in range(100):
            assert engine.reap(done, min_wait=0) == 0
            if engine.stats().bogus_completions:
                break
        assert engine.stats().bogus_completions == 1
        assert engine.stats().completed == 0


def test_the_ring_refuses_a_second_issuer_thread(data_file: int) -> None:
    buf = u.Buffer(4096)
    with u.Engine("io_uring", files=[data_file], buffers=[buf]) as engine:
        ios = u.IoArray(1)
        ios.set(0, u.OP_READ, addr=buf.addr, length=4096, buf=0)
        errors: list[BaseException] = []

        def other() -> None:
            try:
                engine.submit(ios)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors and isinstance(errors[0], OSError)
        assert errors[0].errno == errno.EEXIST and "SINGLE_ISSUER" in str(errors[0])
        assert engine.run(ios).np["res"][0] == 4096  # the owner still can
    buf.close()


def test_invalid_requests_are_refused_before_the_kernel_sees_them(data_file: int) -> None:
    buf = u.Buffer(4096)
    with u.Engine("io_uring", files=[data_file], buffers=[buf]) as engine:
        ios = u.IoArray(2)
        ios.set(0, u.OP_READ, file=3, addr=buf.addr, length=4096, buf=0)
        with pytest.raises(OSError) as info:
            engine.submit(ios, 0, 1)
        assert info.value.errno == errno.EINVAL
        # a fixed-buffer request reaching past its registered buffer
        ios.set(0, u.OP_READ, addr=buf.addr + 1, length=4096, buf=0)
        with pytest.raises(OSError):
            engine.submit(ios, 0, 1)
        # a valid request followed by an invalid one: the valid one is taken
        ios.set(0, u.OP_READ, addr=buf.addr, length=4096, buf=0)
        ios.set(1, u.OP_READ, addr=buf.addr, length=4096, buf=9)
        assert engine.submit(ios, 0, 2) == 1
        assert engine.reap(u.DoneArray(1), min_wait=1) == 1
    buf.close()


def test_batched_ring_reads_cost_one_enter_per_batch(data_file: int) -> None:
    buf = u.Buffer(32 * 4096)
    with u.Engine("io_uring", files=[data_file], buffers=[buf], entries=32) as engine:
        ios = u.IoArray(32)
        done = u.DoneArray(64)
        rng = np.random.default_rng(2)
        for _ in range(100):
            _fill(ios, u.OP_READ, buf, rng.integers(0, 256, 32).astype(np.uint64) * 4096)
            assert engine.submit(ios) == 32
            got = 0
            while got < 32:
                got += engine.reap(done, min_wait=32 - got)
        stats = engine.stats()
        assert stats.completed == 3200
        # page-cache reads complete inside the submitting enter: 1 syscall per 32 ops
        assert stats.syscalls == stats.enters
        assert stats.syscalls_per_op <= 0.05, stats


def test_the_thread_pool_counts_a_syscall_per_transfer(data_file: int) -> None:
    buf = u.Buffer(32 * 4096)
    with u.Engine("threads", files=[data_file], buffers=[buf], entries=32) as engine:
        ios = u.IoArray(32)
        _fill(ios, u.OP_READ, buf, np.arange(32, dtype=np.uint64) * 4096)
        for _ in range(10):
            engine.run(ios)
        stats = engine.stats()
        assert stats.worker_syscalls >= 320  # one pread each, plus futex sleeps/wakes
        assert stats.syscalls == stats.worker_syscalls + stats.submitter_syscalls
        assert stats.syscalls_per_op >= 1.0


def test_an_sqpoll_ring_moves_data(data_file: int) -> None:
    buf = u.Buffer(16 * 4096)
    with u.Engine("io_uring", files=[data_file], buffers=[buf], sqpoll=True, sq_idle_ms=10) as e:
        info = e.ring_info()
        assert info is not None and info.setup_flags & 2  # IORING_SETUP_SQPOLL
        ios = u.IoArray(16)
        _fill(ios, u.OP_READ, buf, np.arange(16, dtype=np.uint64) * 4096)
        done = e.run(ios)
        assert (done.np["res"] == 4096).all()
        expected = np.arange(1 << 18, dtype=np.uint32).view(np.uint8)[: 16 * 4096]
        assert np.array_equal(buf.np, expected)
    buf.close()


def test_registered_files_can_be_swapped_when_allowed(data_file: int, tmp_path: Path) -> None:
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(other, b"o" * 4096)
    buf = u.Buffer(4096)
    with u.Engine("io_uring", files=[data_file], buffers=[buf], allow_file_update=True) as engine:
        engine.update_files(0, [other])
        ios = u.IoArray(1)
        ios.set(0, u.OP_READ, addr=buf.addr, length=4096, buf=0)
        assert engine.run(ios).np["res"][0] == 4096
        assert bytes(buf.np) == b"o" * 4096
    with u.Engine("io_uring", files=[data_file]) as locked:
        with pytest.raises(OSError) as info:
            locked.update_files(0, [other])
        assert info.value.errno == errno.EACCES
    os.close(other)
    buf.close()


@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_a_link_chain_is_taken_whole_or_handed_back(kind: u.EngineKind, data_file: int) -> None:
    """The kernel ends a chain at the end of a submission, so a chain must never be split
    across two: when it does not fit, it is handed back whole."""
    buf = u.Buffer(64 * 4096)
    with u.Engine(kind, files=[data_file], buffers=[buf], entries=8) as engine:
        cap = engine.max_in_flight
        single = u.IoArray(cap - 3)
        _fill(single, u.OP_READ, buf, np.zeros(cap - 3, dtype=np.uint64))
        assert engine.submit(single) == cap - 3
        chain = u.IoArray(5)
        _fill(chain, u.OP_READ, buf, np.arange(5, dtype=np.uint64) * 4096)
        chain.np["flags"][:4] = u.IO_LINK
        assert engine.submit(chain) == 0, "five linked requests do not fit in three slots"
        done = u.DoneArray(cap)
        got = 0
        while got < cap - 3:
            got += engine.reap(done, min_wait=1)
        assert engine.submit(chain) == 5
        got = 0
        while got < 5:
            got += engine.reap(done, min_wait=1)
        assert engine.stats().in_flight == 0
    buf.close()
