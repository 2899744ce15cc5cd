"""CntrFS under stress and failure: many threads creating, renaming and unlinking in one
directory; trees far larger than the descriptor limit; unmounting with busy files; the
server killed while a caller waits (the wait ends with ECONNABORTED, every later call fails
with ENOTCONN, nothing hangs); stress-ng's filesystem stressors.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from dvs.lowlevel import sys as llsys
from dvs.testing.fs import cntrfs_mount, world_dir

pytestmark = [pytest.mark.root, pytest.mark.fuse]
DVS_FS_MOUNT = [sys.executable, "-m", "dvs", "fs", "mount"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("options", ["", "nopassthrough"])
def test_threads_creating_renaming_unlinking_in_one_directory(options: str) -> None:
    with cntrfs_mount(options) as m:
        errors: list[BaseException] = []
        stop = time.monotonic() + 4

        def churn(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                while time.monotonic() < stop:
                    a = m.mountpoint / f"f{rnd.randrange(40)}"
                    b = m.mountpoint / f"f{rnd.randrange(40)}"
                    action = rnd.randrange(5)
                    try:
                        if action == 0:
                            with open(a, "ab") as f:
                                f.write(b"%d\n" % seed)
                        elif action == 1:
                            os.rename(a, b)
                        elif action == 2:
                            os.unlink(a)
                        elif action == 3:
                            os.link(a, b)
                        else:
                            os.listdir(m.mountpoint)
                            os.stat(a)
                    except FileNotFoundError:
                        pass
                    except FileExistsError:
                        pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # the mount and the backing directory agree, entry by entry
        assert sorted(os.listdir(m.mountpoint)) == sorted(os.listdir(m.source))
        for name in os.listdir(m.source):
            native, mounted = os.stat(m.source / name), os.stat(m.mountpoint / name)
            assert (native.st_ino, native.st_nlink, native.st_size) == (
                mounted.st_ino,
                mounted.st_nlink,
                mounted.st_size,
            )
            assert (m.mountpoint / name).read_bytes() == (m.source / name).read_bytes()


@pytest.mark.timeout(300)
def test_tree_larger_than_the_descriptor_budget() -> None:
    """Each inode keeps a file handle, not a descriptor: a small budget forces evictions and
    re-opens by handle, and everything still works."""
    with cntrfs_mount("fd_budget=64") as m:
        for d in range(10):
            (m.source / f"d{d}").mkdir()
            for i in range(300):
                (m.source / f"d{d}" / f"f{i}").write_text(f"{d}/{i}")
        for _ in range(2):
            for d in range(10):
                for i in range(300):
                    assert (m.mountpoint / f"d{d}" / f"f{i}").read_text() == f"{d}/{i}"
        st = m.fs.stats()
        assert st.path_fds <= 64 + 16, st
        assert st.fd_evictions > 1000, st
        assert st.handle_opens > 1000, st


@pytest.mark.timeout(300)
def test_more_files_than_root_may_open() -> None:
    """25 000 files, more than RLIMIT_NOFILE (20 000 here, and root cannot raise it), looked
    up and kept in the kernel's cache at once: no EMFILE, the budget holds."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = soft + 5000
    with cntrfs_mount() as m:
        d = m.source / "many"
        d.mkdir()
        for i in range(count):
            (d / str(i)).touch()
        names = os.listdir(m.mountpoint / "many")
        assert len(names) == count
        for name in names:
            os.stat(m.mountpoint / "many" / name)
        st = m.fs.stats()
        assert st.inodes >= count
        assert st.path_fds <= soft // 2 + 16


@pytest.mark.timeout(60)
def test_unmount_with_busy_files() -> None:
    with cntrfs_mount() as m:
        (m.source / "f").write_text("still readable")
        f = open(m.mountpoint / "f")  # noqa: SIM115 - must outlive the unmount below
        try:
            with pytest.raises(OSError) as exc:
                llsys.umount2(str(m.mountpoint), 0)
            assert exc.value.errno == errno.EBUSY
            llsys.umount2(str(m.mountpoint), llsys.MNT_DETACH)
            m.fs.mountpoint = None
            assert not os.path.ismount(m.mountpoint)
            assert f.read() == "still readable"  # the detached mount keeps serving
            assert not m.fs.wait_unmounted(0.2)
        finally:
            f.close()
        assert m.fs.wait_unmounted(10)  # last user gone: the kernel ends the connection


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["uring=off", "uring=on,enable_uring"])
def test_server_killed_while_a_caller_waits_gets_enotconn(transport: str) -> None:
    """Over the ring, the waiter's SETLKW sits in a parked ring entry when the server dies."""
    src, mnt = world_dir("dvs-kill-src-"), world_dir("dvs-kill-mnt-")
    (src / "f").write_bytes(bytes(100))
    server = subprocess.Popen(
        [*DVS_FS_MOUNT, "-f", "-v", "-o", transport, str(src), str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = waiter = None
    try:
        assert server.stdout is not None
        assert "mounted" in server.stdout.readline()
        # the waiter blocks inside the server: a lock held on the backing file
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(src / "f")], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAIT, str(mnt / "f")], stdout=subprocess.PIPE, text=True
        )
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert server.stderr is not None
        log = server.stderr.read()
        assert ("requests travel through io_uring" in log) == ("uring=on" in transport), log
        out = waiter.stdout.readline().strip()
        # the kernel (fuse_abort_conn) ends requests in flight with ECONNABORTED; every
        # request after the abort fails with ENOTCONN
        assert out in (f"error {errno.ECONNABORTED}", f"error {errno.ENOTCONN}"), out
        waiter.wait(timeout=10)
        with pytest.raises(OSError) as exc:
            os.stat(mnt / "never-looked-up")  # not in the kernel's caches: a request
        assert exc.value.errno == errno.ENOTCONN
    finally:
        for proc in (waiter, holder, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(src, ignore_errors=True)
        if not os.path.ismount(mnt):
            shutil.rmtree(mnt, ignore_errors=True)


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""
_WAIT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("acquired", flush=True)
except OSError as exc:
    print("error", exc.errno, flush=True)
"""

STRESSORS = [
    ["--dir", "2", "--dentry", "2", "--rename", "2"],
    ["--link", "2", "--symlink", "2", "--filename", "1", "--getdent", "2"],
    ["--hdd", "2", "--hdd-bytes", "4M", "--seek", "2", "--readahead", "1"],
    ["--fallocate", "2", "--copy-file", "1", "--sync-file", "1", "--io", "1"],
    ["--flock", "2", "--lockf", "2", "--fcntl", "2"],
    ["--xattr", "2", "--chmod", "2", "--chown", "2", "--utime", "2"],
    ["--dirdeep", "1", "--dirdeep-dirs", "1", "--mmap", "1", "--mmap-file", "--mmap-bytes", "4M"],
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", ["", "nopassthrough"])
@pytest.mark.parametrize("stressors", STRESSORS, ids=lambda s: "+".join(s[0::2][:3]))
def test_stress_ng_filesystem_stressors(options: str, stressors: list[str]) -> None:
    if shutil.which("stress-ng") is None:
        pytest.skip("stress-ng is not installed (scripts/setup.sh installs it)")
    with cntrfs_mount(options) as m:
        result = subprocess.run(
            [
                "stress-ng",
                *stressors,
                "--timeout",
                "3s",
                "--temp-path",
                str(m.mountpoint),
                "--verify",
                "--metrics-brief",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fail" not in result.stderr.lower().replace("failed: 0", ""), result.stderr
        # the mount still works and the server did not lose track of anything
        (m.mountpoint / "after").write_text("alive")
        assert (m.source / "after").read_text() == "alive"
        assert m.fs.stats().workers > 0
