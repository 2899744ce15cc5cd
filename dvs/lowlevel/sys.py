"""Syscall shims: namespaces, pidfds, the new mount API, openat2, process_vm_*, handles.

Kernel semantics relied on (the C side is csrc/sys/):
- ``setns``/``unshare`` act on the *calling thread*; joining a mount or user namespace
  fails (EINVAL) in a multi-threaded process such as a Python interpreter with threads, so
  real namespace entry happens in ``spawn``'s C child, never here in the interpreter.
- A pidfd names one process for its whole life: signals and waits through it can never hit
  a recycled pid. ``pidfd_getfd`` duplicates a file descriptor out of another process
  (needs ptrace access to it).
- ``open_tree(OPEN_TREE_CLONE)`` makes a detached copy of a mount (tree) that
  ``move_mount`` attaches elsewhere; ``mount_setattr(MOUNT_ATTR_IDMAP)`` gives a detached
  mount an id mapping taken from a user namespace fd.
- ``openat2`` with RESOLVE_BENEATH / RESOLVE_IN_ROOT refuses to leave the starting dir.
- ``process_vm_readv/writev`` copy to/from another process's memory; a transfer stops
  short at the first unmapped remote page, which the wrappers turn into an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from dvs.lowlevel import check, ffi, lib

CLONE_NEWNS: int = lib.CLONE_NEWNS
CLONE_NEWUTS: int = lib.CLONE_NEWUTS
CLONE_NEWIPC: int = lib.CLONE_NEWIPC
CLONE_NEWUSER: int = lib.CLONE_NEWUSER
CLONE_NEWPID: int = lib.CLONE_NEWPID
CLONE_NEWNET: int = lib.CLONE_NEWNET
CLONE_NEWCGROUP: int = lib.CLONE_NEWCGROUP
CLONE_NEWTIME: int = lib.CLONE_NEWTIME

OPEN_TREE_CLONE: int = lib.OPEN_TREE_CLONE
OPEN_TREE_CLOEXEC: int = lib.OPEN_TREE_CLOEXEC
AT_RECURSIVE: int = lib.AT_RECURSIVE
AT_EMPTY_PATH: int = lib.AT_EMPTY_PATH
AT_SYMLINK_NOFOLLOW: int = lib.AT_SYMLINK_NOFOLLOW
AT_FDCWD: int = lib.AT_FDCWD
MOVE_MOUNT_F_EMPTY_PATH: int = lib.MOVE_MOUNT_F_EMPTY_PATH
MOVE_MOUNT_T_EMPTY_PATH: int = lib.MOVE_MOUNT_T_EMPTY_PATH
MOUNT_ATTR_RDONLY: int = lib.MOUNT_ATTR_RDONLY
MOUNT_ATTR_NOSUID: int = lib.MOUNT_ATTR_NOSUID
MOUNT_ATTR_NODEV: int = lib.MOUNT_ATTR_NODEV
MOUNT_ATTR_NOEXEC: int = lib.MOUNT_ATTR_NOEXEC
MOUNT_ATTR_IDMAP: int = lib.MOUNT_ATTR_IDMAP
MS_PRIVATE: int = lib.MS_PRIVATE
MS_SLAVE: int = lib.MS_SLAVE
MS_REC: int = lib.MS_REC
MNT_DETACH: int = lib.MNT_DETACH
FSOPEN_CLOEXEC: int = lib.FSOPEN_CLOEXEC
FSMOUNT_CLOEXEC: int = lib.FSMOUNT_CLOEXEC
FSCONFIG_SET_FLAG: int = lib.FSCONFIG_SET_FLAG
FSCONFIG_SET_STRING: int = lib.FSCONFIG_SET_STRING
FSCONFIG_CMD_CREATE: int = lib.FSCONFIG_CMD_CREATE
RESOLVE_NO_XDEV: int = lib.RESOLVE_NO_XDEV
RESOLVE_NO_MAGICLINKS: int = lib.RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS: int = lib.RESOLVE_NO_SYMLINKS
RESOLVE_BENEATH: int = lib.RESOLVE_BENEATH
RESOLVE_IN_ROOT: int = lib.RESOLVE_IN_ROOT
UFFD_USER_MODE_ONLY: int = lib.UFFD_USER_MODE_ONLY

_NULL_PATH = ffi.NULL


def _path(path: str | bytes | None) -> object:
    if path is None:
        return _NULL_PATH
    return os.fsencode(path)


# ---- namespaces ---------------------------------------------------------------------------


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling *thread* into the namespace ``fd`` refers to (see module note)."""
    check(lib.dvs_setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    check(lib.dvs_unshare(flags), "unshare")


# ---- pidfds -------------------------------------------------------------------------------


def pidfd_open(pid: int, flags: int = 0) -> int:
    return check(lib.dvs_pidfd_open(pid, flags), f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    return check(lib.dvs_pidfd_getfd(pidfd, target_fd, 0), f"pidfd_getfd(fd {target_fd})")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    check(lib.dvs_pidfd_send_signal(pidfd, sig, 0), "pidfd_send_signal")


# ---- mount API ----------------------------------------------------------------------------


def open_tree(dfd: int, path: str | bytes, flags: int) -> int:
    return check(lib.dvs_open_tree(dfd, _path(path), flags), "open_tree", os.fsdecode(path))


def move_mount(
    from_dfd: int, from_path: str | bytes, to_dfd: int, to_path: str | bytes, flags: int = 0
) -> None:
    check(
        lib.dvs_move_mount(from_dfd, _path(from_path), to_dfd, _path(to_path), flags),
        "move_mount",
        os.fsdecode(to_path),
    )


def mount_setattr(
    dfd: int,
    path: str | bytes,
    flags: int = 0,
    *,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
) -> None:
    check(
        lib.dvs_mount_setattr(dfd, _path(path), flags, attr_set, attr_clr, propagation, userns_fd),
        "mount_setattr",
        os.fsdecode(path),
    )


def fsopen(fsname: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return check(lib.dvs_fsopen(fsname.encode(), flags), f"fsopen({fsname})")


def fsconfig(
    fd: int, cmd: int, key: str | None = None, value: str | None = None, aux: int = 0
) -> None:
    c_value = ffi.NULL if value is None else ffi.new("char[]", value.encode())
    check(lib.dvs_fsconfig(fd, cmd, _path(key), c_value, aux), f"fsconfig({key})")


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return check(lib.dvs_fsmount(fd, flags, attr_flags), "fsmount")


def umount2(target: str | bytes, flags: int = 0) -> None:
    check(lib.dvs_umount2(_path(target), flags), "umount2", os.fsdecode(target))


# ---- paths --------------------------------------------------------------------------------


def openat2(dfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    return check(
        lib.dvs_openat2(dfd, _path(path), flags, mode, resolve), "openat2", os.fsdecode(path)
    )


@dataclass(frozen=True)
class FileHandle:
    """An opaque, persistent name of an inode (survives renames; fd-free)."""

    handle_type: int
    data: bytes
    mount_id: int


def name_to_handle_at(dfd: int, path: str | bytes, flags: int = 0) -> FileHandle:
    buf = ffi.new("uint8_t[]", 128)
    size = ffi.new("uint32_t *", 128)
    handle_type = ffi.new("int32_t *")
    mount_id = ffi.new("int32_t *")
    check(
        lib.dvs_name_to_handle_at(dfd, _path(path), buf, size, handle_type, mount_id, flags),
        "name_to_handle_at",
        os.fsdecode(path),
    )
    return FileHandle(handle_type[0], bytes(ffi.buffer(buf, size[0])), mount_id[0])


def open_by_handle_at(mount_fd: int, handle: FileHandle, flags: int) -> int:
    return check(
        lib.dvs_open_by_handle_at(
            mount_fd, handle.data, len(handle.data), handle.handle_type, flags
        ),
        "open_by_handle_at",
    )


def userfaultfd(flags: int = os.O_CLOEXEC) -> int:
    return check(lib.dvs_userfaultfd(flags), "userfaultfd")


# ---- another process's memory ---------------------------------------------------------------


def process_vm_read(pid: int, remote_addr: int, size: int) -> bytes:
    """Read exactly ``size`` bytes at ``remote_addr`` of process ``pid``."""
    buf = bytearray(size)
    process_vm_readinto(pid, remote_addr, buf)
    return bytes(buf)


def process_vm_readinto(pid: int, remote_addr: int, buf: bytearray | memoryview) -> None:
    _transfer(pid, write=False, pairs=[(remote_addr, buf)])


def process_vm_write(pid: int, remote_addr: int, data: bytes | bytearray | memoryview) -> None:
    _transfer(pid, write=True, pairs=[(remote_addr, data)])


def process_vm_read_batch(pid: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Read several ``(remote_addr, size)`` ranges with as few syscalls as possible."""
    buffers = [bytearray(size) for _, size in ranges]
    _transfer(
        pid, write=False, pairs=[(addr, b) for (addr, _), b in zip(ranges, buffers, strict=True)]
    )
    return [bytes(b) for b in buffers]


def _transfer(pid: int, *, write: bool, pairs: Sequence[tuple[int, object]]) -> None:
    segs = ffi.new("struct dvs_mem_seg[]", len(pairs))
    keep = []  # the cffi buffers must outlive the call
    expected = 0
    for i, (remote, data) in enumerate(pairs):
        local = ffi.from_buffer(data, require_writable=not write)
        keep.append(local)
        segs[i].local = int(ffi.cast("uintptr_t", local))
        segs[i].remote = remote
        segs[i].len = len(local)
        expected += len(local)
    moved = check(
        lib.dvs_process_vm_rw(pid, int(write), segs, len(pairs)),
        "process_vm_writev" if write else "process_vm_readv",
    )
    if moved != expected:
        raise OSError(
            14,
            f"process_vm_{'writev' if write else 'readv'}: only {moved} of "
            f"{expected} bytes moved (unmapped remote memory)",
        )


# ---- spawning into a context ----------------------------------------------------------------

SPAWN_STEPS = {
    lib.DVS_STEP_CLONE: "clone3",
    lib.DVS_STEP_MAPS: "writing uid/gid maps",
    lib.DVS_STEP_SETNS: "setns",
    lib.DVS_STEP_CHROOT: "chroot",
    lib.DVS_STEP_CHDIR: "chdir",
    lib.DVS_STEP_STDIO: "redirecting stdio",
    lib.DVS_STEP_CREDS: "setting uid/gid",
    lib.DVS_STEP_EXEC: "execve",
    lib.DVS_STEP_SYNC: "synchronising with the child",
}


@dataclass
class Spawned:
    """A child started by ``spawn``; ``pidfd`` is owned by the caller (close it)."""

    pid: int
    pidfd: int

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; return the exit status, or -signal if it was killed."""
        import select

        if timeout is not None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
        info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        assert info is not None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def kill(self, sig: int = 9) -> None:
        try:
            pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn(
    argv: Sequence[str] | None,
    *,
    env: dict[str, str] | None = None,
    ns_fds: Sequence[int] = (),
    cgroup_fd: int = -1,
    clone_flags: int = 0,
    uid_map: str | None = None,
    gid_map: str | None = None,
    stdio: tuple[int, int, int] = (-1, -1, -1),
    root: str | None = None,
    cwd: str | None = None,
    uid: int = -1,
    gid: int = -1,
    pdeath_signal: int = 0,
) -> Spawned:
    """Start ``argv`` (argv[0] is the executable path) in a prepared context.

    ``argv=None`` starts a holder that sits in ``pause()`` -- useful to keep namespaces
    alive. The child joins ``ns_fds`` in order (put a user namespace last).
    """
    keep: list[object] = []

    def cstr(s: str | None) -> object:
        if s is None:
            return ffi.NULL
        c = ffi.new("char[]", os.fsencode(s))
        keep.append(c)
        return c

    def cvec(items: Sequence[str]) -> object:
        vec = ffi.new("char *[]", len(items) + 1)
        for i, item in enumerate(items):
            vec[i] = cstr(item)
        vec[len(items)] = ffi.NULL
        keep.append(vec)
        return vec

    req = ffi.new("struct dvs_spawn *")
    if argv is not None:
        req.path = cstr(argv[0])
        req.argv = cvec(list(argv))
    if env is not None:
        req.envp = cvec([f"{k}={v}" for k, v in env.items()])
    fds = ffi.new("int[]", list(ns_fds) or [0])
    req.ns_fds = fds
    req.n_ns_fds = len(ns_fds)
    req.cgroup_fd = cgroup_fd
    req.clone_flags = clone_flags
    req.uid_map = cstr(uid_map)
    req.gid_map = cstr(gid_map)
    req.stdio = list(stdio)
    req.root = cstr(root)
    req.cwd = cstr(cwd)
    req.uid = uid
    req.gid = gid
    req.pdeath_signal = pdeath_signal
    ret = lib.dvs_spawn(req)
    if ret < 0:
        step = SPAWN_STEPS.get(req.failed_step, "spawn")
        if req.failed_step == lib.DVS_STEP_SETNS:
            step = f"setns into namespace #{req.failed_index}"
        check(ret, f"spawn: {step}", argv[0] if argv else None)
    return Spawned(req.pid, req.pidfd)


# ---- seccomp (csrc/sys/sync.c) ------------------------------------------------------------

NR_IO_URING_SETUP: int = lib.__NR_io_uring_setup
NR_IO_URING_ENTER: int = lib.__NR_io_uring_enter
NR_IO_URING_REGISTER: int = lib.__NR_io_uring_register


def seccomp_deny(syscall_nrs: Sequence[int], errno_value: int) -> None:
    """Make the listed syscalls fail with ``errno_value`` in this thread and its children.

    Irreversible (a seccomp filter with no_new_privs); meant for a dedicated child process,
    e.g. one that must see io_uring blocked the way a container runtime's profile blocks it.
    """
    nrs = ffi.new("int32_t[]", list(syscall_nrs))
    check(lib.dvs_seccomp_deny(nrs, len(syscall_nrs), errno_value), "seccomp deny")
