"""Resolvers against recorded engine output, for the engines that do not run here.

Two layers: the parsers on recorded output (formats as the engines print them: runc's
state.json, crun's status, OCI ``state``, ``podman/docker inspect --format``, ``ctr task
ls``, ``crictl inspect -o json``, ``lxc-info -pH``, ``lxc info``/``incus info``,
``machinectl show``, ``kubectl get pod -o json``), and whole resolutions through fake
CLIs on a private PATH that print such output for a real, live process -- so the pidfd
pinning, the namespace lists, ambiguity and "ask as the owning user" run for real.
The engines that do run here (runc, crun, podman, pids, command lines) are tested for
real in tests/integration/test_container_resolve.py (this file: recorded output).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.container.errors import AmbiguousTarget, UnknownType
from dvs.container.resolve import (
    DEFAULT_TYPES,
    Env,
    Miss,
    cgroup_line_matches,
    normalize_types,
    parse_crictl_inspect,
    parse_crun_status,
    parse_ctr_tasks,
    parse_info_pid,
    parse_kubectl_container_id,
    parse_oci_state,
    parse_pid_line,
    parse_runc_state,
    parse_running_pid,
    resolve,
    start_ticks,
)
from dvs.errors import TargetNotFound

CID = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b"

RUNC_STATE = json.dumps(
    {
        "id": "web",
        "init_process_pid": 4242,
        "init_process_start": 98951,
        "created": "2026-11-26T18:50:16.997305074Z",
        "config": {"rootfs": "/srv/web/rootfs"},
    }
)
CRUN_STATUS = """{
    "pid": 4243,
    "process-start-time": 98992,
    "cgroup-path": "/web",
    "rootfs": "rootfs",
    "bundle": "/srv/web",
    "created": "2026-11-26T18:50:15.879648Z",
    "owner": "root",
    "detached": true
}"""
OCI_STATE_RUNNING = """{
  "ociVersion": "1.0.2-dev",
  "id": "web",
  "pid": 4244,
  "status": "running",
  "bundle": "/srv/web",
  "rootfs": "/srv/web/rootfs",
  "created": "2026-11-26T18:50:16.997305074Z",
  "owner": ""
}"""
CTR_TASKS = """TASK                                                                PID      STATUS
redis                                                               31337    RUNNING
batch                                                               0        STOPPED
"""
CRICTL_INSPECT = json.dumps(
    {
        "status": {
            "id": CID,
            "metadata": {"attempt": 0, "name": "web"},
            "state": "CONTAINER_RUNNING",
        },
        "info": {"sandboxID": "9" * 64, "pid": 5151, "runtimeSpec": {"ociVersion": "1.0.2"}},
    }
)
LXD_INFO = """Name: web
Status: RUNNING
Type: container
Architecture: x86_64
PID: 6161
Created: 2026/11/26 18:00 UTC
Last Used: 2026/11/26 18:01 UTC

Resources:
  Processes: 12
"""
LXD3_INFO = "Name: web\nRemote: unix://\nArchitecture: x86_64\nStatus: Running\nPid: 6162\n"
LXD1_INFO = "Name: foo\nStatus: Running\nType: persistent\nProfiles: default\nInit: 30777\n"


def kubectl_pod(container_id: str, *, running: bool = True, name: str = "app") -> str:
    state = {"running": {"startedAt": "2026-11-26T18:00:00Z"}} if running else {"waiting": {}}
    return json.dumps(
        {
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "sidecar", "containerID": "cri-o://" + "1" * 64, "state": state},
                    {"name": name, "containerID": container_id, "state": state},
                ],
            },
        }
    )


# ---- parsers ------------------------------------------------------------------------------


def test_runtime_state_parsers() -> None:
    assert parse_runc_state(RUNC_STATE) == (4242, 98951)
    assert parse_crun_status(CRUN_STATUS) == (4243, 98992)
    assert parse_oci_state(OCI_STATE_RUNNING) == 4244
    with pytest.raises(Miss, match="stopped"):
        parse_oci_state(OCI_STATE_RUNNING.replace('"running"', '"stopped"'))


def test_inspect_and_cli_parsers() -> None:
    assert parse_running_pid("true;7777\n") == 7777
    with pytest.raises(Miss, match="not running"):
        parse_running_pid("false;0\n")
    with pytest.raises(Miss, match="listed 2"):
        parse_running_pid("true;1\ntrue;2\n")
    assert parse_ctr_tasks(CTR_TASKS, "redis") == 31337
    assert parse_ctr_tasks(CTR_TASKS, "nothere") is None
    with pytest.raises(Miss, match="stopped"):
        parse_ctr_tasks(CTR_TASKS, "batch")
    assert parse_crictl_inspect(CRICTL_INSPECT) == 5151
    with pytest.raises(Miss, match="exited"):
        parse_crictl_inspect(CRICTL_INSPECT.replace("CONTAINER_RUNNING", "CONTAINER_EXITED"))
    assert parse_pid_line("3211\n") == 3211
    with pytest.raises(Miss):
        parse_pid_line("\n")
    assert parse_info_pid(LXD_INFO) == 6161
    assert parse_info_pid(LXD3_INFO) == 6162
    assert parse_info_pid(LXD1_INFO) == 30777
    with pytest.raises(Miss, match="no PID"):
        parse_info_pid("Name: web\nStatus: STOPPED\n")


def test_kubectl_parser_accepts_every_runtime_prefix() -> None:
    for prefix in ("containerd://", "cri-o://", "docker://"):
        assert parse_kubectl_container_id(kubectl_pod(prefix + CID), "app") == CID
    assert parse_kubectl_container_id(kubectl_pod("containerd://" + CID), None) == "1" * 64
    with pytest.raises(Miss, match="no container named"):
        parse_kubectl_container_id(kubectl_pod("containerd://" + CID), "db")
    with pytest.raises(Miss, match="no running container"):
        parse_kubectl_container_id(kubectl_pod("containerd://" + CID, running=False), None)


@pytest.mark.parametrize(
    ("line", "matches"),
    [
        (f"0::/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{CID}.scope", True),
        (f"0::/kubepods.slice/kubepods-burstable-pod1.slice/crio-{CID}.scope", True),
        (f"12:memory:/kubepods/besteffort/pod0b7c/{CID}", True),
        (f"0::/system.slice/docker-{CID}.scope", True),
        (f"0::/machine.slice/libpod-{CID}.scope/container", True),
        (f"0::/machine.slice/libpod-conmon-{CID}.scope", False),  # conmon, not the container
        (f"0::/kubepods/besteffort/pod0b7c/{CID}x", False),
        (f"0::/kubepods/besteffort/pod0b7c/x{CID}", False),
        ("0::/user.slice/user-1000.slice/session-3.scope", False),
    ],
)
def test_cgroup_lines(line: str, matches: bool) -> None:
    assert cgroup_line_matches(line, CID) is matches


def test_type_names() -> None:
    assert normalize_types(None) == list(DEFAULT_TYPES)
    assert "command" not in DEFAULT_TYPES
    assert normalize_types("process_id,cri-o, k8s ,systemd-nspawn,cmdline") == [
        "pid",
        "crio",
        "kubernetes",
        "nspawn",
        "command",
    ]
    with pytest.raises(UnknownType, match="unknown container type 'rkt'"):
        normalize_types("rkt")


# ---- whole resolutions through fake CLIs ------------------------------------------------------


@pytest.fixture
def live() -> Iterator[subprocess.Popen[bytes]]:
    """A real process for the fake engines to report."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def fakebin() -> Iterator[Path]:
    """A PATH directory readable by every user (the rootless case runs CLIs as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="dvs-fakebin-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def fake_cli(bindir: Path, name: str, script: str) -> None:
    exe = bindir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def printing(text: str, *, when: str = "true") -> str:
    """A shell body that prints ``text`` if ``when`` holds, else fails like an engine."""
    return (
        f'if {when}; then /bin/cat <<"EOF"\n{text}\nEOF\nelse echo "Error: no such container" >&2; '
        "exit 1; fi\n"
    )


@pytest.mark.parametrize(
    ("engine", "program", "output", "name"),
    [
        ("docker", "docker", "true;{pid}", "web"),
        ("lxc", "lxc-info", "{pid}", "web"),
        ("lxd", "lxc", LXD_INFO.replace("6161", "{pid}"), "web"),
        ("incus", "incus", LXD_INFO.replace("6161", "{pid}"), "web"),
        ("nspawn", "machinectl", "{pid}", "web"),
        ("crio", "crictl", CRICTL_INSPECT.replace("5151", "{pid}"), CID),
    ],
)
def test_cli_engines_resolve_and_pin_the_reported_process(
    live: subprocess.Popen[bytes], fakebin: Path, engine: str, program: str, output: str, name: str
) -> None:
    # the fake runs with only its own directory on PATH: shell built-ins only
    matches_name = f'case "$*" in *" {name}"*) true;; *) false;; esac'
    fake_cli(fakebin, program, printing(output.replace("{pid}", str(live.pid)), when=matches_name))
    env = Env(path=str(fakebin))
    with resolve(name, [engine], env) as target:
        assert target.pid == live.pid and target.engine == engine
        assert target.alive()
    with pytest.raises(TargetNotFound) as info:
        resolve("other", [engine], env)
    assert info.value.tried == [
        f"{engine}: `{program} " + info.value.tried[0].split(f"`{program} ", 1)[1]
    ]
    assert info.value.tried[0].endswith("Error: no such container")


def test_containerd_asks_every_namespace(live: subprocess.Popen[bytes], fakebin: Path) -> None:
    table = CTR_TASKS.replace("31337", str(live.pid))
    fake_cli(fakebin, "ctr", printing(table, when='[ "$2" = moby ]'))
    with resolve("redis", ["containerd"], Env(path=str(fakebin))) as target:
        assert target.pid == live.pid and target.detail == "ctr -n moby"
    # the same task id in two namespaces, different processes: ambiguous
    other = subprocess.Popen(["sleep", "300"])
    try:
        fake_cli(
            fakebin,
            "ctr",
            f'case "$2" in moby) echo "TASK PID STATUS"; echo "redis {live.pid} RUNNING";; '
            f'k8s.io) echo "TASK PID STATUS"; echo "redis {other.pid} RUNNING";; '
            '*) echo "TASK PID STATUS";; esac\n',
        )
        with pytest.raises(AmbiguousTarget) as info:
            resolve("redis", ["containerd"], Env(path=str(fakebin)))
        assert len(info.value.candidates) == 2
    finally:
        other.kill()
        other.wait()


def test_kubernetes_finds_the_container_by_its_id_in_proc_cgroup(
    live: subprocess.Popen[bytes], fakebin: Path, tmp_path: Path
) -> None:
    """kubectl names the container; /proc/PID/cgroup (recorded, CRI-O layout) finds it."""
    fake_cli(
        fakebin,
        "kubectl",
        printing(kubectl_pod("cri-o://" + CID), when='[ "$3" = web ] && [ "$5" = shop ]'),
    )
    proc = tmp_path / "proc"
    entry = proc / str(live.pid)
    (entry / "ns").mkdir(parents=True)
    real = Path(f"/proc/{live.pid}")
    (entry / "stat").write_bytes((real / "stat").read_bytes())
    (entry / "cmdline").write_bytes(b"sleep\x00300\x00")
    (entry / "cgroup").write_text(f"0::/kubepods.slice/kubepods-burstable.slice/crio-{CID}.scope\n")
    for ns in ("mnt", "pid"):
        os.symlink(os.readlink(real / "ns" / ns), entry / "ns" / ns)
    env = Env(path=str(fakebin), proc=str(proc))
    with resolve("shop/web/app", ["kubernetes"], env) as target:
        assert target.pid == live.pid
        assert start_ticks(target.pid) is not None
    with pytest.raises(TargetNotFound, match="no process has 1111111111111111"):
        resolve("shop/web/sidecar", ["kubernetes"], env)
    with pytest.raises(TargetNotFound, match="not POD, NAMESPACE/POD"):
        resolve("a/b/c/d", ["kubernetes"], env)


@pytest.mark.root
def test_rootless_podman_is_asked_as_the_owning_user(
    live: subprocess.Popen[bytes], fakebin: Path
) -> None:
    """root's podman does not see a user's containers; dvs asks as that user."""
    user = pwd.getpwnam("nobody")
    run_user = Path(tempfile.mkdtemp(prefix="dvs-run-user-"))
    try:
        (run_user / str(user.pw_uid) / "libpod").mkdir(parents=True)
        fake_cli(
            fakebin,
            "podman",
            printing(
                f"true;{live.pid}",
                when=f'[ "$(/usr/bin/id -u)" = {user.pw_uid} ] && '
                f'[ "$XDG_RUNTIME_DIR" = "{run_user}/{user.pw_uid}" ]',
            ),
        )
        env = Env(path=str(fakebin), run_user=str(run_user))
        with resolve("web", ["podman"], env) as target:
            assert target.pid == live.pid
            assert target.detail == f"podman (rootless, user {user.pw_name})"
        # without that user's runtime directory nobody is asked, and the miss says so
        shutil.rmtree(run_user / str(user.pw_uid))
        with pytest.raises(TargetNotFound, match="no such container"):
            resolve("web", ["podman"], env)
    finally:
        shutil.rmtree(run_user)


def test_an_engine_naming_a_dead_process_is_target_gone(fakebin: Path) -> None:
    from dvs.errors import TargetGone

    dead = subprocess.Popen(["true"])
    dead.wait()
    fake_cli(fakebin, "docker", printing(f"true;{dead.pid}"))
    with pytest.raises(TargetGone, match="has exited"):
        resolve("web", ["docker"], Env(path=str(fakebin)))


def test_pinning_checks_the_start_time(live: subprocess.Popen[bytes]) -> None:
    """A recorded start time that is not the live process's means the pid was reused."""
    from dvs.container.resolve import Found, boot_ticks, pin
    from dvs.errors import TargetGone

    started = start_ticks(live.pid)
    assert started is not None
    with pin(Found(live.pid, "state", started), "runc", "web", boot_ticks(), []) as target:
        assert target.alive()
    with pytest.raises(TargetGone, match="another process"):
        pin(Found(live.pid, "state", started + 7), "runc", "web", boot_ticks(), [])
    # without a recorded start time: a process younger than the question is not the answer
    with pytest.raises(TargetGone, match="another process"):
        pin(Found(live.pid, "docker inspect"), "docker", "web", started - 100, [])
