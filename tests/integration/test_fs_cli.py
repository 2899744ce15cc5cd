"""``dvs fs mount`` / ``dvs fs umount`` as a user runs them, and the container-attach seam
(``FuseToolsView``): a detached mount that works wherever it is attached, with the
target's id maps, and that fails fast (ENOTCONN) once the view is closed.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from dvs.fs import FuseToolsView
from dvs.lowlevel import sys as llsys
from dvs.testing.fs import world_dir

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]
DVS = [sys.executable, "-m", "dvs"]


def _daemons_serving(source: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in cmdline and os.fsencode(source) in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture
def dirs() -> tuple[Path, Path]:
    src, mnt = world_dir("dvs-cli-src-"), world_dir("dvs-cli-mnt-")
    yield src, mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    for pid in _daemons_serving(src):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(src, ignore_errors=True)
    if not os.path.ismount(mnt):
        shutil.rmtree(mnt, ignore_errors=True)


def test_daemon_mount_then_umount_ends_the_daemon(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "hello").write_text("world")
    done = subprocess.run([*DVS, "fs", "mount", "-o", "timeout=2", str(src), str(mnt)])
    assert done.returncode == 0  # returns once mounted and initialised
    assert (mnt / "hello").read_text() == "world"
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert f" {mnt} " in mountinfo and "fuse.dvs" in mountinfo
    daemons = _daemons_serving(src)
    assert len(daemons) == 1
    assert subprocess.run([*DVS, "fs", "umount", str(mnt)]).returncode == 0
    deadline = time.monotonic() + 10
    while _daemons_serving(src) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _daemons_serving(src)
    assert not os.path.ismount(mnt)


def test_foreground_mount_stops_on_sigterm(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    server = subprocess.Popen(
        [*DVS, "fs", "mount", "--foreground", "--no-passthrough", str(src), str(mnt)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert "mounted" in server.stdout.readline()
    (mnt / "f").write_text("through the foreground server")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    assert not os.path.ismount(mnt)
    assert (src / "f").read_text() == "through the foreground server"


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent-source", "MNT"], "is not a directory"),
        (["SRC", "/nonexistent-mountpoint"], "is not a directory"),
        (["-o", "bogus", "SRC", "MNT"], "unknown mount option 'bogus'"),
        (["-o", "workers=many", "SRC", "MNT"], "needs an integer"),
        (["-o", "uid_map=0:1", "SRC", "MNT"], "inside:outside:count"),
    ],
)
def test_mount_errors_are_one_clear_line(
    dirs: tuple[Path, Path], args: list[str], message: str
) -> None:
    src, mnt = dirs
    argv = [str(src) if a == "SRC" else str(mnt) if a == "MNT" else a for a in args]
    done = subprocess.run([*DVS, "fs", "mount", *argv], capture_output=True, text=True)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.ismount(mnt)


def test_umount_of_a_busy_mount_and_lazily(dirs: tuple[Path, Path]) -> None:
    src, mnt = dirs
    (src / "f").write_text("x")
    assert subprocess.run([*DVS, "fs", "mount", str(src), str(mnt)]).returncode == 0
    with open(mnt / "f") as busy:
        done = subprocess.run([*DVS, "fs", "umount", str(mnt)], capture_output=True, text=True)
        assert done.returncode == 1 and "busy" in done.stderr.lower()
        assert subprocess.run([*DVS, "fs", "umount", "--lazy", str(mnt)]).returncode == 0
        assert busy.read() == "x"
    deadline = time.monotonic() + 10
    while _daemons_serving(src) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _daemons_serving(src)


# the attach context as container attach passes it: id maps are (inside, outside, length)
IdExtent = namedtuple("IdExtent", "inside outside length")
Ctx = namedtuple("Ctx", "pid uid_map gid_map")


def test_tools_view_is_a_detached_mount_with_the_targets_ids(tmp_path: Path) -> None:
    tools, where = world_dir("dvs-view-tools-"), world_dir("dvs-view-at-")
    try:
        (tools / "tool").write_text("#!/bin/sh\necho tool\n")
        view = FuseToolsView(tools)
        assert view.backend_name == "fuse"
        ctx = Ctx(1, [IdExtent(0, 100000, 65536)], [IdExtent(0, 100000, 65536)])
        mount_fd = view.make_mount_fd(ctx)
        try:
            # attach it (the attach child does this in its own mount namespace)
            llsys.move_mount(
                mount_fd, "", llsys.AT_FDCWD, str(where), llsys.MOVE_MOUNT_F_EMPTY_PATH
            )
        finally:
            os.close(mount_fd)
        assert (where / "tool").read_text().startswith("#!/bin/sh")
        assert (where / "tool").stat().st_uid == 100000  # host root shown as the target's root
        stats = view.stats()
        assert stats is not None and stats.requests > 0
        view.close()
        with pytest.raises(OSError) as exc:
            os.stat(where / "anything-new")
        assert exc.value.errno == errno.ENOTCONN
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(tools, ignore_errors=True)
        if not os.path.ismount(where):
            shutil.rmtree(where, ignore_errors=True)


def test_tools_view_reads_maps_from_the_target_pid() -> None:
    tools, where = world_dir("dvs-view-tools-"), world_dir("dvs-view-at-")
    holder = llsys.spawn(
        None, clone_flags=llsys.CLONE_NEWUSER, uid_map="0 200000 1000", gid_map="0 200000 1000"
    )
    try:
        (tools / "f").write_text("")
        with FuseToolsView(tools) as view:
            mount_fd = view.make_mount_fd(Ctx(holder.pid, None, None))
            try:
                llsys.move_mount(
                    mount_fd, "", llsys.AT_FDCWD, str(where), llsys.MOVE_MOUNT_F_EMPTY_PATH
                )
            finally:
                os.close(mount_fd)
            assert (where / "f").stat().st_uid == 200000
            subprocess.run(["umount", "-l", str(where)], check=True)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.close()
        shutil.rmtree(tools, ignore_errors=True)
        shutil.rmtree(where, ignore_errors=True)
