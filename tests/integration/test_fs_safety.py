"""Path safety: nothing done through the mount can make the server touch a file outside the
served directory -- not symlinks swapped in on the backing store while requests run, not
directories swapped for symlinks, not "..".

How a server-side escape is told apart from the caller legitimately following a symlink:
the caller runs chrooted into a directory that holds the mount, and the hostile symlinks
are absolute. Followed by the caller, "/protected/secret" resolves inside the chroot, to a
decoy; followed by the server (which lives in the host's root), it would hit the real
protected file. The real one must never change, whatever the race produced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from dvs.fs.server import CntrFs, MountOptions
from dvs.lowlevel import fuse as llfuse
from dvs.testing.fs import world_dir

pytestmark = [pytest.mark.root, pytest.mark.fuse]
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    libc.renameat2(-100, bytes(a), -100, bytes(b), RENAME_EXCHANGE)


def _caller(jail: Path, deadline: float) -> None:
    """Child process: chrooted into the jail, hammer the mount by name."""
    os.chroot(jail)
    os.chdir("/")
    count = 0
    ops = [
        lambda: os.write(os.open("/mnt/D/target", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), b"owned"),
        lambda: os.chmod("/mnt/D/target", 0o777),
        lambda: os.setxattr("/mnt/D/target", "user.owned", b"1"),
        lambda: os.truncate("/mnt/D/target", 0),
        lambda: os.mkdir("/mnt/D/newdir"),
        lambda: os.rmdir("/mnt/D/newdir"),
        lambda: os.link("/mnt/D/target", "/mnt/D/hard"),
        lambda: os.unlink("/mnt/D/hard"),
        lambda: os.rename("/mnt/D/target", "/mnt/D/moved"),
        lambda: os.rename("/mnt/D/moved", "/mnt/D/target"),
        lambda: os.utime("/mnt/D/target", (1, 1)),
        lambda: os.listdir("/mnt/D"),
        lambda: os.mkfifo("/mnt/D/fifo"),
        lambda: os.unlink("/mnt/D/fifo"),
    ]
    while time.monotonic() < deadline:
        for op in ops:
            with contextlib.suppress(OSError):
                op()
            count += 1
    os._exit(0 if count > 100 else 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options", ["timeout=0", "timeout=0,nopassthrough"])
def test_symlink_and_directory_swaps_never_reach_outside(options: str) -> None:
    top = world_dir("dvs-safety-")
    try:
        protected = top / "protected"  # the host's view: outside the served tree
        protected.mkdir()
        secret = protected / "secret"
        secret.write_text("untouched")
        before = (secret.read_text(), secret.stat().st_mode, secret.stat().st_mtime_ns)
        jail = top / "jail"  # the caller's root; it has a decoy at the same path
        (jail / "mnt").mkdir(parents=True)
        decoy = jail / str(protected).lstrip("/")
        decoy.mkdir(parents=True)
        (decoy / "secret").write_text("decoy")
        src = top / "src"
        (src / "D").mkdir(parents=True)
        (src / "D" / "target").write_text("inside")
        (src / "Dreal").mkdir()
        swaps = 0
        with CntrFs(src, MountOptions.parse(options)) as fs:
            fs.mount(jail / "mnt")
            stop = time.monotonic() + 3
            pid = os.fork()
            if pid == 0:
                try:
                    _caller(jail, stop)
                finally:
                    os._exit(2)
            (src / "link_file").symlink_to(secret)
            (src / "link_dir").symlink_to(protected)
            while time.monotonic() < stop:
                # the hostile side works on the backing store directly: the name is
                # missing (a create is sent), then a symlink appears under it ...
                for _ in range(20):
                    with contextlib.suppress(OSError):
                        os.unlink(src / "D" / "target")
                    with contextlib.suppress(OSError):
                        os.symlink(secret, src / "D" / "target")
                    with contextlib.suppress(OSError):
                        os.unlink(src / "D" / "target")
                # ... or files and directories are exchanged with symlinks
                _exchange(src / "D" / "target", src / "link_file")
                _exchange(src / "D", src / "link_dir")
                _exchange(src / "D", src / "link_dir")
                _exchange(src / "D" / "target", src / "link_file")
                _exchange(src / "D", src / "Dreal")
                _exchange(src / "D", src / "Dreal")
                swaps += 1
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        assert swaps > 100
        after = (secret.read_text(), secret.stat().st_mode, secret.stat().st_mtime_ns)
        assert after == before
        assert os.listxattr(secret) == []
        assert sorted(os.listdir(protected)) == ["secret"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _req(opcode: int, arg: bytes, nodeid: int, unique: int = 9) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(arg), opcode, unique, nodeid, 0, 0, 0, 0, 0) + arg


def _reply(raw: llfuse.RawServer, data: bytes) -> tuple[int, bytes]:
    reply = raw.fuzz_request(data)
    assert reply is not None
    _, error, _ = struct.unpack_from("<IiQ", reply)
    return error, reply[16:]


def test_dotdot_and_bad_names_never_leave_the_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    raw = llfuse.RawServer(str(src), flags=llfuse.NO_DEVICE)
    raw.start()
    try:
        init = struct.pack("<IIIII", 7, 45, 131072, 0x40000000 | 0x10, 0) + bytes(44)
        assert _reply(raw, _req(26, init, 0))[0] == 0
        root_ino = os.stat(src).st_ino
        # ".." of the root is the root (the export code asks for it)
        error, entry = _reply(raw, _req(1, b"..\0", 1))
        assert error == 0
        assert struct.unpack_from("<Q", entry, 40)[0] == root_ino  # attr.ino
        error, entry = _reply(raw, _req(1, b"sub\0", 1))
        assert error == 0
        sub = struct.unpack_from("<Q", entry)[0]
        error, entry = _reply(raw, _req(1, b"..\0", sub))
        assert error == 0 and struct.unpack_from("<Q", entry, 40)[0] == root_ino
        # the directory is moved out of the served tree: its ".." is refused
        os.rename(src / "sub", tmp_path / "moved")
        assert _reply(raw, _req(1, b"..\0", sub))[0] == -errno.EACCES
        # names are one component: no "/" and no "." or ".." where a new entry is made
        assert _reply(raw, _req(1, b"a/b\0", 1))[0] == -errno.EINVAL
        mkdir = struct.pack("<II", 0o755, 0)
        assert _reply(raw, _req(9, mkdir + b"..\0", 1))[0] == -errno.EINVAL
        assert _reply(raw, _req(9, mkdir + b"../x\0", 1))[0] == -errno.EINVAL
        assert _reply(raw, _req(6, b"x/y\0target\0", 1))[0] == -errno.EINVAL
        assert not (tmp_path / "x").exists()
    finally:
        raw.stop()
        raw.free()
