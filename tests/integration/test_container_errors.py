"""Bad input gets a clear, typed error that names what was tried -- and the target is untouched.

Unknown and ambiguous names, dead pids, a target that exits during the attach, engine
CLIs that are missing or whose daemon is not running (a docker client and kubectl exist
here without dockerd or a cluster), a caller without root, and a backend that is not there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attach_helpers import Snapshot, dvs, require, wait_until_clean

from dvs.container import AmbiguousTarget, Session, resolve
from dvs.container.resolve import DEFAULT_TYPES, Env, resolve_pid
from dvs.errors import NotPermitted, TargetGone, TargetNotFound
from dvs.lowlevel import sys as llsys
from dvs.probe import ProbeReport
from dvs.testing.containers import run_container

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _runc_installed(host: ProbeReport) -> None:
    require(host, "runc")


REPO = Path(__file__).resolve().parents[2]


def test_unknown_target_lists_every_resolver_and_is_fast() -> None:
    start = time.monotonic()
    result = dvs("attach", "no-such-container-dvs")
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "no target matches 'no-such-container-dvs'" in message
    for engine in DEFAULT_TYPES:
        assert f"  - {engine}: " in message, engine
    if shutil.which("docker"):  # a client without a daemon fails cleanly, with its reason
        assert "docker: `docker inspect" in message and "daemon" in message.lower()
    if shutil.which("kubectl"):
        assert "kubernetes: `kubectl get pod" in message
    assert elapsed < 20, f"resolution took {elapsed:.1f} s"
    assert "Traceback" not in message


def test_docker_and_kubectl_clients_without_a_daemon_fail_fast() -> None:
    for engine, name in (("docker", "web"), ("kubernetes", "default/web")):
        start = time.monotonic()
        with pytest.raises(TargetNotFound) as info:
            resolve(name, [engine])
        assert time.monotonic() - start < 8
        (attempt,) = info.value.tried
        assert attempt.startswith(f"{engine}: ")
        if engine == "docker" and shutil.which("docker"):
            assert "Cannot connect to the Docker daemon" in attempt
        elif engine == "docker":
            assert "'docker' not found on PATH" in attempt


def test_missing_engine_cli_is_named() -> None:
    env = Env(path="/nonexistent-dvs-path")
    for engine, program in (
        ("podman", "podman"),
        ("docker", "docker"),
        ("lxc", "lxc-info"),
        ("lxd", "lxc"),
        ("incus", "incus"),
        ("nspawn", "machinectl"),
        ("kubernetes", "kubectl"),
    ):
        with pytest.raises(TargetNotFound) as info:
            resolve("web", [engine], env)
        assert info.value.tried == [f"{engine}: {program!r} not found on PATH"]
    result = dvs("attach", "-t", "nosuchengine", "web")
    assert result.returncode == 1 and b"unknown container type 'nosuchengine'" in result.stderr


def test_dead_pid() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(TargetNotFound) as info:
        resolve(str(child.pid), ["pid"])
    assert info.value.tried == [f"pid: no process {child.pid}"]
    result = dvs("attach", "-t", "pid", str(child.pid), "--", "true")
    assert result.returncode == 1 and f"no process {child.pid}".encode() in result.stderr


def test_ambiguous_command_line_names_both_containers() -> None:
    with run_container("runc") as one, run_container("runc") as two:
        with pytest.raises(AmbiguousTarget) as info:
            resolve("/usr/bin/dvs-idle dvs-", ["command"])
        text = str(info.value)
        assert f"pid {one.pid}" in text and f"pid {two.pid}" in text
        result = dvs("attach", "-t", "command", "/usr/bin/dvs-idle dvs-", "--", "true")
        assert result.returncode == 1 and b"is ambiguous" in result.stderr
        # our own command line (and our ancestors') never counts as a match
        assert resolve(f"/usr/bin/dvs-idle {one.id}", ["command"]).pid == one.pid


def test_target_that_exited_before_the_attach() -> None:
    with run_container("runc") as box:
        target = resolve(box.id, ["runc"])
        os.kill(box.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while target.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(TargetGone, match="exited"):
            Session(target, ["true"]).start()
        target.close()


def test_target_exiting_during_attach_gives_a_typed_error_and_leaves_nothing() -> None:
    """Targets that live a few milliseconds: the attach succeeds or reports TargetGone."""
    outcomes = []
    for lifetime_ms in (1, 3, 5, 7, 9, 12, 15, 20, 30, 60):
        holder = llsys.spawn(
            ["/bin/sleep", f"{lifetime_ms / 1000:.3f}"],
            clone_flags=llsys.CLONE_NEWNS | llsys.CLONE_NEWPID | llsys.CLONE_NEWUTS,
        )
        try:
            with Session(holder.pid, ["true"]) as session:
                outcomes.append(session.wait(timeout=30))
        except (TargetGone, TargetNotFound):
            outcomes.append("gone")
        finally:
            holder.kill()
            holder.wait()
            holder.close()
    print("outcomes", outcomes)
    # 0: attached before it exited; 137: the pid namespace's init died under the command
    assert all(o in (0, "gone", 137) for o in outcomes), outcomes
    assert "gone" in outcomes or 0 in outcomes


def _python_for_nobody() -> str | None:
    """An interpreter with cffi that uid 65534 may run (root's pyenv is not reachable)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import _cffi_backend"],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                cwd="/",
                check=False,
                timeout=30,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


def test_non_root_caller_is_refused_and_the_target_untouched() -> None:
    with run_container("runc") as box:
        before = Snapshot.take(box.pid)
        # the API, in a child that dropped to nobody
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read_end)
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                Session(box.pid, ["true"]).start()
                os.write(write_end, b"attached?!")
            except NotPermitted as exc:
                os.write(write_end, b"NotPermitted: " + str(exc).encode())
            except BaseException as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
            os._exit(0)
        os.close(write_end)
        answer = b""
        while chunk := os.read(read_end, 4096):
            answer += chunk
        os.close(read_end)
        os.waitpid(pid, 0)
        assert answer.startswith(b"NotPermitted: container attach needs root"), answer
        # the CLI, run as nobody with an interpreter nobody can use
        python = _python_for_nobody()
        if python is not None:
            result = subprocess.run(
                [python, "-m", "dvs", "container", "attach", "-t", "pid", str(box.pid)],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                cwd="/",
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                timeout=60,
            )
            assert result.returncode == 1
            assert b"needs root" in result.stderr, result.stderr
        assert wait_until_clean(before, box.pid) == before


def test_pid_resolution_pins_the_process() -> None:
    """A pinned target stays the same process: its pidfd never names a successor."""
    child = subprocess.Popen(["sleep", "30"])
    target = resolve_pid(child.pid)
    try:
        assert target.alive()
        child.kill()
        child.wait()
        assert not target.alive()
        with pytest.raises(ProcessLookupError):
            llsys.pidfd_send_signal(target.pidfd, 0)
    finally:
        target.close()
