"""CntrFS features a user of the mount relies on, each checked on a real mount against the
backing directory or the native behaviour: passthrough (reads that never reach the daemon),
O_DIRECT, O_TMPFILE, statfs, fallocate/SEEK_DATA/SEEK_HOLE/copy_file_range, xattrs and
POSIX ACLs, rename flags, device nodes and FIFOs, hard links, export handles, fsync vs
fdatasync, and the suid/sgid clearing of write and chown.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvs.lowlevel import sys as llsys
from dvs.testing.fs import cntrfs_mount, world_dir, world_tempdir

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]

libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
SEEK_DATA, SEEK_HOLE = 3, 4
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _call(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def renameat2(src: Path, dst: Path, flags: int) -> None:
    _call(libc.renameat2(-100, bytes(src), -100, bytes(dst), flags))


@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_reads_bypass_the_daemon_only_with_passthrough(options: str) -> None:
    data = os.urandom(4 << 20)
    with cntrfs_mount(options) as m:
        (m.source / "big").write_bytes(data)
        assert (m.mountpoint / "big").read_bytes() == data
        st = m.fs.stats()
        if options:
            assert not m.fs.negotiated or not m.fs.negotiated.passthrough
            assert st.bytes_read >= len(data)
            assert st.passthrough_opens == 0
        else:
            assert m.fs.negotiated and m.fs.negotiated.passthrough
            assert st.passthrough_opens >= 1
            assert st.bytes_read == 0  # the kernel read the backing file itself


def test_negotiation_is_logged_and_degrades_explicitly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dvs.fs")
    with cntrfs_mount("nopassthrough") as m:
        assert m.fs.negotiated is not None
        assert m.fs.negotiated.writeback and not m.fs.negotiated.passthrough
        assert m.fs.negotiated.max_write == 1 << 20
    assert "passthrough switched off by configuration" in caplog.text
    caplog.clear()
    with cntrfs_mount() as m:
        assert m.fs.negotiated is not None and m.fs.negotiated.passthrough
        assert not m.fs.negotiated.writeback
    assert "writeback cache off: it excludes passthrough" in caplog.text
    assert "passthrough on" in caplog.text


@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_o_direct_reads_and_writes(options: str) -> None:
    with cntrfs_mount(options) as m:
        path = m.mountpoint / "direct"
        buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT needs
        pattern = os.urandom(1 << 16)
        buf.write(pattern)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        try:
            assert os.pwritev(fd, [buf], 0) == len(pattern)
            back = mmap.mmap(-1, 1 << 16)
            assert os.preadv(fd, [back], 0) == len(pattern)
            assert bytes(back) == pattern
        finally:
            os.close(fd)
        assert (m.source / "direct").read_bytes() == pattern


def test_o_tmpfile_then_linked_into_the_tree() -> None:
    with cntrfs_mount() as m:
        fd = os.open(m.mountpoint, os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            os.write(fd, b"anonymous until linked")
            assert os.listdir(m.source) == []
            # linkat(fd, "", AT_EMPTY_PATH): link(/proc/self/fd/N) is refused with EXDEV
            # on this machine's mount setup, natively as well
            _call(libc.linkat(fd, b"", -100, bytes(m.mountpoint / "named"), 0x1000))
        finally:
            os.close(fd)
        assert (m.source / "named").read_bytes() == b"anonymous until linked"
        assert stat.S_IMODE((m.source / "named").stat().st_mode) == 0o640


def test_statfs_is_the_backing_filesystems() -> None:
    with cntrfs_mount() as m:
        mine, theirs = os.statvfs(m.mountpoint), os.statvfs(m.source)
        assert (mine.f_bsize, mine.f_blocks, mine.f_files, mine.f_namemax) == (
            theirs.f_bsize,
            theirs.f_blocks,
            theirs.f_files,
            theirs.f_namemax,
        )
        assert abs(mine.f_bfree - theirs.f_bfree) < theirs.f_blocks // 100


@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_fallocate_holes_and_copy_file_range(options: str) -> None:
    with world_tempdir("dvs-native-") as native, cntrfs_mount(options) as m:
        results = []
        for root in (native, m.mountpoint):
            fd = os.open(root / "sparse", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                os.pwrite(fd, b"A" * 8192, 0)
                os.pwrite(fd, b"B" * 4096, 1 << 20)
                _call(libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096))
                os.posix_fallocate(fd, 2 << 20, 65536)
                os.fsync(fd)
                offsets = [
                    os.lseek(fd, 0, SEEK_DATA),
                    os.lseek(fd, 4096, SEEK_HOLE),
                    os.lseek(fd, 8192, SEEK_DATA),
                ]
                out = os.open(root / "copy", os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    copied = os.copy_file_range(fd, out, 12288, 0, 0)
                    data = os.pread(out, 12288, 0)
                finally:
                    os.close(out)
                results.append((offsets, os.fstat(fd).st_size, copied, data))
            finally:
                os.close(fd)
        if options == "nopassthrough":
            # writeback cache: the kernel answers SEEK_DATA/SEEK_HOLE itself, without holes
            # (the backing file may lack dirty data) -- a documented exception
            offsets, size, copied, data = results[1]
            assert offsets == [0, size, 8192]
            assert results[1][1:] == results[0][1:]
        else:
            assert results[0] == results[1]
        assert results[1][3] == bytes(4096) + b"A" * 4096 + bytes(4096)


def test_xattrs_in_every_namespace_reach_the_backing_file() -> None:
    with cntrfs_mount() as m:
        f = m.mountpoint / "f"
        f.write_text("x")
        for name in ("user.dvs", "trusted.dvs", "security.dvs"):
            os.setxattr(f, name, name.encode())
            assert os.getxattr(m.source / "f", name) == name.encode()
        assert set(os.listxattr(f)) >= {"user.dvs", "trusted.dvs", "security.dvs"}
        os.removexattr(f, "user.dvs")
        assert "user.dvs" not in os.listxattr(m.source / "f")
        with pytest.raises(OSError) as exc:
            os.getxattr(f, "user.missing")
        assert exc.value.errno == errno.ENODATA
        os.symlink("f", m.mountpoint / "l")
        os.setxattr(m.mountpoint / "l", "trusted.link", b"on the link", follow_symlinks=False)
        assert os.getxattr(m.source / "l", "trusted.link", follow_symlinks=False) == b"on the link"
        assert "trusted.link" not in os.listxattr(m.source / "f")


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER, UNDEFINED = 0x01, 0x02, 0x04, 0x10, 0x20, 0xFFFFFFFF


def test_posix_acls_are_enforced_by_the_kernel() -> None:
    with cntrfs_mount() as m:
        secret = m.mountpoint / "secret"
        secret.write_text("for 1000 only")
        secret.chmod(0o600)
        reader = [sys.executable, "-c", f"print(open({str(secret)!r}).read())"]
        python = "/usr/bin/python3"
        reader[0] = python
        denied = subprocess.run(reader, user=1000, group=1000, capture_output=True, text=True)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        acl = _acl(
            [
                (USER_OBJ, 6, UNDEFINED),
                (USER, 4, 1000),
                (GROUP_OBJ, 0, UNDEFINED),
                (MASK, 4, UNDEFINED),
                (OTHER, 0, UNDEFINED),
            ]
        )
        os.setxattr(secret, "system.posix_acl_access", acl)
        assert os.getxattr(m.source / "secret", "system.posix_acl_access") == acl
        time.sleep(0.01)
        allowed = subprocess.run(reader, user=1000, group=1000, capture_output=True, text=True)
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout.strip() == "for 1000 only"


def test_default_acl_wins_over_umask_on_create() -> None:
    with cntrfs_mount() as m:
        d = m.mountpoint / "shared"
        d.mkdir()
        acl = _acl([(USER_OBJ, 7, UNDEFINED), (GROUP_OBJ, 7, UNDEFINED), (OTHER, 7, UNDEFINED)])
        os.setxattr(d, "system.posix_acl_default", acl)
        old = os.umask(0o077)
        try:
            (d / "f").write_text("")
            os.mkdir(d / "sub")
        finally:
            os.umask(old)
        # default ACL: the umask is ignored, the mode comes from the ACL and open()'s mode
        assert stat.S_IMODE((m.source / "shared" / "f").stat().st_mode) == 0o666
        assert stat.S_IMODE((m.source / "shared" / "sub").stat().st_mode) == 0o777
        old = os.umask(0o077)
        try:
            (m.mountpoint / "plain").write_text("")
        finally:
            os.umask(old)
        assert stat.S_IMODE((m.source / "plain").stat().st_mode) == 0o600


def test_rename_noreplace_and_exchange() -> None:
    with cntrfs_mount() as m:
        a, b = m.mountpoint / "a", m.mountpoint / "b"
        a.write_text("A")
        b.write_text("B")
        with pytest.raises(OSError) as exc:
            renameat2(a, b, RENAME_NOREPLACE)
        assert exc.value.errno == errno.EEXIST
        renameat2(a, b, RENAME_EXCHANGE)
        assert (m.source / "a").read_text() == "B" and (m.source / "b").read_text() == "A"
        with pytest.raises(OSError) as exc:
            renameat2(a, m.mountpoint / "none", RENAME_EXCHANGE)
        assert exc.value.errno == errno.ENOENT


def test_device_nodes_and_fifos() -> None:
    with cntrfs_mount() as m:
        os.mknod(m.mountpoint / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        st = (m.source / "null").stat()
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
        assert (m.mountpoint / "null").stat().st_rdev == st.st_rdev
        with open(m.mountpoint / "null", "wb") as f:  # the device itself, through the mount
            f.write(b"discarded")
        assert (m.mountpoint / "null").read_bytes() == b""
        os.mkfifo(m.mountpoint / "fifo")
        assert stat.S_ISFIFO((m.source / "fifo").stat().st_mode)
        r = os.open(m.mountpoint / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(m.mountpoint / "fifo", os.O_WRONLY)
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
        os.close(r)
        os.close(w)


def test_hard_links_are_one_inode() -> None:
    with cntrfs_mount() as m:
        (m.mountpoint / "a").write_text("same")
        os.link(m.mountpoint / "a", m.mountpoint / "b")
        sa, sb = os.stat(m.mountpoint / "a"), os.stat(m.mountpoint / "b")
        assert sa.st_ino == sb.st_ino == os.stat(m.source / "a").st_ino
        assert sa.st_nlink == 2
        (m.mountpoint / "b").write_text("changed")
        assert (m.mountpoint / "a").read_text() == "changed"
        # readdir's d_ino and stat's st_ino agree (CNTR reported different numbers)
        inos = {e.name: e.inode() for e in os.scandir(m.mountpoint)}
        assert inos["a"] == sa.st_ino


def test_export_handles_work_on_the_mount(tmp_path: Path) -> None:
    with cntrfs_mount() as m:
        (m.mountpoint / "dir").mkdir()
        target = m.mountpoint / "dir" / "file"
        target.write_text("found by handle")
        handle = llsys.name_to_handle_at(llsys.AT_FDCWD, str(target))
        mount_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = llsys.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
            assert os.read(fd, 100) == b"found by handle"
            os.close(fd)
            # make the kernel forget the inode, then resolve the handle again
            before = m.fs.stats().inodes
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            deadline = time.monotonic() + 5
            while m.fs.stats().inodes >= before and time.monotonic() < deadline:
                time.sleep(0.05)
            fd = llsys.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
            assert os.read(fd, 100) == b"found by handle"
            os.close(fd)
        finally:
            os.close(mount_fd)


def test_fsync_and_fdatasync_keep_their_meaning(tmp_path: Path) -> None:
    """strace the server: fdatasync() through the mount must reach the backing file as
    fdatasync, fsync() as fsync (CNTR swapped them)."""
    src, mnt = world_dir("dvs-sync-src-"), world_dir("dvs-sync-mnt-")
    trace = tmp_path / "trace"
    server = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "dvs",
            "fs",
            "mount",
            "-f",
            "-o",
            "nopassthrough",
            str(src),
            str(mnt),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "mounted" in server.stdout.readline()
        fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x")
        trace.write_text("")
        os.fdatasync(fd)
        time.sleep(0.2)
        after_datasync = trace.read_text()
        os.fsync(fd)
        time.sleep(0.2)
        after_fsync = trace.read_text()
        os.close(fd)
    finally:
        subprocess.run([sys.executable, "-m", "dvs", "fs", "umount", "-l", str(mnt)], check=False)
        server.wait(timeout=30)
        shutil.rmtree(src, ignore_errors=True)
        if not os.path.ismount(mnt):
            shutil.rmtree(mnt, ignore_errors=True)
    assert "fdatasync(" in after_datasync and " fsync(" not in after_datasync
    assert " fsync(" in after_fsync.replace(after_datasync, "")


@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_suid_and_sgid_cleared_like_the_kernel_does(options: str) -> None:
    """An unprivileged write clears suid (and sgid with group-exec); chown clears both."""
    with world_tempdir("dvs-native-") as native, cntrfs_mount(options) as m:
        modes = {}
        for root in (native, m.mountpoint):
            for name in ("w", "c"):
                p = root / name
                p.write_text("#!/bin/sh\n")
                os.chown(p, 1000, 1000)
                os.chmod(p, 0o6775)
            writer = subprocess.run(
                ["/usr/bin/python3", "-c", f"open({str(root / 'w')!r}, 'a').write('more')"],
                user=1000,
                group=1000,
                capture_output=True,
                text=True,
            )
            assert writer.returncode == 0, writer.stderr
            os.chown(root / "c", 1000, 1001)
            time.sleep(0.05)
            modes[root] = (
                stat.S_IMODE(os.stat(root / "w").st_mode),
                stat.S_IMODE(os.stat(root / "c").st_mode),
            )
        assert modes[native] == (0o775, 0o775)
        assert modes[m.mountpoint] == modes[native]
        assert stat.S_IMODE((m.source / "w").stat().st_mode) == 0o775


SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("PRAGMA journal_mode=" + sys.argv[3])
for i in range(100):
    with db:
        db.execute("INSERT INTO t VALUES (?, ?)", (sys.argv[2], i))
db.close()
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_with_concurrent_writers(journal: str) -> None:
    """A database on the mount, three processes writing at once: SQLite's POSIX locks must
    really exclude each other through the server (or rows and integrity are lost)."""
    import sqlite3

    with cntrfs_mount() as m:
        path = m.mountpoint / "db.sqlite"
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA journal_mode={journal}")
        db.execute("CREATE TABLE t (writer TEXT, n INTEGER)")
        db.commit()
        db.close()
        writers = [
            subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(path), name, journal])
            for name in ("a", "b", "c")
        ]
        for w in writers:
            assert w.wait(timeout=90) == 0
        db = sqlite3.connect(m.source / "db.sqlite")  # read back natively
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = dict(db.execute("SELECT writer, count(*) FROM t GROUP BY writer").fetchall())
        db.close()
        assert counts == {"a": 100, "b": 100, "c": 100}
        assert m.fs.stats().by_opcode.get("SETLK", 0) > 0  # the locks went through the server


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def _list_with_seeks(path: Path, marks: tuple[int, ...]) -> tuple[list[bytes], dict[int, bytes]]:
    """readdir() to the end remembering telldir() at some entries, then seekdir() back."""
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = libc.telldir.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    d = libc.opendir(bytes(path))
    assert d
    names: list[bytes] = []
    positions = {}
    while True:
        if len(names) in marks:
            positions[len(names)] = libc.telldir(d)
        entry = libc.readdir(d)
        if not entry:
            break
        names.append(entry.contents.d_name)
    again = {}
    for index, position in positions.items():
        libc.seekdir(d, position)
        again[index] = libc.readdir(d).contents.d_name
    libc.closedir(d)
    return names, again


def test_telldir_seekdir_on_a_large_directory() -> None:
    """Without caching every readdir reaches the server, which must honour the offsets."""
    with cntrfs_mount("timeout=0") as m:
        for i in range(2000):
            (m.source / f"entry{i:05d}").touch()
        marks = (10, 500, 1500)
        native, native_seeks = _list_with_seeks(m.source, marks)
        mounted, mounted_seeks = _list_with_seeks(m.mountpoint, marks)
        assert mounted == native  # same entries, same order (the backing directory's)
        assert mounted_seeks == {k: mounted[k] for k in marks} == native_seeks
