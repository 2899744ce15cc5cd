"""Container attach with ``--backend fuse``: the host's tools served into a real
user-namespaced runc container by CntrFS, the way CNTR 1.x did it.

The container maps its ids 0..65535 to host 100000.. . Through the view the host's root-owned
tools must appear owned by the container's root, files the container's root creates must
land as host root and files of its other users as the matching host ids (CNTR's map-down /
map-up), reads of tools must take the kernel's passthrough path, and nothing of the server
may outlive the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_helpers import dvs, require, text

from dvs.container import PIPE, AttachOptions, Session
from dvs.probe import ProbeReport
from dvs.testing.containers import OciContainer, run_container

pytestmark = [
    pytest.mark.containers,
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def userns_box(host: ProbeReport) -> Iterator[OciContainer]:
    require(host, "runc")
    with run_container("runc", userns=True) as box:
        yield box


@pytest.fixture
def shared() -> Iterator[Path]:
    """A host directory the attached command reaches through the tools view."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="dvs-fs-attach-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def attach(target: OciContainer | int, script: str) -> Session:
    spec = target if isinstance(target, int) else target.id
    return Session(spec, ["sh", "-c", script], options=AttachOptions(backend="fuse"), stdout=PIPE)


def start_as_user(box: OciContainer, uid: int) -> int:
    """A process inside the container running as its user ``uid``; returns its host pid
    (the attached command takes the target's ids, and runc's processes may not setuid)."""
    marker = f"{300 + uid}"
    subprocess.run(
        [*box.runtime_command(), "exec", "-d", "--user", f"{uid}:{uid}", box.id, "sleep", marker],
        check=True,
        stdout=subprocess.DEVNULL,  # the detached process would hold captured pipes open
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    ns = os.readlink(f"/proc/{box.pid}/ns/pid")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                same_ns = os.readlink(f"/proc/{entry}/ns/pid") == ns
            except OSError:
                continue
            if same_ns and argv[:2] == [b"sleep", marker.encode()]:
                return int(entry)
        time.sleep(0.05)
    raise AssertionError("the user process did not start")


def test_ids_are_shifted_both_ways(userns_box: OciContainer, shared: Path) -> None:
    (shared / "hosts_file").write_text("owned by host root")
    alien = shared / "alien"
    alien.write_text("owned by an id the container does not map")
    os.chown(alien, 70000, 70000)
    alien.chmod(0o600)
    script = (
        f"cd {shared}; id -u; stat -c '%u:%g' hosts_file; stat -c '%u' alien; "
        "touch by_root; "
        "cat alien >/dev/null 2>&1 && echo read-alien || echo alien-denied; "
        "grep ' / / ' /proc/self/mountinfo"
    )
    with attach(userns_box, script) as session:
        out, _ = session.communicate(timeout=120)
    assert session.returncode == 0, out
    lines = out.decode().splitlines()
    assert lines[0] == "0"  # the command runs as the container's root
    assert lines[1] == "0:0"  # host root's file shown as the container's root's
    assert lines[2] == "65534"  # unmapped owner: overflow id
    assert (shared / "by_root").stat().st_uid == 0  # container root creates as host root
    assert lines[3] == "alien-denied"  # root of the container has no power over host 70000
    assert " - fuse.dvs " in lines[4]  # the tools side is CntrFS
    # a process of the container's user 1000 (host 101000) creates as the tools' id 1000
    user_pid = start_as_user(userns_box, 1000)
    try:
        with attach(user_pid, f"id -u; touch {shared}/by_user; cat {shared}/hosts_file") as s:
            out, _ = s.communicate(timeout=120)
    finally:
        os.kill(user_pid, 9)
    assert s.returncode == 0, out
    assert out.decode().splitlines() == ["1000", "owned by host root"]
    st = (shared / "by_user").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_tools_are_read_through_passthrough(userns_box: OciContainer, shared: Path) -> None:
    data = os.urandom(8 << 20)
    (shared / "data").write_bytes(data)
    script = f"cat {shared}/data | md5sum; sleep 1"
    seen: dict[str, int] = {}

    def watch(session: Session) -> None:
        while session.returncode is None and session.view is not None:
            stats = session.view.stats()  # type: ignore[attr-defined]
            if stats is not None:
                seen["passthrough_opens"] = stats.passthrough_opens
                seen["bytes_read"] = stats.bytes_read
                seen["requests"] = stats.requests
            threading.Event().wait(0.05)

    with attach(userns_box, script) as session:
        watcher = threading.Thread(target=watch, args=(session,), daemon=True)
        watcher.start()
        out, _ = session.communicate(timeout=120)
        watcher.join(timeout=5)
    import hashlib

    assert out.decode().split()[0] == hashlib.md5(data).hexdigest()
    assert seen["requests"] > 0
    assert seen["passthrough_opens"] >= 1
    assert seen["bytes_read"] < len(data) // 4  # the data did not flow through the daemon


def _cntrfs_mounts(pid: int | str = "self") -> set[str]:
    """CntrFS mounts seen by a process (other sessions' mounts may exist: compare sets)."""
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return {line for line in lines if " - fuse.dvs " in line}


def test_nothing_of_the_server_outlives_the_session(userns_box: OciContainer) -> None:
    host_mounts_before = _cntrfs_mounts()
    threads_before = len(os.listdir("/proc/self/task"))
    fds_before = len(os.listdir("/proc/self/fd"))
    result = dvs("attach", "--backend", "fuse", userns_box.id, "--", "true")
    assert result.returncode == 0, result.stderr
    with attach(userns_box, "ls / >/dev/null") as session:
        session.communicate(timeout=120)
        view = session.view
    assert session.view is None and view is not None
    assert getattr(view, "server", None) is None  # the view stopped its server
    assert len(os.listdir("/proc/self/task")) <= threads_before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert _cntrfs_mounts() <= host_mounts_before
    assert not _cntrfs_mounts(userns_box.pid)
    assert text(result) == ""
