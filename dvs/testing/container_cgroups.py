"""The crun workaround for hybrid cgroups: hugetlb as its own v1 hierarchy, shared across processes.

Hybrid cgroups: this host mounts a tmpfs at ``/sys/fs/cgroup`` with one cgroup v1 hierarchy per
controller below it (``cpu``, ``memory``, ``pids``, ...) plus a cgroup2 mount at
``/sys/fs/cgroup/unified``. A controller lives in exactly one hierarchy; every controller no v1
hierarchy claims belongs to cgroup2, and here that is ``hugetlb`` (``/proc/cgroups`` shows its
hierarchy id as 0, and ``unified/cgroup.controllers`` lists it). crun 1.8 refuses a cgroup2
that holds controllers in hybrid mode ("cgroups in hybrid mode not supported"); runc does not.

The workaround gives hugetlb a v1 hierarchy of its own::

    mkdir /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb

after which cgroup2 holds no controller and crun (and ``podman --runtime crun``) work. Undoing
it has a trap: a v1 hierarchy unmounted while it still has child cgroups is not destroyed but
lingers invisibly and keeps the controller, and ``rmdir`` of a cgroup only starts its
destruction (``/proc/cgroups``' ``num_cgroups`` drops a moment later). So undo removes the child
cgroups depth-first, waits until ``num_cgroups`` is 1, unmounts, removes the directory and waits
until ``/proc/cgroups`` shows hugetlb back on hierarchy 0; a lingering hierarchy is re-mounted
(which re-attaches it, now childless) and unmounted again.

Several test processes on this machine may start containers at once, so one must never unmount
under another. The shared state lives in ``/run/dvs-testing`` (tmpfs: a reboot forgets it
together with the mount; not in the per-checkout cache, because the mount is host-wide):

* ``hugetlb.lock``: an exclusive ``flock`` taken around every check, apply, undo *and container
  start*, so a container never starts while the hierarchy appears or disappears (runtimes
  create a child cgroup in every v1 hierarchy mounted when the container starts);
* ``hugetlb.users``: the reference count, as *shared* ``flock``s, one open file description per
  user. The kernel drops a dead process's locks, so a crashed test run leaks no reference; the
  last user knows it is last when a non-blocking *exclusive* lock succeeds;
* ``hugetlb.state``: JSON naming the mount id dvs created. A hugetlb mount without it (or with
  another id) was made by someone else and is never touched.

Whether the workaround is needed is probed, not assumed: under the lock, with nothing applied,
``crun run`` of ``/bin/true`` in the cached rootfs either succeeds (not needed) or fails with
the hybrid-mode message (needed); any other failure is an error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dvs.errors import DvsError
from dvs.testing import container_bundle, container_rootfs

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
HUGETLB_MOUNTPOINT: Final = CGROUP_ROOT / "hugetlb"
UNIFIED_CONTROLLERS: Final = CGROUP_ROOT / "unified" / "cgroup.controllers"
PROC_CGROUPS: Final = Path("/proc/cgroups")
STATE_DIR: Final = Path("/run/dvs-testing")
MUTEX_PATH: Final = STATE_DIR / "hugetlb.lock"
USERS_PATH: Final = STATE_DIR / "hugetlb.users"
STATE_PATH: Final = STATE_DIR / "hugetlb.state"
CRUN_HYBRID_MESSAGE: Final = "cgroups in hybrid mode not supported"
COMMAND_TIMEOUT: Final = 30.0
SETTLE_TIMEOUT: Final = 10.0


class CgroupWorkaroundError(DvsError):
    """The hugetlb workaround could not be checked, applied or undone."""


class CgroupWorkaroundWarning(UserWarning):
    """The workaround could not be undone now (a foreign cgroup is populated); retried later."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields dvs needs)."""

    mount_id: int
    mountpoint: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    mountpoint=_unescape(fields[4]),
                    mount_options=tuple(fields[5].split(",")),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(fields[sep + 3].split(","))
                    if len(fields) > sep + 3
                    else (),
                )
            )
    return entries


def cgroup_mounts() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Mounts at or under /sys/fs/cgroup as sortable (mountpoint, type, source, options)."""
    root = str(CGROUP_ROOT)
    return sorted(
        (m.mountpoint, m.fstype, m.source, m.super_options)
        for m in read_mountinfo()
        if m.mountpoint == root or m.mountpoint.startswith(root + "/")
    )


def hugetlb_hierarchy() -> tuple[int, int]:
    """(hierarchy id, number of cgroups) of hugetlb in /proc/cgroups; id 0 means cgroup2."""
    for line in PROC_CGROUPS.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "hugetlb":
            return int(fields[1]), int(fields[2])
    raise CgroupWorkaroundError("expected a hugetlb line in /proc/cgroups, found none")


def unified_controllers() -> tuple[str, ...]:
    try:
        return tuple(UNIFIED_CONTROLLERS.read_text().split())
    except FileNotFoundError:
        return ()


def _wait_until(check: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL
    )


# -- probing crun ---------------------------------------------------------------------------


def crun_refuses_hybrid_cgroups(crun: str = "crun") -> bool:
    """Run ``/bin/true`` under crun: True if it fails with the hybrid-mode message.

    The probe container uses the cached rootfs read-only in place (``root.path`` may be
    absolute), so it costs about 10 ms and copies nothing.
    """
    probe_id = f"dvs-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    options = container_bundle.BundleOptions(args=("/bin/true",), readonly=True)
    config = container_bundle.oci_config(options, probe_id)
    config["root"]["path"] = str(container_rootfs.busybox_rootfs())
    directory = Path(tempfile.mkdtemp(prefix=f"dvs-probe-{os.getpid()}-"))
    try:
        (directory / container_bundle.CONFIG_NAME).write_text(json.dumps(config))
        result = _run([crun, "run", "--bundle", str(directory), probe_id])
    finally:
        _run([crun, "delete", "--force", probe_id])
        shutil.rmtree(directory, ignore_errors=True)
    output = (result.stderr + result.stdout).strip()
    if result.returncode == 0:
        return False
    if CRUN_HYBRID_MESSAGE in output:
        return True
    raise CgroupWorkaroundError(
        f"crun probe: expected success or {CRUN_HYBRID_MESSAGE!r}, "
        f"found exit status {result.returncode}: {output}"
    )


# -- apply and undo (callers hold the mutex) ------------------------------------------------


@dataclass(frozen=True)
class _State:
    mount_id: int
    hierarchy_before: int
    unified_before: tuple[str, ...]

    def save(self) -> None:
        tmp = STATE_PATH.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "mount_id": self.mount_id,
                    "hierarchy_before": self.hierarchy_before,
                    "unified_before": list(self.unified_before),
                }
            )
        )
        tmp.rename(STATE_PATH)


def _hugetlb_mount() -> MountEntry | None:
    for entry in read_mountinfo():
        if entry.mountpoint == str(HUGETLB_MOUNTPOINT):
            return entry
    return None


def _read_state() -> _State | None:
    """Our applied workaround, or None. A state file whose mount is gone is stale: removed."""
    try:
        raw = json.loads(STATE_PATH.read_text())
    except FileNotFoundError:
        return None
    state = _State(int(raw["mount_id"]), int(raw["hierarchy_before"]), tuple(raw["unified_before"]))
    mount = _hugetlb_mount()
    if mount is None or mount.mount_id != state.mount_id:
        STATE_PATH.unlink()
        return None
    return state


def _check_cgroup_root_writable() -> None:
    root = next((m for m in read_mountinfo() if m.mountpoint == str(CGROUP_ROOT)), None)
    if root is None or root.fstype != "tmpfs" or "ro" in root.mount_options:
        found = "nothing" if root is None else f"{root.fstype} ({','.join(root.mount_options)})"
        raise CgroupWorkaroundError(
            f"expected a writable tmpfs at {CGROUP_ROOT} to add a hugetlb hierarchy, found {found}"
        )
    if os.path.lexists(HUGETLB_MOUNTPOINT):
        raise CgroupWorkaroundError(
            f"expected no {HUGETLB_MOUNTPOINT} (dvs did not create it), found one: not touching it"
        )


def _mount_hugetlb() -> None:
    result = _run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB_MOUNTPOINT)])
    if result.returncode != 0:
        raise CgroupWorkaroundError(
            f"mount -t cgroup -o hugetlb failed: {result.stderr.strip() or result.returncode}"
        )


def _umount_hugetlb() -> None:
    result = _run(["umount", str(HUGETLB_MOUNTPOINT)])
    if result.returncode != 0:
        raise CgroupWorkaroundError(
            f"umount {HUGETLB_MOUNTPOINT} failed: {result.stderr.strip() or result.returncode}"
        )


def _apply() -> _State:
    _check_cgroup_root_writable()
    hierarchy_before, _ = hugetlb_hierarchy()
    unified_before = unified_controllers()
    HUGETLB_MOUNTPOINT.mkdir(mode=0o755)
    try:
        _mount_hugetlb()
    except BaseException:
        HUGETLB_MOUNTPOINT.rmdir()
        raise
    mount = _hugetlb_mount()
    if mount is None:  # pragma: no cover - mount(8) succeeded, so this is a kernel surprise
        raise CgroupWorkaroundError(f"mounted hugetlb at {HUGETLB_MOUNTPOINT}, found no mount")
    state = _State(mount.mount_id, hierarchy_before, unified_before)
    state.save()
    return state


def _is_zombie(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True  # reaped meanwhile
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _remove_cgroup(path: str) -> None:
    """rmdir a v1 cgroup, waiting while only zombies keep it busy.

    A v1 cgroup lists an exited task until its parent reaps it, and ``rmdir`` fails with
    EBUSY meanwhile; orphans (a dead podman's conmon) wait for PID 1, which here takes up
    to about 2 s. Live processes mean someone else's container: an error, never a kill.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            procs = Path(path, "cgroup.procs").read_text().split()
            live = [pid for pid in procs if not _is_zombie(pid)]
            if live or time.monotonic() > deadline:
                raise CgroupWorkaroundError(
                    f"expected no processes in hugetlb cgroup {path}, found {live or procs}"
                    + ("" if live else " (zombies not reaped within 10 s)")
                ) from exc
        time.sleep(0.02)


def _remove_child_cgroups() -> None:
    for dirpath, _, _ in os.walk(HUGETLB_MOUNTPOINT, topdown=False):
        if Path(dirpath) != HUGETLB_MOUNTPOINT:
            _remove_cgroup(dirpath)


def _undo(state: _State) -> None:
    _remove_child_cgroups()
    if not _wait_until(lambda: hugetlb_hierarchy()[1] == 1):
        raise CgroupWorkaroundError("hugetlb child cgroups removed but not freed within 10 s")
    _umount_hugetlb()
    HUGETLB_MOUNTPOINT.rmdir()
    STATE_PATH.unlink()

    def restored() -> bool:
        return hugetlb_hierarchy()[0] == state.hierarchy_before

    if not _wait_until(restored, timeout=2.0):
        # The hierarchy lingers: re-mounting re-attaches it (childless now), unmounting kills it.
        HUGETLB_MOUNTPOINT.mkdir(mode=0o755)
        try:
            _mount_hugetlb()
            _umount_hugetlb()
        finally:
            HUGETLB_MOUNTPOINT.rmdir()
        if not _wait_until(restored):
            raise CgroupWorkaroundError(
                f"expected hugetlb back on hierarchy {state.hierarchy_before} after unmount, "
                f"found hierarchy {hugetlb_hierarchy()[0]}"
            )
    if unified_controllers() != state.unified_before:
        raise CgroupWorkaroundError(
            f"expected cgroup2 controllers {state.unified_before} after undo, "
            f"found {unified_controllers()}"
        )


# -- cross-process reference counting -------------------------------------------------------


def _open_state_file(path: Path) -> int:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextlib.contextmanager
def _mutex() -> Iterator[None]:
    fd = _open_state_file(MUTEX_PATH)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unused() -> bool:
    """True if no process holds a reference (a non-blocking exclusive lock succeeds)."""
    fd = _open_state_file(USERS_PATH)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _undo_if_unused_locked() -> bool:
    """Undo our workaround if nobody uses it; True if it is (now) not applied."""
    state = _read_state()
    if state is None:
        return True
    if not _unused():
        return False
    try:
        _undo(state)
    except CgroupWorkaroundError as exc:
        warnings.warn(
            f"hugetlb workaround left in place, retried later: {exc}",
            CgroupWorkaroundWarning,
            stacklevel=3,
        )
        return False
    return True


class WorkaroundRef:
    """One process's hold on the workaround (inactive if none was needed). Release once."""

    def __init__(self, users_fd: int | None) -> None:
        self._users_fd = users_fd

    @property
    def active(self) -> bool:
        return self._users_fd is not None

    def release(self) -> None:
        if self._users_fd is None:
            return
        with _mutex():
            self._release_locked()

    def _release_locked(self) -> None:
        if self._users_fd is None:
            return
        fd, self._users_fd = self._users_fd, None
        os.close(fd)  # drops our shared lock
        _undo_if_unused_locked()


@contextlib.contextmanager
def start_guard(*, crun_needed: bool, crun: str = "crun") -> Iterator[WorkaroundRef]:
    """Hold the host-wide lock while a container starts; yield the caller's reference.

    With ``crun_needed`` the workaround is applied first if crun needs it. Whatever the runtime,
    if the workaround is in place the caller gets a reference, because its container gets a
    child cgroup in the hugetlb hierarchy that must be gone before the hierarchy can go. The
    caller releases the reference after its container is deleted; if the body raises (the
    start failed), it is released here.
    """
    with _mutex():
        state = _read_state()
        if state is None and crun_needed and crun_refuses_hybrid_cgroups(crun):
            state = _apply()
            if crun_refuses_hybrid_cgroups(crun):
                _undo_if_unused_locked()
                raise CgroupWorkaroundError(
                    f"mounted hugetlb as a v1 hierarchy, but crun still says "
                    f"{CRUN_HYBRID_MESSAGE!r}"
                )
        users_fd = None
        if state is not None:
            users_fd = _open_state_file(USERS_PATH)
            fcntl.flock(users_fd, fcntl.LOCK_SH)
        ref = WorkaroundRef(users_fd)
        try:
            yield ref
        except BaseException:
            ref._release_locked()
            raise


@dataclass(frozen=True)
class WorkaroundStatus:
    applied: bool  # dvs's hugetlb mount is in place
    in_use: bool  # some process (maybe this one) holds a reference


def workaround_status() -> WorkaroundStatus:
    with _mutex():
        applied = _read_state() is not None
        return WorkaroundStatus(applied=applied, in_use=applied and not _unused())


def release_unused_workaround() -> bool:
    """Undo a workaround left applied with no users (e.g. after a crashed run).

    Returns True if the workaround is not applied afterwards.
    """
    with _mutex():
        return _undo_if_unused_locked()
