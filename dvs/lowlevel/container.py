"""The container attach child and seccomp filter copying (C side: csrc/container/attach.c).

Kernel semantics relied on:
- ``attach_start`` forks a single-threaded *keeper* that joins the target's cgroups and
  namespaces, builds the mount view and forks the command inside the target's pid
  namespace; all of it is C, because Python must not run between fork and exec. The
  keeper reports over a SOCK_SEQPACKET socket (one ``AttachMessage`` per record; a PTY
  master and the command's pidfd travel as SCM_RIGHTS). Closing our end of that socket
  ends the session: the keeper kills the command (and what is left of its session) and
  exits, and the private mount namespace dies with the last process in it.
- ``seccomp_copy`` uses PTRACE_SEIZE + PTRACE_INTERRUPT and PTRACE_SECCOMP_GET_FILTER
  (CONFIG_CHECKPOINT_RESTORE): the target sits in a ptrace-stop for the microseconds the
  copy takes, and a signal that arrived meanwhile is handed back at detach. Filters are
  classic BPF programs, returned oldest first, so installing them in order reproduces
  the target's filter stack.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dvs.lowlevel import check, ffi, lib

MODE_ATTACH: int = lib.DVS_ATTACH_MODE_ATTACH
MODE_EXEC: int = lib.DVS_ATTACH_MODE_EXEC

MSG_WARN: int = lib.DVS_MSG_WARN
MSG_FAIL: int = lib.DVS_MSG_FAIL
MSG_PTY: int = lib.DVS_MSG_PTY
MSG_STARTED: int = lib.DVS_MSG_STARTED
MSG_STOPPED: int = lib.DVS_MSG_STOPPED
MSG_EXITED: int = lib.DVS_MSG_EXITED

MAX_NS: int = lib.DVS_ATTACH_MAX_NS
MAX_CGROUPS: int = lib.DVS_ATTACH_MAX_CGROUPS
MAX_OVERLAYS: int = lib.DVS_ATTACH_MAX_OVERLAYS
MAX_GROUPS: int = lib.DVS_ATTACH_MAX_GROUPS
MAX_FILTERS: int = lib.DVS_ATTACH_MAX_FILTERS

STEP_CGROUP: int = lib.DVS_ATTACH_STEP_CGROUP
STEP_SETNS_MNT: int = lib.DVS_ATTACH_STEP_SETNS_MNT
STEP_BASE_DIR: int = lib.DVS_ATTACH_STEP_BASE_DIR
STEP_OVERLAY: int = lib.DVS_ATTACH_STEP_OVERLAY
STEP_OVERLAY_SOURCE: int = lib.DVS_ATTACH_STEP_OVERLAY_SOURCE
STEP_SETNS: int = lib.DVS_ATTACH_STEP_SETNS
STEP_PTY: int = lib.DVS_ATTACH_STEP_PTY
STEP_FORK: int = lib.DVS_ATTACH_STEP_FORK
STEP_GROUPS: int = lib.DVS_ATTACH_STEP_GROUPS
STEP_SECCOMP: int = lib.DVS_ATTACH_STEP_SECCOMP
STEP_EXEC: int = lib.DVS_ATTACH_STEP_EXEC
STEP_CWD: int = lib.DVS_ATTACH_STEP_CWD

#: what each step does, for error messages ("... failed while <step>")
STEP_NAMES: dict[int, str] = {
    lib.DVS_ATTACH_STEP_SYNC: "synchronising with dvs",
    lib.DVS_ATTACH_STEP_CGROUP: "joining the target's cgroup",
    lib.DVS_ATTACH_STEP_SETNS_MNT: "joining the target's mount namespace",
    lib.DVS_ATTACH_STEP_CLONE_ROOT: "cloning the container's root mount tree",
    lib.DVS_ATTACH_STEP_UNSHARE: "creating the private mount namespace",
    lib.DVS_ATTACH_STEP_PROPAGATION: "making the private mount namespace a slave",
    lib.DVS_ATTACH_STEP_TOOLS: "mounting the tools view",
    lib.DVS_ATTACH_STEP_CHROOT: "entering the new root",
    lib.DVS_ATTACH_STEP_BASE_DIR: "mounting the container's root at the base directory",
    lib.DVS_ATTACH_STEP_OVERLAY: "mounting a container path over the tools view",
    lib.DVS_ATTACH_STEP_OVERLAY_SOURCE: "finding a path in the container",
    lib.DVS_ATTACH_STEP_CWD: "changing to the start directory",
    lib.DVS_ATTACH_STEP_SETNS: "joining the target's namespaces",
    lib.DVS_ATTACH_STEP_PTY: "opening a terminal in the container",
    lib.DVS_ATTACH_STEP_FORK: "forking the command into the pid namespace",
    lib.DVS_ATTACH_STEP_STDIO: "setting up the command's stdin/stdout/stderr",
    lib.DVS_ATTACH_STEP_GROUPS: "setting supplementary groups",
    lib.DVS_ATTACH_STEP_GID: "setting the group id",
    lib.DVS_ATTACH_STEP_CAPS: "dropping capabilities from the bounding set",
    lib.DVS_ATTACH_STEP_CAP_SETS: "setting the target's capability sets",
    lib.DVS_ATTACH_STEP_LSM: "setting the LSM label",
    lib.DVS_ATTACH_STEP_SECCOMP: "installing the target's seccomp filter",
    lib.DVS_ATTACH_STEP_UID: "setting the user id",
    lib.DVS_ATTACH_STEP_NO_NEW_PRIVS: "setting no_new_privs",
    lib.DVS_ATTACH_STEP_EXEC: "executing the command",
    lib.DVS_ATTACH_STEP_SESSION: "cleaning up the session",
}

SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_MAX_FILTER_BYTES = MAX_FILTERS * 4096 * SOCK_FILTER_SIZE


@dataclass(frozen=True)
class SeccompFilter:
    """One classic-BPF seccomp program (``instructions`` is a multiple of 8 bytes)."""

    instructions: bytes
    flags: int = 0

    @property
    def length(self) -> int:
        return len(self.instructions) // SOCK_FILTER_SIZE


@dataclass
class AttachRequest:
    """Everything the keeper needs; mirrors ``struct dvs_attach`` (see attach.h)."""

    mode: int
    report_fd: int
    host_proc_fd: int
    mnt_ns_fd: int
    root_fd: int
    argv: Sequence[bytes]
    envp: Sequence[bytes]
    search_path: bytes | None = None
    cgroup_fds: Sequence[int] = ()
    namespaces: Sequence[tuple[int, int]] = ()  # (fd, CLONE_NEW*), in joining order
    tools_fd: int = -1
    base_dir: str | None = None
    overlays: Sequence[str] = ()
    cwd: str | None = None
    set_ids: bool = True
    uid: int = 0
    gid: int = 0
    groups: Sequence[int] = ()
    cap_keep: int = (1 << 64) - 1
    cap_last: int = 40
    cap_sets: tuple[int, int, int, int] | None = None
    """The target's (permitted, effective, inheritable, ambient), each cut to ``cap_keep``
    by the command; ``None``: leave them to the id change and execve."""
    no_new_privs: bool = False
    filters: Sequence[SeccompFilter] = ()
    lsm_attr: str | None = None
    lsm_value: str | None = None
    use_pty: bool = False
    rows: int = 0
    cols: int = 0
    fallback_pty_slave: int = -1
    stdio: tuple[int, int, int] = (-1, -1, -1)
    new_session: bool = False
    kill_session: bool = True
    _keep: list[object] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class AttachMessage:
    kind: int
    step: int
    index: int
    err: int
    value: int
    fd: int  # received with the message (owned by the caller), or -1


def attach_start(req: AttachRequest) -> tuple[int, int]:
    """Fork the keeper; return its ``(pid, pidfd)``. Progress arrives on ``report_fd``."""
    if len(req.namespaces) > MAX_NS or len(req.cgroup_fds) > MAX_CGROUPS:
        raise ValueError("too many namespaces or cgroups for one attach")
    if len(req.overlays) > MAX_OVERLAYS or len(req.groups) > MAX_GROUPS:
        raise ValueError("too many overlays or supplementary groups for one attach")
    if len(req.filters) > MAX_FILTERS:
        raise ValueError(f"the target has more than {MAX_FILTERS} seccomp filters")
    keep = req._keep

    def cstr(value: str | bytes | None) -> object:
        if value is None:
            return ffi.NULL
        c = ffi.new("char[]", os.fsencode(value))
        keep.append(c)
        return c

    def cvec(items: Sequence[str | bytes]) -> object:
        vec = ffi.new("char *[]", len(items) + 1)
        for i, item in enumerate(items):
            vec[i] = cstr(item)
        vec[len(items)] = ffi.NULL
        keep.append(vec)
        return vec

    def carray(ctype: str, items: Sequence[int]) -> object:
        arr = ffi.new(f"{ctype}[]", list(items) or [0])
        keep.append(arr)
        return arr

    c = ffi.new("struct dvs_attach *")
    keep.append(c)
    c.mode = req.mode
    c.report_fd = req.report_fd
    c.host_proc_fd = req.host_proc_fd
    c.cgroup_fds = carray("int32_t", req.cgroup_fds)
    c.n_cgroup_fds = len(req.cgroup_fds)
    c.mnt_ns_fd = req.mnt_ns_fd
    c.root_fd = req.root_fd
    c.ns_fds = carray("int32_t", [fd for fd, _ in req.namespaces])
    c.ns_types = carray("int32_t", [kind for _, kind in req.namespaces])
    c.n_ns = len(req.namespaces)
    c.tools_fd = req.tools_fd
    c.base_dir = cstr(req.base_dir)
    c.overlays = cvec(list(req.overlays))
    c.n_overlays = len(req.overlays)
    c.cwd = cstr(req.cwd)
    c.set_ids = int(req.set_ids)
    c.uid = req.uid
    c.gid = req.gid
    c.groups = carray("uint32_t", req.groups)
    c.n_groups = len(req.groups)
    c.cap_keep = req.cap_keep & ((1 << 64) - 1)
    c.cap_last = req.cap_last
    c.set_cap_sets = int(req.cap_sets is not None)
    permitted, effective, inheritable, ambient = req.cap_sets or (0, 0, 0, 0)
    c.cap_permitted = permitted & ((1 << 64) - 1)
    c.cap_effective = effective & ((1 << 64) - 1)
    c.cap_inheritable = inheritable & ((1 << 64) - 1)
    c.cap_ambient = ambient & ((1 << 64) - 1)
    c.no_new_privs = int(req.no_new_privs)
    blob = b"".join(f.instructions for f in req.filters)
    insns = ffi.new("uint8_t[]", blob or b"\0")
    keep.append(insns)
    c.filter_insns = insns
    c.filter_lens = carray("uint32_t", [f.length for f in req.filters])
    c.filter_flags = carray("uint32_t", [f.flags for f in req.filters])
    c.n_filters = len(req.filters)
    c.lsm_attr = cstr(req.lsm_attr)
    c.lsm_value = cstr(req.lsm_value)
    c.argv = cvec(list(req.argv))
    c.envp = cvec(list(req.envp))
    c.search_path = cstr(req.search_path)
    c.use_pty = int(req.use_pty)
    c.rows = req.rows
    c.cols = req.cols
    c.fallback_pty_slave = req.fallback_pty_slave
    c.stdio = list(req.stdio)
    c.new_session = int(req.new_session)
    c.kill_session = int(req.kill_session)
    check(lib.dvs_attach_start(c), "starting the attach helper")
    return c.pid, c.pidfd


def attach_recv(fd: int, timeout: float | None = None) -> AttachMessage | None:
    """Wait for the keeper's next report; None at EOF (the keeper is gone).

    Raises TimeoutError after ``timeout`` seconds and OSError(EPROTO) for a malformed record.
    """
    msg = ffi.new("struct dvs_attach_msg *")
    timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
    ret = lib.dvs_attach_recv(fd, msg, timeout_ms)
    if ret == -errno.ETIMEDOUT:
        raise TimeoutError(f"no report from the attach helper within {timeout} s")
    check(ret, "receiving from the attach helper")
    if ret == 0:
        return None
    return AttachMessage(msg.kind, msg.step, msg.index, msg.err, msg.value, msg.fd)


def seccomp_copy(pid: int) -> list[SeccompFilter]:
    """The seccomp filters of process ``pid``, oldest first (see module note)."""
    insns = ffi.new("uint8_t[]", _MAX_FILTER_BYTES)
    lens = ffi.new("uint32_t[]", MAX_FILTERS)
    flags = ffi.new("uint32_t[]", MAX_FILTERS)
    count = check(
        lib.dvs_seccomp_copy(pid, insns, _MAX_FILTER_BYTES, lens, flags, MAX_FILTERS),
        f"copying the seccomp filters of process {pid}",
    )
    result = []
    offset = 0
    for i in range(count):
        size = lens[i] * SOCK_FILTER_SIZE
        result.append(SeccompFilter(bytes(ffi.buffer(insns + offset, size)), flags[i]))
        offset += size
    return result


def proc_stat_session(stat: bytes) -> int:
    """The session id in a /proc/PID/stat text as the keeper's C parser reads it (-1:
    malformed); for property tests of that parser."""
    return int(lib.dvs_proc_stat_session(stat, len(stat)))
