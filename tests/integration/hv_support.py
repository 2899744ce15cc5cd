"""Shared checks for the hypervisor-mechanics tests: what a process looks like from /proc
(fd table, memory map, tracer of each thread), and waiting for the guardian to let go.

Semantics relied on: ``TracerPid`` in /proc/PID/task/TID/status is the tracer's pid, 0 when
untraced; a traced thread stopped by its tracer shows state ``t (tracing stop)``. The fd table
is compared by number and link target, the memory map line by line (addresses, permissions,
offsets and paths), which is what "unchanged" means for the hypervisor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def task_ids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def task_field(pid: int, tid: int, field: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):  # the thread exited (before or mid-read)
        return ""
    return ""


def tracer_pids(pid: int) -> dict[int, int]:
    """TracerPid of every thread (kernel worker threads included)."""
    out = {}
    for tid in task_ids(pid):
        value = task_field(pid, tid, "TracerPid")
        if value:
            out[tid] = int(value)
    return out


def user_threads(pid: int) -> list[int]:
    """Threads that run user code (not PF_USER_WORKER kernel workers)."""
    tids = []
    for tid in task_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):  # the thread exited
            continue
        flags = int(stat[stat.rindex(")") + 2 :].split()[6])
        if not flags & 0x4000:
            tids.append(tid)
    return tids


def wait_untraced(pid: int, timeout: float = 20.0) -> None:
    """Wait until no thread of ``pid`` is traced any more."""
    deadline = time.monotonic() + timeout
    while True:
        traced = {tid: tracer for tid, tracer in tracer_pids(pid).items() if tracer}
        if not traced:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"threads of {pid} still traced after {timeout} s: {traced}")
        time.sleep(0.01)


def wait_gone(pid: int, timeout: float = 20.0) -> None:
    """Wait until ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still alive (state {state}) after {timeout} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class ProcessSnapshot:
    fds: dict[int, str]
    maps: tuple[str, ...]

    @classmethod
    def take(cls, pid: int) -> ProcessSnapshot:
        fds = {}
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
            except (FileNotFoundError, ProcessLookupError):  # gone, or going
                continue
        with open(f"/proc/{pid}/maps") as f:
            maps = tuple(line.rstrip("\n") for line in f)
        return cls(fds, maps)

    def differences(self, other: ProcessSnapshot) -> list[str]:
        out = []
        for fd in sorted(set(self.fds) | set(other.fds)):
            if self.fds.get(fd) != other.fds.get(fd):
                out.append(f"fd {fd}: {self.fds.get(fd)} -> {other.fds.get(fd)}")
        before, after = set(self.maps), set(other.maps)
        out += [f"mapping gone: {line}" for line in sorted(before - after)]
        out += [f"mapping new: {line}" for line in sorted(after - before)]
        return out


def assert_restored(pid: int, before: ProcessSnapshot) -> None:
    """The fd table and memory map of ``pid`` are what they were in ``before``."""
    differences = before.differences(ProcessSnapshot.take(pid))
    assert not differences, "process not restored:\n  " + "\n  ".join(differences)
