"""Resolvers against the engines that run here: runc, crun, podman, pids, command lines.

Each resolves a live container the way a user names it (id, name, id prefix) and must
land on the container's init, pinned by a pidfd; the cgroup-based lookup used for CRI-O
and Kubernetes runs against real containers' /proc/PID/cgroup.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from attach_helpers import require

from dvs.container.resolve import Env, resolve, start_ticks
from dvs.errors import TargetNotFound
from dvs.probe import ProbeReport
from dvs.testing.containers import run_container, run_podman

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("runtime", "state_file"),
    [("runc", "/run/runc/{id}/state.json"), ("crun", "/run/crun/{id}/status")],
)
def test_oci_runtimes_by_state_directory(runtime: str, state_file: str, host: ProbeReport) -> None:
    require(host, runtime)
    with run_container(runtime) as box:
        with resolve(box.id) as target:  # the default order finds it without -t
            assert target.pid == box.pid
            assert target.engine == runtime
            assert target.detail == state_file.format(id=box.id)
            assert target.alive()
            assert start_ticks(box.pid) is not None
    # gone with the container: the state directory is removed, the miss says where we looked
    with pytest.raises(TargetNotFound) as info:
        resolve(box.id, [runtime])
    assert info.value.tried[0].startswith(f"{runtime}: no state in /run/{runtime}")


def test_podman_by_name_id_and_prefix_and_by_cgroup(host: ProbeReport) -> None:
    require(host, "podman", "crun")
    with run_podman("crun") as pod:
        for name in (pod.name, pod.id, pod.id[:12]):
            with resolve(name, ["podman"]) as target:
                assert target.pid == pod.pid
                assert target.detail == "podman (root)"
        # CRI-O's fallback without crictl: the 64-hex id in the init's cgroup path
        with resolve(pod.id, ["crio"], Env(path="/nonexistent-dvs")) as target:
            assert target.pid == pod.pid
            assert target.detail.startswith("cgroup of container")


def test_kubernetes_id_is_found_in_proc_cgroup_of_a_real_container() -> None:
    """kubectl (a stand-in printing a recorded pod) names the id; the kernel's cgroup
    paths of the real container's processes find its init."""
    with run_container("runc") as box:
        bindir = Path(tempfile.mkdtemp(prefix="dvs-fakebin-"))
        try:
            pod = (
                '{"status": {"containerStatuses": [{"name": "app", '
                f'"containerID": "containerd://{box.id}", "state": {{"running": {{}}}}}}]}}}}'
            )
            kubectl = bindir / "kubectl"
            kubectl.write_text(f"#!/bin/sh\n/bin/cat <<'EOF'\n{pod}\nEOF\n")
            kubectl.chmod(kubectl.stat().st_mode | stat.S_IXUSR)
            with resolve("default/web", ["kubernetes"], Env(path=str(bindir))) as target:
                assert target.pid == box.pid  # the init, not its sleep child
        finally:
            shutil.rmtree(bindir)


def test_pid_and_command_line() -> None:
    with run_container("runc") as box:
        with resolve(str(box.pid)) as target:
            assert (target.pid, target.engine) == (box.pid, "pid")
        with resolve(f"dvs-idle {box.id}", ["command"]) as target:
            assert target.pid == box.pid
    # a duration no other process (say, a concurrent run of this test) has in its cmdline
    duration = f"{1000 + os.getpid() % 9000}.{time.monotonic_ns() % 10**6:06d}"
    host = subprocess.Popen(["sleep", duration])
    try:
        # Popen returns when exec has replaced the mm, a moment before the kernel sets the
        # new argument area: /proc/PID/cmdline can still be empty right then
        deadline = time.monotonic() + 10
        while Path(f"/proc/{host.pid}/cmdline").read_bytes() != f"sleep\0{duration}\0".encode():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with resolve(f"sleep {duration}", "cmdline") as target:
            assert target.pid == host.pid
    finally:
        host.kill()
        host.wait()
