"""Differential POSIX conformance of CntrFS: the same operations on a native ext4 directory
and on a CntrFS mount of another ext4 directory must give the same results, errnos and trees.

Hypothesis generates sequences of operations (open with various flags, write, read,
truncate, rename with NOREPLACE/EXCHANGE, link, symlink, unlink, mkdir, rmdir, mknod, mkfifo,
chmod with suid/sgid bits, chown, utimens, xattrs in the user/trusted/security namespaces,
access, OFD locks between two open files, readdir while the directory changes). An executor
process (fsops.py) applies them -- as root, or as an unprivileged user with supplementary
groups -- and the test compares everything natively observable.

Documented exceptions, where FUSE itself differs from a native filesystem: st_dev/st_ino
and atime/ctime are not compared (FUSE reports its own device; atime of a passthrough read
updates the backing inode but the kernel's FUSE inode keeps cached attributes for
attr_timeout, and symlinks are cached so their atime does not move). Everything else must be
identical. Differences checked elsewhere, all FUSE's or the kernel's:
- with the writeback cache (no passthrough) SEEK_DATA/SEEK_HOLE are answered by the kernel
  without holes, because dirty pages are not in the backing file yet (test_fs_features);
- when the server dies, requests in flight fail with ECONNABORTED and later ones with
  ENOTCONN (fuse_abort_conn; test_fs_robustness);
- F_GETLK through the mount names the holder's pid when one lock owner holds the conflicting
  range; with several readers it may report pid 0 (OFD locks carry no pid);
- a suid/sgid bit set while an unprivileged writer already has the file open through
  passthrough is not cleared by that writer's later writes (writers that open a suid/sgid
  file are served by the daemon for exactly this reason; test_fs_features).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.probe import ProbeReport
from dvs.testing.fs import cntrfs_mount, world_dir

pytestmark = [pytest.mark.root, pytest.mark.fuse]

FSOPS = Path(__file__).with_name("fsops.py")
USER, GROUP, EXTRA_GROUP = 1000, 1000, 1001

PATHS = ["a", "b", "c", "d", "d/a", "d/b", "d/e", "l", "d/e/f"]
MODES = [0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o2775, 0o1777, 0o640]
XATTRS = ["user.a", "user.b", "trusted.t", "security.dvs"]
# Symlink targets. Operations follow links, so a target outside the compared root is reached
# for real: "../a" lands in each side's own private parent directory (both alike, see the
# fixture), and the absolute target dangles -- an existing absolute target such as
# /etc/passwd let root variants write, truncate and chown the host's file (it happened).
SYMLINK_TARGETS = ["a", "d", "../a", "/nonexistent-dvs-conformance/a", "x"]
OWNERS = [0, USER, 65534]
FIXED_NS = [1_000_000_000 * 10**9, 1_234_567_890_123_456_789]
SEED = [
    ["mkdir", "d", 0o777],
    ["open", "a", "creat", 0o666],
    ["write", "a", 0, "68656c6c6f2c20776f726c64", False],
    ["symlink", "a", "l"],
]

# weighted towards entries the seed creates, so most operations act on something
path = st.sampled_from([*PATHS, "a", "a", "d", "d", "l", "d/a", "d/a"])
op_strategy = st.one_of(
    st.builds(
        lambda p, f, m: ["open", p, f, m],
        path,
        st.sampled_from(
            [
                "creat",
                "excl",
                "trunc",
                "rdonly",
                "append",
                "dir",
                "nofollow",
                "wronly",
                "rdwr_trunc",
            ]
        ),
        st.sampled_from(MODES),
    ),
    st.builds(
        lambda p, o, d, a: ["write", p, o, d.hex(), a],
        path,
        st.integers(0, 70000),
        st.binary(min_size=0, max_size=300),
        st.booleans(),
    ),
    st.builds(lambda p, o, n: ["read", p, o, n], path, st.integers(0, 80000), st.integers(0, 5000)),
    st.builds(lambda p, n: ["truncate", p, n], path, st.integers(0, 100000)),
    st.builds(lambda a, b, f: ["rename", a, b, f], path, path, st.sampled_from([0, 1, 2, 3])),
    st.builds(lambda a, b: ["link", a, b], path, path),
    st.builds(
        lambda t, b: ["symlink", t, b],
        st.sampled_from(SYMLINK_TARGETS),
        path,
    ),
    st.builds(lambda p: ["unlink", p], path),
    st.builds(lambda p: ["rmdir", p], path),
    st.builds(lambda p, m: ["mkdir", p, m], path, st.sampled_from([0o755, 0o700, 0o2777, 0o1777])),
    st.builds(lambda p: ["mkfifo", p], path),
    st.builds(lambda p: ["mknod", p], path),
    st.builds(lambda p, m: ["chmod", p, m], path, st.sampled_from(MODES)),
    st.builds(
        lambda p, u, g, f: ["chown", p, u, g, f],
        path,
        st.sampled_from([*OWNERS, -1]),
        st.sampled_from([0, GROUP, EXTRA_GROUP, 65534, -1]),
        st.booleans(),
    ),
    st.builds(
        lambda p, a, m, f: ["utime", p, a, m, f],
        path,
        st.sampled_from(FIXED_NS),
        st.sampled_from(FIXED_NS),
        st.booleans(),
    ),
    st.builds(lambda p, f: ["stat", p, f], path, st.booleans()),
    st.builds(
        lambda p, n, v, f: ["setxattr", p, n, v.hex(), f],
        path,
        st.sampled_from(XATTRS),
        st.binary(max_size=64),
        st.sampled_from([0, 1, 2]),
    ),
    st.builds(lambda p, n: ["getxattr", p, n], path, st.sampled_from(XATTRS)),
    st.builds(lambda p: ["listxattr", p], path),
    st.builds(lambda p, n: ["removexattr", p, n], path, st.sampled_from(XATTRS)),
    st.builds(lambda p, m: ["access", p, m], path, st.sampled_from([0, 1, 2, 4, 6, 7])),
    st.builds(lambda p: ["readlink", p], path),
    st.builds(
        lambda p, i: ["readdir_mutating", p, i], st.sampled_from(["", "d"]), st.integers(0, 9)
    ),
    st.builds(
        lambda p, k, n: ["locks", p, k, n], path, st.sampled_from(["r", "w"]), st.integers(0, 9)
    ),
)


class Executor:
    """fsops.py in a child process, optionally as an unprivileged user."""

    def __init__(self, user: int | None) -> None:
        kwargs: dict[str, Any] = {}
        python = sys.executable
        if user is not None:
            kwargs = {"user": user, "group": GROUP, "extra_groups": [EXTRA_GROUP]}
            # the executor needs only the standard library; our interpreter may sit
            # below /root, which other users cannot enter
            python = shutil.which("python3", path="/usr/bin:/bin") or python
        self.proc = subprocess.Popen(
            [python, str(FSOPS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            **kwargs,
        )

    def run(self, root: Path, ops: list[list[Any]]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"root": str(root), "ops": ops}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the executor died"
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _empty(root: Path) -> None:
    """Remove everything below root (through the mount when root is the mount)."""
    for entry in os.scandir(root):
        full = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            for dirpath, dirnames, _ in os.walk(full):
                for name in dirnames:  # os.walk lists symlinks to directories here too
                    sub = os.path.join(dirpath, name)
                    if not os.path.islink(sub):
                        os.chmod(sub, 0o700)
            os.chmod(full, 0o700)
            shutil.rmtree(full)
        else:
            full.unlink()


@pytest.fixture(
    params=[
        f"{who}-{io}-{transport}"
        for who, io in (("root", "passthrough"), ("root", "writeback"), ("user", "passthrough"))
        for transport in ("dev", "ring")
    ]
)
def setup(
    request: pytest.FixtureRequest, host: ProbeReport
) -> Iterator[tuple[Executor, Path, Path, str]]:
    """Every variant over both transports: /dev/fuse read/write and FUSE over io_uring."""
    variant: str = request.param
    user = USER if variant.startswith("user") else None
    options = "nopassthrough" if "-writeback" in variant else ""
    if variant.endswith("-ring"):
        if host.fuse.over_io_uring == "absent":
            pytest.skip("the kernel has no FUSE over io_uring")
        options += ",uring=on,enable_uring"
    else:
        options += ",uring=off"
    # the native root sits one level down in a private directory, like the mount's source
    # (cntrfs_mount's top/src), so "../a" resolves to a parent with the same owner and mode
    native_top = world_dir("dvs-native-")
    native = native_top / "src"
    native.mkdir()
    host_files = _host_files_fingerprint()
    with cntrfs_mount(options) as m:
        assert m.source.parent.stat().st_mode == native_top.stat().st_mode
        transport = m.fs.negotiated.transport if m.fs.negotiated else None
        assert transport == ("uring" if variant.endswith("-ring") else "dev")
        for root in (native, m.source):
            root.chmod(0o777 if user is None else 0o755)
            if user is not None:
                os.chown(root, USER, GROUP)
        executor = Executor(user)
        try:
            yield executor, native, m.mountpoint, variant
        finally:
            executor.close()
            shutil.rmtree(native_top, ignore_errors=True)
            assert _host_files_fingerprint() == host_files, "the suite changed a host file"
        stats = m.fs.stats()
        # over the ring, the operations really arrived in ring entries; otherwise none did
        assert (stats.ring_requests > 0) == variant.endswith("-ring"), stats


def _host_files_fingerprint() -> list[tuple[str, int, int, int, int, bytes]]:
    """What the operations must never reach: host files an escaping link could name."""
    out = []
    for name in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hosts"):
        st_ = os.stat(name)
        content = Path(name).read_bytes()
        out.append((name, st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size, content))
    return out


def _differences(native: Any, mounted: Any) -> list[str]:
    out = []
    for i, (a, b) in enumerate(zip(native["results"], mounted["results"], strict=True)):
        if a != b:
            out.append(f"op {i}: native {a} != mount {b}")
    if native["tree"] != mounted["tree"]:
        for key in sorted(set(native["tree"]) | set(mounted["tree"])):
            a, b = native["tree"].get(key), mounted["tree"].get(key)
            if a != b:
                out.append(f"tree {key}: native {a} != mount {b}")
    return out


@pytest.mark.timeout(600)
@settings(
    # DVS_CONFORMANCE_EXAMPLES=5000 for a long soak; the default keeps CI within budget
    max_examples=int(os.environ.get("DVS_CONFORMANCE_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op_strategy, min_size=1, max_size=14))
def test_same_results_natively_and_through_cntrfs(
    setup: tuple[Executor, Path, Path, str], ops: list[list[Any]]
) -> None:
    executor, native, mount, variant = setup
    _empty(native)
    _empty(mount)
    sequence = SEED + ops
    expected = executor.run(native, sequence)
    got = executor.run(mount, sequence)
    problems = _differences(expected, got)
    assert not problems, f"[{variant}] ops {sequence}:\n" + "\n".join(problems)


def test_executor_sees_real_differences(setup: tuple[Executor, Path, Path, str]) -> None:
    """The comparison can fail: a tree that differs is reported (guards the harness)."""
    executor, native, mount, _ = setup
    _empty(native)
    _empty(mount)
    a = executor.run(native, [["mkdir", "d", 0o755]])
    b = executor.run(mount, [["mkdir", "d", 0o700]])
    assert _differences(a, b)
    assert stat.S_ISDIR(b["tree"]["d"]["mode"])
