"""The syscall shims against the real kernel: namespaces, pidfds, mount API, openat2,
process_vm_*, file handles and spawn. Mount tests work on private temp dirs and always
unmount, also when an assertion fails."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.lowlevel import sys as llsys
from dvs.probe import cgroup2_mount

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def uts_holder() -> Iterator[llsys.Spawned]:
    """A process in its own UTS namespace whose hostname is dvs-shim-test."""
    proc = llsys.spawn(
        ["/bin/sh", "-c", "hostname dvs-shim-test && exec sleep 60"],
        clone_flags=llsys.CLONE_NEWUTS,
    )
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the holder never set its hostname"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()
    proc.close()


def test_spawn_reports_exit_status_and_output() -> None:
    r, w = os.pipe()
    proc = llsys.spawn(["/bin/sh", "-c", "echo out; exit 7"], stdio=(-1, w, -1))
    os.close(w)
    assert proc.wait(10) == 7
    assert os.read(r, 100) == b"out\n"
    os.close(r)
    proc.close()


@pytest.mark.timeout(60)
def test_spawn_sets_credentials_from_a_threaded_parent() -> None:
    """Credentials change in the child while the parent's other threads start and stop
    threads (as a FUSE server's do): glibc's setxid would wait in the child for threads --
    and locks -- it copied but does not have, so the child must use raw syscalls."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            short = threading.Thread(target=lambda: None)
            short.start()
            short.join()

    workers = [threading.Thread(target=churn) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        for _ in range(200):
            r, w = os.pipe()
            proc = llsys.spawn(["/bin/sh", "-c", "echo $(id -u) $(id -g) $(id -G)"],
                               stdio=(-1, w, -1), uid=65534, gid=65533)  # fmt: skip
            os.close(w)
            assert proc.wait(10) == 0
            assert os.read(r, 100).split() == [b"65534", b"65533", b"65533"]
            os.close(r)
            proc.close()
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def test_spawn_names_the_failed_step() -> None:
    with pytest.raises(FileNotFoundError, match="execve"):
        llsys.spawn(["/does/not/exist"])
    bad_fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="setns into namespace #0") as info:
            llsys.spawn(["/bin/true"], ns_fds=[bad_fd])
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(bad_fd)


def test_spawn_joins_namespaces_in_order(uts_holder: llsys.Spawned) -> None:
    ns = os.open(f"/proc/{uts_holder.pid}/ns/uts", os.O_RDONLY)
    r, w = os.pipe()
    try:
        proc = llsys.spawn(["/bin/hostname"], ns_fds=[ns], stdio=(-1, w, -1))
        os.close(w)
        assert proc.wait(10) == 0
        assert os.read(r, 100).strip() == b"dvs-shim-test"
        proc.close()
    finally:
        os.close(ns)
        os.close(r)
    assert socket.gethostname() != "dvs-shim-test"


def test_spawn_user_namespace_maps_written_by_parent() -> None:
    proc = llsys.spawn(
        None, clone_flags=llsys.CLONE_NEWUSER, uid_map="0 100000 1000", gid_map="0 100000 1000"
    )
    try:
        assert Path(f"/proc/{proc.pid}/uid_map").read_text().split() == ["0", "100000", "1000"]
        assert Path(f"/proc/{proc.pid}/gid_map").read_text().split() == ["0", "100000", "1000"]
    finally:
        proc.kill()
        assert proc.wait(10) == -9
        proc.close()


def test_spawn_into_cgroup_v2(tmp_path: Path) -> None:
    unified = cgroup2_mount()
    if unified is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    group = Path(unified, f"dvs-shim-{os.getpid()}")
    group.mkdir()
    fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY)
    try:
        proc = llsys.spawn(None, cgroup_fd=fd)
        try:
            cgroups = Path(f"/proc/{proc.pid}/cgroup").read_text()
            assert f"0::/{group.name}\n" in cgroups
        finally:
            proc.kill()
            proc.wait()
            proc.close()
    finally:
        os.close(fd)
        group.rmdir()


def test_setns_and_unshare_in_a_forked_child(uts_holder: llsys.Spawned) -> None:
    ns = os.open(f"/proc/{uts_holder.pid}/ns/uts", os.O_RDONLY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: single-threaded; only os-level calls until _exit
        try:
            llsys.setns(ns, llsys.CLONE_NEWUTS)
            seen = os.uname().nodename
            llsys.unshare(llsys.CLONE_NEWUTS)
            socket.sethostname("dvs-shim-unshared")
            os.write(w, f"{seen} {os.uname().nodename}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 200).decode()
    os.close(r)
    os.close(ns)
    assert out == "dvs-shim-test dvs-shim-unshared"
    # the holder's namespace was not renamed by the child's unshare
    proc = subprocess.run(
        ["nsenter", "-t", str(uts_holder.pid), "-u", "hostname"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.stdout.strip() == "dvs-shim-test"


def test_pidfds_signal_and_steal_fds() -> None:
    r, w = os.pipe()
    proc = subprocess.Popen(["sleep", "60"], stdin=r)
    try:
        pidfd = llsys.pidfd_open(proc.pid)
        stolen = llsys.pidfd_getfd(pidfd, 0)
        assert os.fstat(stolen).st_ino == os.fstat(r).st_ino
        os.close(stolen)
        llsys.pidfd_send_signal(pidfd, 15)
        assert proc.wait(10) == -15
        with pytest.raises(ProcessLookupError):
            llsys.pidfd_send_signal(pidfd, 15)
        os.close(pidfd)
    finally:
        proc.kill()
        proc.wait()
        os.close(r)
        os.close(w)


def test_pidfd_open_of_a_dead_pid_fails() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        llsys.pidfd_open(proc.pid)


def test_open_tree_move_mount_with_idmap(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "file").write_text("hello")
    os.chown(source / "file", 0, 0)
    holder = llsys.spawn(
        None, clone_flags=llsys.CLONE_NEWUSER, uid_map="0 100000 65536", gid_map="0 100000 65536"
    )
    userns = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY)
    tree = llsys.open_tree(
        llsys.AT_FDCWD, str(source), llsys.OPEN_TREE_CLONE | llsys.OPEN_TREE_CLOEXEC
    )
    try:
        llsys.mount_setattr(
            tree, "", llsys.AT_EMPTY_PATH, attr_set=llsys.MOUNT_ATTR_IDMAP, userns_fd=userns
        )
        llsys.move_mount(tree, "", llsys.AT_FDCWD, str(target), llsys.MOVE_MOUNT_F_EMPTY_PATH)
        try:
            st = (target / "file").stat()
            assert (st.st_uid, st.st_gid) == (100000, 100000)
            assert (target / "file").read_text() == "hello"
            assert (source / "file").stat().st_uid == 0
        finally:
            llsys.umount2(str(target), llsys.MNT_DETACH)
    finally:
        os.close(tree)
        os.close(userns)
        holder.kill()
        holder.wait()
        holder.close()
    assert not (target / "file").exists()


def test_fsopen_fsconfig_fsmount_tmpfs(tmp_path: Path) -> None:
    fs = llsys.fsopen("tmpfs")
    try:
        llsys.fsconfig(fs, llsys.FSCONFIG_SET_STRING, "size", "1m")
        llsys.fsconfig(fs, llsys.FSCONFIG_CMD_CREATE)
        mnt = llsys.fsmount(fs)
    finally:
        os.close(fs)
    try:
        llsys.move_mount(mnt, "", llsys.AT_FDCWD, str(tmp_path), llsys.MOVE_MOUNT_F_EMPTY_PATH)
        try:
            stats = os.statvfs(tmp_path)
            assert stats.f_blocks * stats.f_frsize == 1024 * 1024
            (tmp_path / "x").write_text("in tmpfs")
        finally:
            llsys.umount2(str(tmp_path), llsys.MNT_DETACH)
    finally:
        os.close(mnt)
    assert not (tmp_path / "x").exists()
    with pytest.raises(OSError):
        llsys.fsopen("no-such-filesystem")


def test_openat2_stays_beneath_the_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("inside")
    (tmp_path / "escape").symlink_to("/etc")
    (tmp_path / "absolute").symlink_to("/etc/passwd")
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            llsys.openat2(root, "escape/passwd", os.O_RDONLY, resolve=llsys.RESOLVE_BENEATH)
        assert info.value.errno == errno.EXDEV
        with pytest.raises(OSError):
            llsys.openat2(root, "../etc/passwd", os.O_RDONLY, resolve=llsys.RESOLVE_BENEATH)
        fd = llsys.openat2(root, "absolute", os.O_RDONLY, resolve=llsys.RESOLVE_IN_ROOT)
        assert os.read(fd, 100) == b"inside"
        os.close(fd)
    finally:
        os.close(root)


def test_process_vm_read_write_self_and_child() -> None:
    buf = ctypes.create_string_buffer(b"original-bytes", 32)
    addr = ctypes.addressof(buf)
    me = os.getpid()
    assert llsys.process_vm_read(me, addr, 8) == b"original"
    llsys.process_vm_write(me, addr, b"REWRITE")
    assert buf.value.startswith(b"REWRITE")
    assert llsys.process_vm_read_batch(me, [(addr, 3), (addr + 8, 6)]) == [b"REW", b"-bytes"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child keeps its copy of buf; wait until told to exit
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    try:
        buf.value = b"parent-changed"
        assert llsys.process_vm_read(pid, addr, 7) == b"REWRITE"
        llsys.process_vm_write(pid, addr, b"poked")
        assert llsys.process_vm_read(pid, addr, 5) == b"poked"
        assert buf.value == b"parent-changed"
    finally:
        os.close(r)
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def test_process_vm_read_unmapped_is_an_error() -> None:
    with pytest.raises(OSError) as info:
        llsys.process_vm_read(os.getpid(), 0x10, 16)
    assert info.value.errno == errno.EFAULT


def test_file_handles_survive_renames(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("by handle")
    handle = llsys.name_to_handle_at(llsys.AT_FDCWD, str(tmp_path / "a"))
    os.rename(tmp_path / "a", tmp_path / "b")
    mount_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = llsys.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
        assert os.read(fd, 100) == b"by handle"
        os.close(fd)
    finally:
        os.close(mount_fd)
    os.unlink(tmp_path / "b")
    mount_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            llsys.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(mount_fd)


def test_userfaultfd() -> None:
    fd = llsys.userfaultfd(os.O_CLOEXEC | llsys.UFFD_USER_MODE_ONLY)
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    os.close(fd)
