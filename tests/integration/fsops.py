"""Filesystem operation executor for the differential conformance suite (test_fs_conformance).

Runs as a separate process -- as root or as an unprivileged user -- and applies a list of
operations to a directory tree, returning each operation's result (a value, or the errno
name) and a snapshot of the resulting tree. The test sends the same list for a native
directory and for a CntrFS mount and compares both answers. Protocol: one JSON request per
line on stdin ({"root": path, "ops": [...]}) -> one JSON answer per line on stdout.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import stat
import struct
import sys
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
FIXED_TIMES_BELOW_NS = 1_500_000_000 * 10**9  # times we set explicitly are older than this

OPEN_FLAGS = {
    "creat": os.O_CREAT | os.O_WRONLY,
    "excl": os.O_CREAT | os.O_EXCL | os.O_WRONLY,
    "trunc": os.O_CREAT | os.O_TRUNC | os.O_RDWR,
    "rdonly": os.O_RDONLY,
    "append": os.O_WRONLY | os.O_APPEND,
    "dir": os.O_RDONLY | os.O_DIRECTORY,
    "nofollow": os.O_RDONLY | os.O_NOFOLLOW,
    "wronly": os.O_WRONLY,
    "rdwr_trunc": os.O_RDWR | os.O_TRUNC,
}


def _renameat2(src: str, dst: str, flags: int) -> None:
    ret = _libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ofd_lock(fd: int, kind: int, start: int, length: int, cmd: int) -> int:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    packed = struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, cmd, packed)
    return struct.unpack("hhqqi4x", out)[0]


F_OFD_GETLK, F_OFD_SETLK = 36, 37


def run_op(root: str, op: list[Any]) -> Any:
    name, args = op[0], op[1:]
    p = lambda rel: os.path.join(root, rel)  # noqa: E731
    if name == "open":
        path, flags, mode = args
        # O_NONBLOCK: a FIFO must not block the executor (regular files ignore it)
        fd = os.open(p(path), OPEN_FLAGS[flags] | os.O_NONBLOCK, mode)
        st = os.fstat(fd)
        os.close(fd)
        return [stat.S_IFMT(st.st_mode), st.st_size]
    if name == "write":
        path, offset, data, append = args
        fd = os.open(p(path), os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if append else 0))
        try:
            n = (
                os.pwrite(fd, bytes.fromhex(data), offset)
                if not append
                else os.write(fd, bytes.fromhex(data))
            )
        finally:
            os.close(fd)
        return n
    if name == "read":
        path, offset, size = args
        fd = os.open(p(path), os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, size, offset).hex()
        finally:
            os.close(fd)
    if name == "truncate":
        os.truncate(p(args[0]), args[1])
        return None
    if name == "rename":
        _renameat2(p(args[0]), p(args[1]), args[2])
        return None
    if name == "link":
        os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        return None
    if name == "symlink":
        os.symlink(args[0], p(args[1]))
        return None
    if name == "unlink":
        os.unlink(p(args[0]))
        return None
    if name == "rmdir":
        os.rmdir(p(args[0]))
        return None
    if name == "mkdir":
        os.mkdir(p(args[0]), args[1])
        return None
    if name == "mkfifo":
        os.mkfifo(p(args[0]), 0o644)
        return None
    if name == "mknod":
        os.mknod(p(args[0]), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return None
    if name == "chmod":
        os.chmod(p(args[0]), args[1])
        return None
    if name == "chown":
        os.chown(p(args[0]), args[1], args[2], follow_symlinks=args[3])
        return None
    if name == "utime":
        os.utime(p(args[0]), ns=(args[1], args[2]), follow_symlinks=args[3])
        return None
    if name == "stat":
        st = os.stat(p(args[0]), follow_symlinks=args[1])
        return _attrs(st)
    if name == "setxattr":
        path, attr, value, flags = args
        os.setxattr(p(path), attr, bytes.fromhex(value), flags, follow_symlinks=False)
        return None
    if name == "getxattr":
        return os.getxattr(p(args[0]), args[1], follow_symlinks=False).hex()
    if name == "listxattr":
        return sorted(os.listxattr(p(args[0]), follow_symlinks=False))
    if name == "removexattr":
        os.removexattr(p(args[0]), args[1], follow_symlinks=False)
        return None
    if name == "access":
        return os.access(p(args[0]), args[1])
    if name == "readlink":
        return os.readlink(p(args[0]))
    if name == "readdir_mutating":
        return _readdir_mutating(p(args[0]), args[1])
    if name == "locks":
        return _locks(p(args[0]), args[1], args[2])
    raise ValueError(f"unknown op {name}")


def _readdir_mutating(path: str, victim_index: int) -> Any:
    """List a directory while removing/adding entries; check POSIX's guarantee here and
    return only what must be identical on every filesystem."""
    before = sorted(os.listdir(path))
    seen = []
    removed = added = None
    with os.scandir(path) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 0 and before:
                victim = before[victim_index % len(before)]
                vpath = os.path.join(path, victim)
                if not os.path.isdir(vpath) or os.path.islink(vpath):
                    os.unlink(vpath)
                    removed = victim
                added = "zz_added"
                with open(os.path.join(path, added), "w"):
                    pass
    stable = set(before) - {removed}
    # POSIX: entries neither removed nor added are returned exactly once
    ok = stable <= set(seen) and len(seen) == len(set(seen))
    ok = ok and set(seen) <= set(before) | {added}
    return [ok, removed, sorted(os.listdir(path))]


def _locks(path: str, kind: str, length: int) -> Any:
    """Two open file descriptions of one file, OFD locks: conflicts must be seen."""
    fd1 = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    fd2 = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        out = []
        first = fcntl.F_WRLCK if kind == "w" else fcntl.F_RDLCK
        _ofd_lock(fd1, first, 0, length, F_OFD_SETLK)
        for second in (fcntl.F_RDLCK, fcntl.F_WRLCK):
            try:
                _ofd_lock(fd2, second, 0, length, F_OFD_SETLK)
                out.append("granted")
                _ofd_lock(fd2, fcntl.F_UNLCK, 0, length, F_OFD_SETLK)
            except OSError as exc:
                out.append(errno.errorcode[exc.errno])
            out.append(_ofd_lock(fd2, fcntl.F_WRLCK, 0, length, F_OFD_GETLK))
        _ofd_lock(fd1, fcntl.F_UNLCK, 0, 0, F_OFD_SETLK)
        out.append(_ofd_lock(fd2, fcntl.F_WRLCK, 0, 0, F_OFD_GETLK))
        return out
    finally:
        os.close(fd1)
        os.close(fd2)


def _attrs(st: os.stat_result) -> dict[str, Any]:
    attrs = {
        "mode": st.st_mode,
        "nlink": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None,
        "rdev": st.st_rdev,
    }
    if st.st_mtime_ns < FIXED_TIMES_BELOW_NS:
        attrs["mtime_ns"] = st.st_mtime_ns
    return attrs


def snapshot(root: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            try:
                st = os.lstat(full)
            except OSError as exc:  # e.g. a directory the caller may not search
                tree[rel] = {"error": errno.errorcode[exc.errno or 0]}
                continue
            entry = _attrs(st)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(full)
            elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o444:
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)
                    with open(fd, "rb") as f:
                        entry["data"] = f.read().hex()
                except PermissionError:
                    entry["data"] = "EACCES"
            try:
                names = sorted(os.listxattr(full, follow_symlinks=False))
                entry["xattrs"] = {
                    n: os.getxattr(full, n, follow_symlinks=False).hex() for n in names
                }
            except OSError as exc:
                entry["xattrs"] = errno.errorcode[exc.errno]
            tree[rel] = entry
    return tree


def execute(root: str, ops: list[list[Any]]) -> dict[str, Any]:
    results = []
    for op in ops:
        try:
            results.append(["ok", run_op(root, op)])
        except OSError as exc:
            results.append(["err", errno.errorcode.get(exc.errno or 0, str(exc.errno))])
    return {"results": results, "tree": snapshot(root)}


def main() -> None:
    os.umask(0o022)
    for line in sys.stdin:
        request = json.loads(line)
        answer = execute(request["root"], request["ops"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
