"""Rootless podman, for real: a container of an ordinary user's podman, attached by root.

root's podman does not see a user's containers; ``dvs.container.resolve`` finds users with
a podman runtime directory under /run/user and asks podman as each of them. The container
lives in the user's user namespace (container root = the user, container ids 1.. = its
subordinate ids), which the attached shell must share: what it writes into the container
must land on the host with the ids the rootless namespace maps them to.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_helpers import Snapshot, dvs, pid_ns, settled_pids_in_ns, text, wait_until_clean

from dvs.container.resolve import resolve
from dvs.errors import TargetNotFound
from dvs.testing import cache
from dvs.testing.container_rootfs import MARKER_PATH, MARKER_TEXT
from dvs.testing.container_rootless import (
    ACTIVE_LOCK,
    RootlessPodmanContainer,
    RootlessUser,
    rootless_unavailable_reason,
    run_rootless_podman,
)

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pod() -> Iterator[RootlessPodmanContainer]:
    """One idle container of the rootless user's podman, shared by this module."""
    reason = rootless_unavailable_reason()
    if reason is not None:
        pytest.skip(f"rootless podman cannot run here: {reason}")
    with run_rootless_podman() as container:
        yield container


def user_of(pod: RootlessPodmanContainer) -> RootlessUser:
    assert pod.user is not None
    return pod.user


def id_map(path: str) -> list[list[int]]:
    with open(path) as f:
        return [[int(n) for n in line.split()] for line in f]


# first: before the module's shared container exists, this fixture is the user's last
def test_fixture_removes_container_conmon_and_its_runtime_when_the_body_fails() -> None:
    reason = rootless_unavailable_reason()
    if reason is not None:
        pytest.skip(f"rootless podman cannot run here: {reason}")
    with pytest.raises(RuntimeError, match="body failed"):
        with run_rootless_podman() as box:
            user = user_of(box)
            pids = (box.pid, box.conmon_pid)
            assert all(p > 0 for p in pids)
            raise RuntimeError("body failed")

    def live(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"

    def live_as(pid: int, uid: int) -> bool:
        try:
            return os.stat(f"/proc/{pid}").st_uid == uid and live(pid)
        except (FileNotFoundError, ProcessLookupError):
            return False

    assert not any(live(p) for p in pids)
    # containers/storage's index (read directly: a podman command would start the user's
    # pause process again)
    index = user.home / ".local/share/containers/storage/vfs-containers/containers.json"
    assert box.id not in {record["id"] for record in json.loads(index.read_text())}
    # the last fixture using the user also stops its podman; if another is still running
    # (a parallel session, this module's shared container), its lock is held
    fd = os.open(cache.cache_dir() / f"{ACTIVE_LOCK}.lock", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            someone_else = False
        except BlockingIOError:
            someone_else = True
    finally:
        os.close(fd)
    if not someone_else:
        assert not user.runtime_dir.exists()
        assert not [p for p in os.listdir("/proc") if p.isdigit() and live_as(int(p), user.uid)]


def test_the_container_is_the_users_not_roots(pod: RootlessPodmanContainer) -> None:
    user = user_of(pod)
    with open(f"/proc/{pod.pid}/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f)
    assert status["Uid"].split()[0] == str(user.uid)
    assert id_map(f"/proc/{pod.pid}/uid_map") == [
        [0, user.uid, 1],
        [1, user.subuids.first, user.subuids.count],
    ]
    assert id_map(f"/proc/{pod.pid}/gid_map") == [
        [0, user.gid, 1],
        [1, user.subgids.first, user.subgids.count],
    ]
    # root's podman has no such container: finding it needs asking as the user
    ours = subprocess.run(
        ["podman", "container", "exists", pod.name], capture_output=True, timeout=30
    )
    assert ours.returncode == 1, ours.stderr


def test_resolved_by_name_id_and_prefix_as_the_owning_user(pod: RootlessPodmanContainer) -> None:
    user = user_of(pod)
    for name in (pod.name, pod.id, pod.id[:12]):
        with resolve(name, ["podman"]) as target:
            assert target.pid == pod.pid, name
            assert target.detail == f"podman (rootless, user {user.name})"
            assert target.alive()
    # the default order: the name through podman; the full id already through runc's
    # rootless state root, /run/user/UID/runc
    with resolve(pod.name) as target:
        assert (target.engine, target.pid) == ("podman", pod.pid)
    with resolve(pod.id) as target:
        assert (target.engine, target.pid) == ("runc", pod.pid)
        assert target.detail == f"{user.runtime_dir}/runc/{pod.id}/state.json"


def inner_pids(pid: int) -> set[int]:
    """The container's processes at rest, by their pid inside its namespace (NSpid)."""
    found = set()
    for host_pid in settled_pids_in_ns(pid_ns(pid)):
        with open(f"/proc/{host_pid}/status") as f:
            found.add(int(next(line for line in f if line.startswith("NSpid:")).split()[-1]))
    return found


def test_attach_sees_only_the_container_and_its_root(pod: RootlessPodmanContainer) -> None:
    before = Snapshot.take(pod.pid)
    result = dvs("attach", "-t", "podman", pod.id, "--", "ps", "-e", "-o", "pid=,comm=")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in text(result).splitlines())
    ps_pids = [int(pid) for pid, comm in rows.items() if comm == "ps"]
    assert len(ps_pids) == 1
    assert {int(pid) for pid in rows} - set(ps_pids) == inner_pids(pod.pid)
    result = dvs(
        "attach", pod.name, "--", "sh", "-c", f"ls -A /var/lib/cntr; cat /var/lib/cntr{MARKER_PATH}"
    )
    assert result.returncode == 0, result.stderr
    *listing, marker = text(result).splitlines()
    assert sorted(listing) == sorted(os.listdir(pod.rootfs))
    assert marker + "\n" == MARKER_TEXT
    after = wait_until_clean(before, pod.pid)
    assert after == before


def test_files_written_from_the_attached_shell_get_the_subordinate_ids(
    pod: RootlessPodmanContainer,
) -> None:
    user = user_of(pod)
    script = (
        "id -u; cat /proc/self/uid_map /proc/self/gid_map; "
        "cd /var/lib/cntr/tmp && echo root > by-root && echo dvs > by-1000 && "
        "chown 1000:1000 by-1000 && stat -c '%u %g' by-root by-1000"
    )
    result = dvs("attach", pod.name, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = text(result).splitlines()
    assert lines[0] == "0"
    shell_maps = [[int(n) for n in line.split()] for line in lines[1:5]]
    assert shell_maps == id_map(f"/proc/{pod.pid}/uid_map") + id_map(f"/proc/{pod.pid}/gid_map")
    assert lines[5:] == ["0 0", "1000 1000"]  # as the container sees them
    # on the host: container root is the user, container 1000 its subordinate id
    by_root = os.stat(pod.rootfs / "tmp/by-root")
    by_1000 = os.stat(pod.rootfs / "tmp/by-1000")
    assert (by_root.st_uid, by_root.st_gid) == (user.uid, user.gid)
    assert (by_1000.st_uid, by_1000.st_gid) == (
        user.subuids.host_id(1000),
        user.subgids.host_id(1000),
    )
    # and podman's own exec (as the user) reads them in the container
    seen = pod.exec(["sh", "-c", "cat /tmp/by-root /tmp/by-1000; stat -c '%U' /tmp/by-1000"])
    assert seen.stdout.decode().split() == ["root", "dvs", "dvs"]


def test_unknown_id_names_the_rootless_user_asked(pod: RootlessPodmanContainer) -> None:
    user = user_of(pod)
    result = dvs("attach", "-t", "podman", "no-such-container-dvs-rootless")
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "no target matches 'no-such-container-dvs-rootless'" in message
    podman_line = next(line for line in message.splitlines() if line.startswith("  - podman: "))
    assert f"as {user.name}: `podman inspect" in podman_line
    assert podman_line.count("no such container") == 2  # root's answer and the user's
    with pytest.raises(TargetNotFound) as info:
        resolve("no-such-container-dvs-rootless", ["podman"])
    assert f"as {user.name}:" in info.value.tried[0]
