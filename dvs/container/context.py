"""What a process's context is made of, read from /proc before touching any namespace.

Everything the attach child reproduces comes from ``/proc/PID`` of the (pidfd-pinned)
target, read through one directory fd so that every file belongs to the same process:

- ``status``: real/effective ids and supplementary groups (as the *reader's* user
  namespace sees them), the capability sets (CapPrm/CapEff/CapInh/CapAmb/CapBnd),
  NoNewPrivs, Seccomp (mode) and Seccomp_filters.
- ``uid_map``/``gid_map``: extents ``inside outside count`` relative to the reader; a host
  id is translated into the target's user namespace through them (unmapped ids become the
  overflow id, /proc/sys/kernel/overflowuid, as the kernel shows them).
- ``ns/*``: one fd per namespace; a namespace equal to ours (same inode and device) is
  not joined again -- setns into one's own user namespace is even an error (EINVAL).
  ``ns/pid`` and ``ns/time`` are the namespaces the process *lives* in (not the
  ``*_for_children`` ones).
- ``cgroup``: ``0::PATH`` is the cgroup v2 membership, ``N:CONTROLLERS:PATH`` a v1 one;
  paths are relative to the reader's cgroup namespace, so with the host's view they are
  absolute below each hierarchy's mount point. On a hybrid host (v1 controllers + cgroup2
  at /sys/fs/cgroup/unified) both are joined.
- ``attr/current`` (SELinux) and ``attr/apparmor/current``: the LSM labels; reading them
  fails with EINVAL when no LSM provides them.
- ``environ``: raw bytes, NUL separated (binary-safe; never decoded).
After reading, the pidfd must still be alive; otherwise the files may have been another
process's and the context is discarded (TargetGone).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from dvs.container.mountinfo import parse as parse_mountinfo
from dvs.container.resolve import Target
from dvs.errors import TargetGone
from dvs.lowlevel import sys as llsys

#: namespaces joined after the mount namespace, in this order (user last: after joining a
#: child user namespace we would lack the rights to join the others)
NS_ORDER: tuple[str, ...] = ("uts", "cgroup", "ipc", "net", "pid", "time", "user")
NS_FLAGS: Mapping[str, int] = {
    "mnt": llsys.CLONE_NEWNS,
    "uts": llsys.CLONE_NEWUTS,
    "cgroup": llsys.CLONE_NEWCGROUP,
    "ipc": llsys.CLONE_NEWIPC,
    "net": llsys.CLONE_NEWNET,
    "pid": llsys.CLONE_NEWPID,
    "time": llsys.CLONE_NEWTIME,
    "user": llsys.CLONE_NEWUSER,
}

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21


class IdExtent(NamedTuple):
    """One line of /proc/PID/uid_map: ``length`` ids from ``inside`` map to ``outside``."""

    inside: int
    outside: int
    length: int


def parse_id_map(text: str) -> list[IdExtent]:
    extents = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            extents.append(IdExtent(int(parts[0]), int(parts[1]), int(parts[2])))
    return extents


def map_into(host_id: int, extents: Sequence[IdExtent], overflow: int = 65534) -> int:
    """The id that ``host_id`` (as the reader sees it) has inside the mapped namespace."""
    for e in extents:
        if e.outside <= host_id < e.outside + e.length:
            return e.inside + (host_id - e.outside)
    return overflow


def map_out(inside_id: int, extents: Sequence[IdExtent]) -> int | None:
    """The reader's id for ``inside_id`` of the mapped namespace (None: unmapped)."""
    for e in extents:
        if e.inside <= inside_id < e.inside + e.length:
            return e.outside + (inside_id - e.inside)
    return None


def parse_status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def cgroup_procs_paths(
    target_lines: Sequence[str],
    own_lines: Sequence[str],
    v1_mounts: Mapping[str, frozenset[str]],
    v2_mount: str | None,
) -> list[str]:
    """The ``cgroup.procs`` files to write our pid into to join the target's cgroups.

    ``v1_mounts`` maps each cgroup v1 mount point to its controllers/``name=`` options.
    Hierarchies where we already share the target's cgroup are left out.
    """
    ours = {
        line.split(":", 2)[1]: line.split(":", 2)[2] for line in own_lines if line.count(":") >= 2
    }
    paths = []
    for line in target_lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if ours.get(controllers) == path:
            continue
        if controllers == "":
            if v2_mount:
                paths.append(os.path.join(v2_mount, path.lstrip("/"), "cgroup.procs"))
            continue
        wanted = frozenset(controllers.split(","))
        for mount_point, options in v1_mounts.items():
            if wanted <= options:
                paths.append(os.path.join(mount_point, path.lstrip("/"), "cgroup.procs"))
                break
    return paths


def cgroup_mounts(mountinfo: str) -> tuple[dict[str, frozenset[str]], str | None]:
    """cgroup v1 mount points with their options, and the cgroup2 mount point."""
    v1: dict[str, frozenset[str]] = {}
    v2 = None
    for entry in parse_mountinfo(mountinfo):
        if entry.fstype == "cgroup2" and v2 is None:
            v2 = entry.mount_point
        elif entry.fstype == "cgroup":
            v1.setdefault(entry.mount_point, frozenset(entry.super_options.split(",")))
    return v1, v2


# ---- LSM ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LsmPlan:
    """Write ``value`` to /proc/thread-self/attr/``attr`` right before execve."""

    lsm: str
    attr: str
    value: str


def active_lsms(
    lsm_list: str | None, apparmor_enabled: str | None, selinux_present: bool
) -> list[str]:
    """The label-carrying LSMs of this host, from /sys/kernel/security/lsm if mounted,
    else from the AppArmor module parameter and the presence of /sys/fs/selinux."""
    if lsm_list is not None:
        names = [n.strip() for n in lsm_list.split(",")]
        return [n for n in names if n in ("apparmor", "selinux")]
    found = []
    if (apparmor_enabled or "").strip().upper().startswith("Y"):
        found.append("apparmor")
    if selinux_present:
        found.append("selinux")
    return found


def plan_lsm(
    active: Sequence[str], target: Mapping[str, str], own: Mapping[str, str]
) -> LsmPlan | None:
    """Which label the command must take on so it is confined like the target.

    AppArmor: ``exec PROFILE`` to attr/apparmor/exec (the profile name without the
    " (enforce)" mode suffix); nothing if the target is unconfined or in our profile.
    SELinux: the target's context to attr/exec (applies at execve), unless it is ours.
    """
    if "apparmor" in active:
        label = target.get("apparmor", "").strip()
        profile = label.rsplit(" (", 1)[0] if label.endswith(")") else label
        own_profile = own.get("apparmor", "").strip().rsplit(" (", 1)[0]
        if profile and profile != "unconfined" and profile != own_profile:
            return LsmPlan("apparmor", "apparmor/exec", f"exec {profile}")
        return None
    if "selinux" in active:
        label = target.get("selinux", "").strip().rstrip("\0")
        if label and label != own.get("selinux", "").strip().rstrip("\0"):
            return LsmPlan("selinux", "exec", label)
    return None


def host_active_lsms() -> list[str]:
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    return active_lsms(
        read("/sys/kernel/security/lsm"),
        read("/sys/module/apparmor/parameters/enabled"),
        os.path.isdir("/sys/fs/selinux") and read("/sys/fs/selinux/enforce") is not None,
    )


def _labels(read: Callable[[str], bytes | None]) -> dict[str, str]:
    labels = {}
    for lsm, path in (("apparmor", "attr/apparmor/current"), ("selinux", "attr/current")):
        data = read(path)
        if data:
            labels[lsm] = data.decode(errors="replace").strip().rstrip("\0")
    return labels


# ---- the context --------------------------------------------------------------------------


@dataclass
class TargetContext:
    """The target's context as read from /proc (fds owned: ``close()``)."""

    target: Target
    proc_fd: int
    status: dict[str, str]
    uid_map: list[IdExtent]
    gid_map: list[IdExtent]
    environ: list[bytes]
    cgroup_lines: list[str]
    ns_fds: dict[str, int]  # every namespace, opened
    ns_shared: set[str]  # namespaces that are the same as ours
    root_fd: int
    cwd: str  # inside the target's root
    labels: dict[str, str]
    cap_last: int
    overflow_uid: int = 65534
    overflow_gid: int = 65534
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.target.pid

    # -- ids ----------------------------------------------------------------------------
    @property
    def host_uid(self) -> int:
        return int(self.status["Uid"].split()[1])  # effective

    @property
    def host_gid(self) -> int:
        return int(self.status["Gid"].split()[1])

    @property
    def host_groups(self) -> list[int]:
        return [int(g) for g in self.status.get("Groups", "").split()]

    @property
    def in_user_ns(self) -> bool:
        """Does the target live in a user namespace other than ours?"""
        return "user" not in self.ns_shared

    @property
    def uid(self) -> int:
        """The target's effective uid inside its user namespace."""
        if not self.in_user_ns:
            return self.host_uid
        return map_into(self.host_uid, self.uid_map, self.overflow_uid)

    @property
    def gid(self) -> int:
        if not self.in_user_ns:
            return self.host_gid
        return map_into(self.host_gid, self.gid_map, self.overflow_gid)

    @property
    def groups(self) -> list[int]:
        if not self.in_user_ns:
            return self.host_groups
        mapped = [map_into(g, self.gid_map, -1) for g in self.host_groups]
        return [g for g in mapped if g >= 0]

    # -- privileges ---------------------------------------------------------------------
    def _caps(self, key: str) -> int:
        return int(self.status.get(key, "0"), 16)

    @property
    def cap_effective(self) -> int:
        return self._caps("CapEff")

    @property
    def cap_bounding(self) -> int:
        return self._caps("CapBnd")

    @property
    def cap_sets(self) -> tuple[int, int, int, int]:
        """The target's (permitted, effective, inheritable, ambient) sets."""
        return (
            self._caps("CapPrm"),
            self._caps("CapEff"),
            self._caps("CapInh"),
            self._caps("CapAmb"),
        )

    @property
    def no_new_privs(self) -> bool:
        return self.status.get("NoNewPrivs", "0") == "1"

    @property
    def seccomp_mode(self) -> int:
        """0 disabled, 1 strict, 2 filter."""
        return int(self.status.get("Seccomp", "0"))

    @property
    def seccomp_filter_count(self) -> int:
        return int(self.status.get("Seccomp_filters", "0"))

    # -- environment --------------------------------------------------------------------
    def env_value(self, key: bytes) -> bytes | None:
        prefix = key + b"="
        for entry in self.environ:
            if entry.startswith(prefix):
                return entry[len(prefix) :]
        return None

    def namespaces_to_join(self) -> list[tuple[int, int]]:
        """(fd, CLONE_NEW*) for every namespace other than mnt that differs from ours."""
        return [
            (self.ns_fds[name], NS_FLAGS[name])
            for name in NS_ORDER
            if name in self.ns_fds and name not in self.ns_shared
        ]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in [self.proc_fd, self.root_fd, *self.ns_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TargetContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_context(target: Target) -> TargetContext:
    """Read the target's context (see module note); TargetGone if it exited meanwhile."""
    gone = TargetGone(f"{target} exited while dvs was reading its context")
    try:
        proc_fd = os.open(f"/proc/{target.pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise gone from None
    opened: list[int] = [proc_fd]

    def read(name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        except OSError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    try:
        status_raw = read("status")
        if status_raw is None:
            raise gone
        status = parse_status(status_raw.decode())
        ns_fds: dict[str, int] = {}
        shared: set[str] = set()
        for name in NS_FLAGS:
            try:
                fd = os.open(f"ns/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
            except FileNotFoundError:
                if name == "time":  # kernels before 5.6
                    continue
                raise gone from None
            opened.append(fd)
            ns_fds[name] = fd
            theirs, ours = os.fstat(fd), os.stat(f"/proc/self/ns/{name}")
            if (theirs.st_ino, theirs.st_dev) == (ours.st_ino, ours.st_dev):
                shared.add(name)
        try:
            root_fd = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc_fd)
        except OSError:
            raise gone from None
        opened.append(root_fd)
        try:
            root_link = os.readlink("root", dir_fd=proc_fd)
            cwd_link = os.readlink("cwd", dir_fd=proc_fd)
        except OSError:
            root_link, cwd_link = "/", "/"
        if root_link == "/":
            cwd = cwd_link if cwd_link.startswith("/") else "/"
        elif cwd_link.startswith(root_link.rstrip("/") + "/"):
            cwd = cwd_link[len(root_link.rstrip("/")) :]
        else:
            cwd = "/"
        ctx = TargetContext(
            target=target,
            proc_fd=proc_fd,
            status=status,
            uid_map=parse_id_map((read("uid_map") or b"").decode()),
            gid_map=parse_id_map((read("gid_map") or b"").decode()),
            environ=[e for e in (read("environ") or b"").split(b"\0") if e],
            cgroup_lines=(read("cgroup") or b"").decode().splitlines(),
            ns_fds=ns_fds,
            ns_shared=shared,
            root_fd=root_fd,
            cwd=cwd,
            labels=_labels(read),
            cap_last=int(_read_text("/proc/sys/kernel/cap_last_cap", "40")),
            overflow_uid=int(_read_text("/proc/sys/kernel/overflowuid", "65534")),
            overflow_gid=int(_read_text("/proc/sys/kernel/overflowgid", "65534")),
        )
    except BaseException:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    if not target.alive():
        ctx.close()
        raise gone
    return ctx


def own_labels() -> dict[str, str]:
    def read(name: str) -> bytes | None:
        try:
            with open(f"/proc/self/{name}", "rb") as f:
                return f.read()
        except OSError:
            return None

    return _labels(read)


def own_cgroup_lines() -> list[str]:
    return _read_text("/proc/self/cgroup", "").splitlines()


def _read_text(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def iter_env(entries: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
    for entry in entries:
        key, sep, value = entry.partition(b"=")
        if sep and key:
            yield key, value
