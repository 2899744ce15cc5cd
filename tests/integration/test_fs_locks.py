"""Locks through CntrFS are real locks on the backing file.

POSIX (fcntl) locks are forwarded to OFD locks on a descriptor private to each lock owner,
flock() locks to the open file's own descriptor -- so they conflict with locks that other
processes take on the backing file directly (CNTR kept them local to the mount). A
blocked F_SETLKW waits on a server thread of its own, and a signal to the waiter (FUSE
INTERRUPT) ends the wait; a SIGKILLed waiter never hangs in the kernel.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvs.testing.fs import cntrfs_mount

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
kind = sys.argv[2]
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
print("locked", flush=True)
sys.stdin.readline()
"""

WAITER = """
import fcntl, os, signal, sys, time
class Interrupted(Exception):
    pass
def interrupted(*args):
    raise Interrupted  # Python retries EINTR itself (PEP 475) unless the handler raises
signal.signal(signal.SIGUSR1, interrupted)
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
start = time.monotonic()
try:
    if sys.argv[2] == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
    print("acquired", round(time.monotonic() - start, 2), flush=True)
except Interrupted:
    print("interrupted", round(time.monotonic() - start, 2), flush=True)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _try_lock(path: Path, kind: str) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["posix", "flock"])
@pytest.mark.parametrize("holder_side", ["mount", "backing"])
def test_locks_conflict_across_the_mount_and_the_backing_file(kind: str, holder_side: str) -> None:
    with cntrfs_mount() as m:
        (m.source / "db").write_bytes(bytes(4096))
        here = m.mountpoint / "db" if holder_side == "mount" else m.source / "db"
        there = m.source / "db" if holder_side == "mount" else m.mountpoint / "db"
        holder = _spawn(HOLDER, str(here), kind)
        try:
            assert _line(holder) == "locked"
            assert not _try_lock(there, kind)
            assert not _try_lock(here, kind)
        finally:
            holder.communicate("\n", timeout=10)
        assert _try_lock(there, kind)


def test_getlk_names_the_holder_through_the_mount() -> None:
    with cntrfs_mount() as m:
        path = m.mountpoint / "f"
        path.write_bytes(bytes(100))
        holder = _spawn(HOLDER, str(path), "posix")
        try:
            assert _line(holder) == "locked"
            fd = os.open(path, os.O_RDWR)
            try:
                probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
                kind, _, start, length, pid = struct.unpack(
                    "hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe)
                )
            finally:
                os.close(fd)
        finally:
            holder.communicate("\n", timeout=10)
        assert kind == fcntl.F_WRLCK
        assert (start, length) == (0, 100)
        assert pid == holder.pid


def test_closing_any_descriptor_drops_the_owners_posix_locks() -> None:
    """POSIX: close() of any fd of the file releases the process's locks (FUSE FLUSH)."""
    code = """
import fcntl, os, sys
a = os.open(sys.argv[1], os.O_RDWR)
b = os.open(sys.argv[1], os.O_RDONLY)
fcntl.lockf(a, fcntl.LOCK_EX, 10, 0)
print("locked", flush=True); sys.stdin.readline()
os.close(b)
print("closed", flush=True); sys.stdin.readline()
"""
    with cntrfs_mount() as m:
        path = m.mountpoint / "f"
        path.write_bytes(bytes(100))
        proc = _spawn(code, str(path))
        try:
            assert _line(proc) == "locked"
            assert not _try_lock(m.source / "f", "posix")
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert _line(proc) == "closed"
            assert _try_lock(m.source / "f", "posix")
        finally:
            proc.communicate("\n", timeout=10)


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_blocked_waiter_gets_the_lock_when_released(kind: str) -> None:
    with cntrfs_mount() as m:
        path = m.mountpoint / "f"
        path.write_bytes(bytes(4096))
        holder = _spawn(HOLDER, str(m.source / "f"), kind)
        assert _line(holder) == "locked"
        waiter = _spawn(WAITER, str(path), kind)
        try:
            assert _line(waiter) == "waiting"
            time.sleep(0.3)
            assert waiter.poll() is None
            if kind == "posix":
                assert m.fs.stats().blocked_locks == 1
            holder.communicate("\n", timeout=10)
            assert _line(waiter).startswith("acquired")
        finally:
            waiter.kill()
            waiter.wait(timeout=10)
            holder.kill()
            holder.wait(timeout=10)
        deadline = time.monotonic() + 5
        while m.fs.stats().blocked_locks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.fs.stats().blocked_locks == 0


@pytest.mark.parametrize("how", ["signal", "sigkill"])
def test_interrupted_waiter_does_not_hang(how: str) -> None:
    with cntrfs_mount() as m:
        path = m.mountpoint / "f"
        path.write_bytes(bytes(4096))
        holder = _spawn(HOLDER, str(m.source / "f"), "posix")
        assert _line(holder) == "locked"
        waiter = _spawn(WAITER, str(path), "posix")
        try:
            assert _line(waiter) == "waiting"
            time.sleep(0.3)
            start = time.monotonic()
            if how == "signal":
                waiter.send_signal(signal.SIGUSR1)  # the wait ends with EINTR
                assert _line(waiter).startswith("interrupted")
            else:
                waiter.kill()
            waiter.wait(timeout=10)
            assert time.monotonic() - start < 5
            assert m.fs.stats().interrupts >= 1
            deadline = time.monotonic() + 5
            while m.fs.stats().blocked_locks and time.monotonic() < deadline:
                time.sleep(0.05)
            assert m.fs.stats().blocked_locks == 0
        finally:
            waiter.kill()
            holder.communicate("\n", timeout=10)
