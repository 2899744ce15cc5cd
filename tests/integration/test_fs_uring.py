"""CntrFS over FUSE-over-io_uring (Linux 6.14+): requests really arrive in ring entries,
the transport is chosen as asked (``uring=auto|on|off``), and when the ring cannot be used
the server falls back to /dev/fuse read/write and logs why.

The kernel offers FUSE_OVER_IO_URING only while the host-global fuse parameter
``enable_uring`` is Y; these tests mount with ``-o enable_uring`` (the server holds the knob
at Y around its own INIT and restores it) so they do not depend on the host's setting. The
fault-injection flag TEST_URING_BAD_QID makes the server register its entries for a queue
that does not exist: the kernel refuses them, clears the connection's ring flag and queues
everything on /dev/fuse again -- the real fallback path of a refused registration.
Killing the server while a caller waits over the ring is in test_fs_robustness; the
differential conformance suite runs on both transports (test_fs_conformance).
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.errors import KernelLacksFeature
from dvs.fs.server import URING_KNOB, URING_KNOB_LOCK, CntrFs, MountOptions
from dvs.lowlevel import fuse as llfuse
from dvs.probe import ProbeReport
from dvs.testing.fs import cntrfs_mount, world_tempdir

pytestmark = [pytest.mark.root, pytest.mark.fuse]


@pytest.fixture(autouse=True)
def _needs_uring(host: ProbeReport) -> None:
    if host.fuse.over_io_uring == "absent":
        pytest.skip(f"the kernel has no FUSE over io_uring (probe: {host.fuse.error or 'absent'})")


def _dev_requests(before: llfuse.Stats, after: llfuse.Stats) -> int:
    return (after.requests - after.ring_requests) - (before.requests - before.ring_requests)


def _opcount(before: llfuse.Stats, after: llfuse.Stats, *names: str) -> int:
    return sum(after.by_opcode.get(n, 0) - before.by_opcode.get(n, 0) for n in names)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_requests_travel_through_the_ring(options: str) -> None:
    with cntrfs_mount(f"uring=on,enable_uring,{options}") as m:
        negotiated = m.fs.negotiated
        assert negotiated is not None and negotiated.transport == "uring"
        assert negotiated.granted_flags >> 41 & 1  # FUSE_OVER_IO_URING granted at INIT
        assert negotiated.ring_queues == os.cpu_count() or negotiated.ring_queues >= 1
        assert negotiated.ring_entries >= negotiated.ring_queues
        payload = os.urandom(3 << 20)
        (m.source / "big").write_bytes(payload)  # not in the mount's page cache
        before = m.fs.stats()
        assert before.ring_threads == negotiated.ring_threads >= 1
        for i in range(40):
            path = m.mountpoint / f"f{i}"
            path.write_bytes(b"x%d" % i)
            assert path.read_bytes() == b"x%d" % i
            assert path.stat().st_size == len(b"x%d" % i)
        assert sorted(os.listdir(m.mountpoint)) == sorted(["big", *(f"f{i}" for i in range(40))])
        assert (m.mountpoint / "big").read_bytes() == payload
        with open(m.mountpoint / "w", "wb") as f:  # through the daemon without passthrough
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert (m.source / "w").read_bytes() == payload
        for i in range(40):
            os.unlink(m.mountpoint / f"f{i}")
        after = m.fs.stats()
        served = after.ring_requests - before.ring_requests
        assert _opcount(before, after, "CREATE") == 41
        assert _opcount(before, after, "UNLINK") == 40
        assert served >= 41 + 40 + 1  # creates, unlinks, the readdir at least
        # /dev/fuse only brings what the kernel never puts on the ring: FORGET, INTERRUPT
        assert _dev_requests(before, after) <= _opcount(
            before, after, "FORGET", "BATCH_FORGET", "INTERRUPT"
        )
        assert after.ring_commit_errors == 0
        if "nopassthrough" in options:
            # data went through ring entries: READ replies built in place, WRITE payloads
            assert after.bytes_read - before.bytes_read >= len(payload)
            assert after.bytes_written - before.bytes_written >= len(payload)


@pytest.mark.timeout(60)
def test_uring_off_reads_the_device() -> None:
    with cntrfs_mount("uring=off,enable_uring") as m:
        assert m.fs.negotiated is not None and m.fs.negotiated.transport == "dev"
        (m.mountpoint / "a").write_text("a")
        assert (m.mountpoint / "a").read_text() == "a"
        st = m.fs.stats()
        assert st.ring_requests == 0 and st.ring_threads == 0 and st.requests > 3


@pytest.mark.timeout(60)
def test_refused_ring_registration_falls_back_to_the_device(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dvs.fs")
    with world_tempdir("dvs-uring-src-") as src, world_tempdir("dvs-uring-mnt-") as mnt:
        (src / "f").write_text("served anyway")
        opts = MountOptions.parse("uring=auto,enable_uring")
        with CntrFs(src, opts, extra_flags=llfuse.TEST_URING_BAD_QID) as fs:
            fs.mount(mnt)
            assert fs.negotiated is not None and fs.negotiated.transport == "dev"
            assert (mnt / "f").read_text() == "served anyway"
            (mnt / "g").write_text("new")
            st = fs.stats()
            assert st.ring_requests == 0 and st.requests > 3
        assert "registering entries failed (Invalid argument)" in caplog.text
        assert not os.path.ismount(mnt)
        # uring=on refuses to mount over /dev/fuse, naming the reason
        with CntrFs(
            src, MountOptions.parse("uring=on,enable_uring"), extra_flags=llfuse.TEST_URING_BAD_QID
        ) as fs:
            with pytest.raises(KernelLacksFeature, match="registering entries failed"):
                fs.mount(mnt)
        assert not os.path.ismount(mnt)


@pytest.fixture
def knob_off() -> Iterator[str]:
    """The host's enable_uring knob at N for the test, restored afterwards (under the lock
    dvs mounts with ``enable_uring`` take, so none of them restores a stale value)."""
    lock = os.open(URING_KNOB_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = Path(URING_KNOB).read_text().strip()
        Path(URING_KNOB).write_text("N")
        try:
            yield before
        finally:
            Path(URING_KNOB).write_text(before)
    finally:
        os.close(lock)


@pytest.mark.timeout(60)
def test_knob_off_auto_falls_back_with_the_reason_and_on_refuses(
    knob_off: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dvs.fs")
    with cntrfs_mount("uring=auto") as m:
        assert m.fs.negotiated is not None and m.fs.negotiated.transport == "dev"
        (m.mountpoint / "a").write_text("a")
        assert m.fs.stats().ring_requests == 0
    assert "does not offer OVER_IO_URING" in caplog.text and "it is N" in caplog.text
    with pytest.raises(KernelLacksFeature, match="io_uring"):
        with cntrfs_mount("uring=on"):
            pass
    assert Path(URING_KNOB).read_text().strip() == "N"


@pytest.mark.timeout(60)
def test_enable_uring_sets_the_knob_for_this_init_only() -> None:
    before = Path(URING_KNOB).read_text().strip()
    lock = os.open(URING_KNOB_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        Path(URING_KNOB).write_text("N")
        fcntl.flock(lock, fcntl.LOCK_UN)  # the mount takes the lock itself
        with cntrfs_mount("uring=on,enable_uring") as m:
            assert m.fs.negotiated is not None and m.fs.negotiated.transport == "uring"
            assert Path(URING_KNOB).read_text().strip() == "N"  # restored right after INIT
            (m.mountpoint / "a").write_text("over the ring")
            assert (m.source / "a").read_text() == "over the ring"
            assert m.fs.stats().ring_requests > 0
    finally:
        Path(URING_KNOB).write_text(before)
        os.close(lock)


_WAITER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("acquired", flush=True)
"""


@pytest.mark.timeout(90)
def test_lock_waits_park_their_entries_and_the_ring_keeps_serving() -> None:
    """More SETLKW waiters than ring entries: each parks its entry (a replacement entry is
    registered), other requests are still answered, and every waiter gets the lock."""
    with cntrfs_mount("uring=on,enable_uring,ring_depth=1") as m:
        assert m.fs.negotiated is not None and m.fs.negotiated.transport == "uring"
        entries = m.fs.negotiated.ring_entries
        (m.source / "f").write_bytes(bytes(10))
        holder = os.open(m.source / "f", os.O_RDWR)  # the backing file: conflicts through
        fcntl.lockf(holder, fcntl.LOCK_EX)
        waiters: list[subprocess.Popen[str]] = []
        try:
            for _ in range(entries + 2):
                proc = subprocess.Popen(
                    [sys.executable, "-c", _WAITER, str(m.mountpoint / "f")],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                waiters.append(proc)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "waiting"
            deadline = time.monotonic() + 20
            while m.fs.stats().blocked_locks < len(waiters) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert m.fs.stats().blocked_locks == len(waiters)
            before = m.fs.stats().ring_requests
            for i in range(20):  # served while every waiter holds a parked entry
                (m.mountpoint / f"g{i}").write_text("still served")
                assert (m.mountpoint / f"g{i}").read_text() == "still served"
            assert m.fs.stats().ring_requests - before >= 20
            fcntl.lockf(holder, fcntl.LOCK_UN)
            for proc in waiters:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "acquired"
                assert proc.wait(timeout=20) == 0
            assert m.fs.stats().ring_commit_errors == 0
        finally:
            os.close(holder)
            for proc in waiters:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
