"""Helpers for the container attach tests: run the CLI, snapshot what must not change.

"Leaves nothing behind" is checked from the host's side: the mount tables of the host and
of the container (every line of /proc/PID/mountinfo), the processes in the container's pid
namespace, the processes anywhere that carry a marker in their command line, and the
default base directory on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLI_TIMEOUT = 60.0


def dvs(
    *args: str,
    input: bytes | None = None,
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m dvs container ARGS`` with captured output (stdin: ``input`` or null)."""
    return subprocess.run(
        [sys.executable, "-m", "dvs", "container", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=env,
        user=user,
    )


def text(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def mountinfo_lines(pid: int | str) -> set[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return set(f.read().splitlines())


#: where an attach mounts things in its private namespace; a leak into the host's
#: namespace would show up on one of these (other engineers' tests mount elsewhere)
ATTACH_MOUNT_POINTS = ("/", "/var", "/var/lib", "/proc", "/dev", "/sys", "/etc")


def host_mounts_of_interest(base_dir: str = "/var/lib/cntr") -> set[str]:
    """Host mountinfo lines on the places an attach mounts over (see ATTACH_MOUNT_POINTS)."""
    keep = set()
    for line in mountinfo_lines("self"):
        mount_point = line.split()[4]
        if (
            mount_point in ATTACH_MOUNT_POINTS
            or mount_point.startswith("/etc/")
            or mount_point == base_dir
            or mount_point.startswith(base_dir + "/")
        ):
            keep.add(line)
    return keep


def pid_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def alive_pids_in_ns(ns: str) -> set[int]:
    """Pids (host numbering) of live, non-zombie processes in pid namespace ``ns``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") != ns:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found.add(int(name))
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def settled_pids_in_ns(ns: str, timeout: float = 30.0) -> set[int]:
    """``alive_pids_in_ns`` once the container is at rest: the test containers' idle init
    (``dvs-idle``, a shell loop) forks before it execs its ``sleep``, so right after a
    start, or when the sleep ends, a second ``dvs-idle`` shows for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        first = alive_pids_in_ns(ns)
        comms = [_comm(p) for p in first]
        forking = comms.count("dvs-idle") > 1 or ("dvs-idle" in comms and "sleep" not in comms)
        time.sleep(0.02)
        if (not forking and alive_pids_in_ns(ns) == first) or time.monotonic() > deadline:
            return first


def alive_with_cmdline(marker: bytes) -> set[int]:
    """Live processes whose command line contains ``marker`` (NULs read as spaces)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state not in (b"Z", b"X"):
            found.add(int(name))
    return found


def children_of(pid: int) -> set[int]:
    kids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return kids


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@dataclass
class Snapshot:
    """What must be the same before and after an attach."""

    host_mounts: set[str]
    container_mounts: set[str]
    container_pids: set[int]
    base_dir_exists: bool

    @classmethod
    def take(cls, container_pid: int, base_dir: str = "/var/lib/cntr") -> Snapshot:
        return cls(
            host_mounts_of_interest(base_dir),
            mountinfo_lines(container_pid),
            settled_pids_in_ns(pid_ns(container_pid)),
            os.path.lexists(base_dir),
        )


def wait_until_clean(
    before: Snapshot,
    container_pid: int,
    gone: Sequence[int] = (),
    marker: bytes | None = None,
    timeout: float = 10.0,
) -> Snapshot:
    """Wait until the state is back to ``before``; return the last snapshot either way."""
    deadline = time.monotonic() + timeout
    while True:
        now = Snapshot.take(container_pid)
        clean = (
            now == before
            and not any(is_alive(p) for p in gone)
            and not (marker and alive_with_cmdline(marker))
        )
        if clean or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def require(host: object, *tools: str) -> None:
    """Skip (with the probe's word for it) unless every engine tool is installed."""
    import pytest

    missing = [t for t in tools if not host.has_tool(t)]  # type: ignore[attr-defined]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (dvs probe)")
