"""The slim-container fixtures, checked the way an attach test will use them.

Each test starts a real busybox container (runc, crun, or podman driving either), looks at it
from the host through /proc -- its pid, root, namespaces, id mappings -- and then checks that
leaving the context removed everything: the process, the runtime's record, the bundle, and the
crun hugetlb workaround unless another process still holds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dvs.probe import ProbeReport
from dvs.testing import container_cgroups as cgroups
from dvs.testing import containers
from dvs.testing.container_bundle import BundleError, BundleOptions, oci_config
from dvs.testing.container_rootfs import (
    CONTAINER_HOSTNAME,
    CONTAINER_NAMESERVER,
    HOST_BUSYBOX,
    MARKER_PATH,
    MARKER_TEXT,
    USERNS_ID_BASE,
)
from dvs.testing.containers import CONTAINER_KINDS, Container, ContainerExecError, run_any

pytestmark = [pytest.mark.containers, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
BUSYBOX_SHA256 = (
    hashlib.sha256(HOST_BUSYBOX.read_bytes()).hexdigest() if HOST_BUSYBOX.exists() else ""
)


def need(host: ProbeReport, kind: str) -> None:
    for tool in kind.split("-"):
        if not host.has_tool(tool):
            pytest.skip(f"{tool} is not installed (dvs probe)")


def listed_ids(kind: str) -> set[str]:
    """What the engine lists: container ids (runc/crun) or names and ids (podman)."""
    if kind.startswith("podman"):
        out = subprocess.run(
            ["podman", "ps", "--all", "--format", "{{.ID}} {{.Names}}", "--no-trunc"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    else:
        out = subprocess.run(
            [kind, "list", "-q"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    return set(out.split())


def names(container: Container) -> set[str]:
    return {container.id, getattr(container, "name", container.id)}


def assert_removed(kind: str, container: Container) -> None:
    assert not os.path.exists(f"/proc/{container.pid}"), "init pid still in /proc"
    assert not names(container) & listed_ids(kind)
    runtime_ids = listed_ids(container.runtime)
    assert container.id not in runtime_ids, f"{container.runtime} list still shows it"
    assert not container.bundle.exists(), f"bundle {container.bundle} still exists"


def namespace(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", CONTAINER_KINDS)
def test_container_runs_busybox_in_its_own_namespaces(host: ProbeReport, kind: str) -> None:
    need(host, kind)
    with run_any(kind) as container:
        pid = container.pid
        root = Path(f"/proc/{pid}/root")
        assert container.is_alive()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"/usr/bin/dvs-idle" in cmdline, cmdline  # the recognisable init
        assert os.readlink(root / "bin/sh") == "busybox"
        assert hashlib.sha256((root / "bin/busybox").read_bytes()).hexdigest() == BUSYBOX_SHA256
        assert (root / MARKER_PATH.lstrip("/")).read_text() == MARKER_TEXT
        assert (root / "etc/hostname").read_text().strip() == CONTAINER_HOSTNAME
        resolv = (root / "etc/resolv.conf").read_text()
        assert f"nameserver {CONTAINER_NAMESERVER}" in resolv
        assert resolv != Path("/etc/resolv.conf").read_text()
        for ns in ("mnt", "pid", "uts", "net"):
            assert namespace(pid, ns) != namespace("self", ns), f"{ns} namespace is the host's"
        assert container.rootfs.is_dir()
        assert container.exec(["hostname"]).stdout.decode().strip() == CONTAINER_HOSTNAME
        # In its own pid namespace the init is pid 1.
        assert container.exec(["cat", "/proc/1/cmdline"]).stdout.startswith(b"/bin/sh\0")
    assert_removed(kind, container)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", CONTAINER_KINDS)
def test_readonly_root_refuses_writes(host: ProbeReport, kind: str) -> None:
    need(host, kind)
    with run_any(kind, readonly=True) as container:
        with pytest.raises(ContainerExecError, match="Read-only file system"):
            container.exec(["touch", "/etc/written-inside"])
        # The host, going through the container's root, meets the same read-only mount.
        with pytest.raises(OSError) as host_write:
            Path(f"/proc/{container.pid}/root/etc/written-from-host").write_text("x")
        assert host_write.value.errno == errno.EROFS
    assert_removed(kind, container)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", CONTAINER_KINDS)
def test_user_namespace_maps_root_to_100000(host: ProbeReport, kind: str) -> None:
    need(host, kind)
    if not host.user_namespaces:
        pytest.skip("user namespaces unavailable (dvs probe)")
    with run_any(kind, userns=True) as container:
        pid = container.pid
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == [
            "0",
            str(USERNS_ID_BASE),
            "65536",
        ]
        assert Path(f"/proc/{pid}/gid_map").read_text().split() == [
            "0",
            str(USERNS_ID_BASE),
            "65536",
        ]
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(USERNS_ID_BASE)] * 4
        assert status["Gid"].split() == [str(USERNS_ID_BASE)] * 4
        assert namespace(pid, "user") != namespace("self", "user")
        assert os.stat(f"/proc/{pid}/root/bin/busybox").st_uid == USERNS_ID_BASE
        assert container.exec(["id", "-u"]).stdout.strip() == b"0"
    assert_removed(kind, container)


class BodyFailed(Exception):
    pass


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", CONTAINER_KINDS)
def test_a_failing_body_still_cleans_up(host: ProbeReport, kind: str) -> None:
    need(host, kind)
    seen: list[Container] = []
    with pytest.raises(BodyFailed):
        with run_any(kind) as container:
            seen.append(container)
            raise BodyFailed
    assert_removed(kind, seen[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["runc", "podman-runc"])
def test_a_container_that_died_is_still_removed(host: ProbeReport, kind: str) -> None:
    need(host, kind)
    with run_any(kind) as container:
        os.kill(container.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while container.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not container.is_alive()
    assert_removed(kind, container)


def crun_needs_workaround() -> bool:
    """Whether this host needs the workaround, judged without dvs's own mount in place."""
    return "hugetlb" in cgroups.unified_controllers() or cgroups.workaround_status().applied


@pytest.mark.timeout(60)
def test_crun_workaround_is_applied_then_undone(host: ProbeReport) -> None:
    need(host, "crun")
    mounts_before = cgroups.cgroup_mounts()
    status_before = cgroups.workaround_status()
    hierarchy_before = cgroups.hugetlb_hierarchy()[0]
    controllers_before = cgroups.unified_controllers()
    needed = crun_needs_workaround()
    with containers.run_container("crun") as container:
        status = cgroups.workaround_status()
        if needed:
            assert status.applied and status.in_use
            mountpoints = [m[0] for m in cgroups.cgroup_mounts()]
            assert str(cgroups.HUGETLB_MOUNTPOINT) in mountpoints
            assert "hugetlb:" in Path(f"/proc/{container.pid}/cgroup").read_text()
    after = cgroups.workaround_status()
    if after.applied:
        # Another test process started a container meanwhile: it must keep its mount.
        assert after.in_use
        return
    assert not cgroups.HUGETLB_MOUNTPOINT.exists()
    assert cgroups.hugetlb_hierarchy()[0] == (0 if status_before.applied else hierarchy_before)
    if not status_before.applied:
        assert cgroups.cgroup_mounts() == mounts_before
        assert cgroups.unified_controllers() == controllers_before


HOLDER = textwrap.dedent("""
    import sys, time
    from dvs.testing import containers
    with containers.run_container("crun") as c:
        print(c.id, c.pid, c.bundle, flush=True)
        if sys.argv[1] == "hang":
            time.sleep(600)
""")


def start_holder(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, mode],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.timeout(90)
def test_workaround_survives_another_process_finishing(host: ProbeReport) -> None:
    need(host, "crun")
    with containers.run_container("crun") as ours:
        with start_holder("exit") as other:
            assert other.stdout is not None
            other_id = other.stdout.readline().split()[0]
            assert other.wait(timeout=60) == 0
        assert other_id not in listed_ids("crun")
        if crun_needs_workaround():
            assert cgroups.workaround_status().in_use  # still ours
        # Our container is intact: crun can still exec into it.
        assert ours.exec(["cat", "/etc/hostname"]).stdout.strip() == CONTAINER_HOSTNAME.encode()
    assert_removed("crun", ours)


@pytest.mark.timeout(90)
def test_leftovers_of_a_killed_process_are_removed(host: ProbeReport) -> None:
    need(host, "crun")
    with start_holder("hang") as holder:
        assert holder.stdout is not None
        container_id, pid_text, bundle = holder.stdout.readline().split()
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(timeout=30)
    assert container_id in listed_ids("crun")
    containers.cleanup_leftovers(("crun",))
    assert container_id not in listed_ids("crun")
    assert not Path(bundle).exists()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid_text}") and time.monotonic() < deadline:
        time.sleep(0.05)  # its reaper, now orphaned, reaps it
    assert not os.path.exists(f"/proc/{pid_text}")
    status = cgroups.workaround_status()
    assert not status.applied or status.in_use


@pytest.mark.timeout(30)
def test_bundle_rejects_rlimits_root_cannot_grant() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("NOFILE hard limit is unlimited here")
    with pytest.raises(BundleError, match="CAP_SYS_RESOURCE"):
        oci_config(BundleOptions(rlimits={"RLIMIT_NOFILE": (hard + 1, hard + 1)}), "x")
    config = oci_config(BundleOptions(userns=True, readonly=True), "dvs-x")
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert {"type": "user"} in config["linux"]["namespaces"]
    assert json.dumps(config)  # serialisable as config.json
