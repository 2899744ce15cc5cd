"""Detaching leaves nothing behind -- also when dvs is killed with SIGKILL mid-attach.

What is checked after every detach: the host's mount table on the places an attach
mounts over, the container's whole mount table, the processes in the container's pid
namespace, every process carrying the command's marker, the helper processes dvs had
forked, and that the default base directory was not created on the host.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from attach_helpers import (
    Snapshot,
    alive_with_cmdline,
    children_of,
    dvs,
    is_alive,
    require,
    wait_until_clean,
)

from dvs.container import AttachFailed, Session
from dvs.probe import ProbeReport
from dvs.testing.containers import OciContainer, run_container

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _runc_installed(host: ProbeReport) -> None:
    require(host, "runc")


@pytest.fixture(scope="module")
def box() -> Iterator[OciContainer]:
    with run_container("runc", userns=True) as container:  # the harder case: idmapped view
        yield container


def spawn_cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dvs", "container", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def sleep_command(number: int) -> list[str]:
    """``sleep NUMBER`` whose number does not appear in dvs's own command line."""
    return ["sh", "-c", f"exec sleep $(({number} - 1 + 1))"]


def helpers_of(pid: int) -> set[int]:
    """The keeper (and, through it, the command) forked by a dvs process."""
    kids = children_of(pid)
    return kids | {g for k in kids for g in children_of(k)}


# fractions of one attach's duration at which dvs is killed: during interpreter start,
# resolution, the keeper's set-up and after the command runs
KILL_POINTS = (0.3, 0.6, 0.8, 0.9, 1.0, 1.1, 1.3)


def test_sigkill_of_dvs_mid_attach_leaves_no_mount_and_no_process(box: OciContainer) -> None:
    before = Snapshot.take(box.pid)
    # how long one attach takes here, to spread the kills over it
    start = time.monotonic()
    assert dvs("attach", box.id, "--", "true").returncode == 0
    duration = time.monotonic() - start
    assert wait_until_clean(before, box.pid) == before

    for i, fraction in enumerate(KILL_POINTS):
        marker = f"sleep {7700 + i}"
        cli = spawn_cli("attach", box.id, "--", *sleep_command(7700 + i))
        helpers: set[int] = set()
        deadline = time.monotonic() + duration * fraction
        while time.monotonic() < deadline:
            helpers |= helpers_of(cli.pid)
            time.sleep(0.002)
        helpers |= helpers_of(cli.pid)
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        after = wait_until_clean(before, box.pid, gone=sorted(helpers), marker=marker.encode())
        assert after == before, f"kill at {fraction:.0%} of an attach left state behind"
        assert not alive_with_cmdline(marker.encode()), f"kill at {fraction:.0%}: {marker}"
        assert not [p for p in helpers if is_alive(p)], f"kill at {fraction:.0%}: helpers"

    # and once surely while the command runs
    marker = "sleep 7799"
    cli = spawn_cli("attach", box.id, "--", *sleep_command(7799))
    assert wait_for(lambda: alive_with_cmdline(marker.encode())), cli.stderr
    helpers = helpers_of(cli.pid)
    assert len(helpers) == 2  # the keeper and the command
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    assert wait_until_clean(before, box.pid, gone=sorted(helpers), marker=b"sleep 7799") == before


def run_in_pty(argv: list[str]) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - execs at once
        os.environ["SHELL"] = "/bin/sh"
        os.execv(argv[0], argv)
    return pid, fd


def read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out.extend(os.read(fd, 4096))
            except OSError:
                break
    return bytes(out)


def test_background_jobs_of_a_terminal_session_do_not_outlive_it(box: OciContainer) -> None:
    """A job that ignores SIGHUP survives a terminal hang-up; the keeper still ends it."""
    before = Snapshot.take(box.pid)
    for how in ("exit", "sigkill"):
        marker = b"sleep 7801" if how == "exit" else b"sleep 7802"
        argv = [sys.executable, "-m", "dvs", "container", "attach", box.id]
        pid, fd = run_in_pty(argv)
        try:
            os.write(fd, b"trap '' HUP; " + marker + b" & echo started$((2+3))\n")
            assert b"started5" in read_until(fd, b"started5")
            assert wait_for(lambda m=marker: alive_with_cmdline(m))
            helpers = helpers_of(pid)
            if how == "exit":
                os.write(fd, b"exit 0\n")
                read_until(fd, b"never", timeout=2)
            else:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        finally:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(fd)
        after = wait_until_clean(before, box.pid, gone=sorted(helpers), marker=marker)
        assert after == before, how
        assert not alive_with_cmdline(marker), how


def test_failed_attach_leaves_the_target_untouched(box: OciContainer) -> None:
    before = Snapshot.take(box.pid)
    with open(f"/proc/{box.pid}/status") as f:
        status_before = [line for line in f if line.startswith(("Cap", "Seccomp", "NoNew"))]
    with pytest.raises(AttachFailed, match=r"executing the command.*not found"):
        Session(box.id, ["no-such-command-anywhere"]).start()
    result = dvs("attach", "--base-dir", "/etc/hostname/x", box.id, "--", "true")
    assert result.returncode == 1
    assert b"base directory /etc/hostname/x" in result.stderr
    assert wait_until_clean(before, box.pid) == before
    with open(f"/proc/{box.pid}/status") as f:
        assert [line for line in f if line.startswith(("Cap", "Seccomp", "NoNew"))] == (
            status_before
        )
    assert box.is_alive()


def test_background_jobs_of_a_pipe_session_do_not_outlive_it(box: OciContainer) -> None:
    """Without a terminal the command leads a session of its own; what it leaves is ended."""
    before = Snapshot.take(box.pid)
    script = "sleep $((7811 - 1 + 1)) & echo started"
    result = dvs("attach", box.id, "--", "sh", "-c", script)
    assert result.returncode == 0 and result.stdout == b"started\n", result.stderr
    assert wait_until_clean(before, box.pid, marker=b"sleep 7811") == before
    # with kill_session off (the API), the job is the caller's business
    from dvs.container import AttachOptions

    options = AttachOptions(kill_session=False)
    with Session(
        box.id,
        ["sh", "-c", script.replace("7811", "7812")],
        options=options,
        stdout=subprocess.DEVNULL,
    ) as session:
        assert session.wait(timeout=30) == 0
    assert wait_for(lambda: alive_with_cmdline(b"sleep 7812"))
    for pid in alive_with_cmdline(b"sleep 7812"):
        os.kill(pid, signal.SIGKILL)
    assert wait_until_clean(before, box.pid, marker=b"sleep 7812") == before
