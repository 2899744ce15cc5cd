"""Rootless podman test containers: a system user of our own runs podman without root.

The semantics these fixtures rely on:

* **Rootless podman** runs as an ordinary user. Its user namespace maps container uid/gid 0
  to the user's own uid/gid and container ids 1..N to the user's subordinate range from
  ``/etc/subuid``/``/etc/subgid`` (``NAME:FIRST:COUNT``), written by the setuid helpers
  ``newuidmap``/``newgidmap``. So container id ``n >= 1`` is host id ``FIRST + n - 1``.
* **Where it keeps things**: images and containers under ``$HOME/.local/share/containers``
  (the graph root), runtime state under ``$XDG_RUNTIME_DIR`` (``/run/user/UID``: ``libpod/``,
  ``containers/``, and runc's own state root ``runc/``). Without systemd-logind nobody
  creates ``/run/user/UID``, so the fixture does (owned by the user, mode 0700). Its
  presence with ``libpod/`` in it is also what tells ``dvs.container.resolve`` to ask
  podman as that user.
* **Configuration** (``$HOME/.config/containers``): neither fuse-overlayfs nor slirp4netns
  is installed, so storage uses the ``vfs`` driver (a plain copy of every layer; the busybox
  image is ~2 MiB) and containers get ``--network none``. cgroups are hybrid here and there
  is no systemd user session: ``cgroup_manager = "cgroupfs"`` and ``events_logger =
  "file"``. Rootless crun refuses hybrid cgroups here ("cgroups in hybrid mode not
  supported", with or without ``--cgroups disabled``); rootless runc runs, leaving the
  container in its parent's cgroups since it may not create its own, so these containers
  run under runc.
* **Processes**: the first podman command starts a *pause process* (``podman pause``,
  pid in ``$XDG_RUNTIME_DIR/libpod/tmp/pause.pid``) that keeps the user and mount
  namespace alive between commands; each container has a ``conmon`` parent, reparented to
  PID 1. ``podman rm --force`` stops the container; conmon exits right after. The pause
  process and the runtime directory are removed when the last fixture that uses the user
  ends: each live fixture holds a shared ``flock`` on ``rootless-podman-active.lock`` in
  the project cache, and the one that can turn it into an exclusive lock is the last.
* **Identity**: podman runs via ``setpriv --reuid --regid --clear-groups`` (the kernel drops
  root's capabilities on the uid change) with a clean environment: ``HOME``, ``USER``,
  ``LOGNAME``, ``XDG_RUNTIME_DIR`` and ``PATH``, in the user's home directory.

Set-up (user, subordinate ids, runtime directory, configuration, image import) is
idempotent and runs under the cache lock ``rootless-podman-user``; the image is imported
once per user and rootfs build and stays in the user's storage between runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dvs.testing import cache, container_rootfs
from dvs.testing.containers import (
    COMMAND_TIMEOUT,
    EXIT_TIMEOUT,
    PODMAN_IMAGE_REPOSITORY,
    ContainerError,
    ContainerStartError,
    PodmanContainer,
    _Cleanup,
    _owner_is_dead,
    _podman_ulimits,
    _text,
    new_container_id,
)

__all__ = [
    "ROOTLESS_USER",
    "RootlessPodmanContainer",
    "RootlessUser",
    "ensure_rootless_user",
    "rootless_podman_image",
    "rootless_unavailable_reason",
    "run_rootless_podman",
]

ROOTLESS_USER: Final = "dvs-rootless"
ROOTLESS_HOME: Final = Path("/var/lib/dvs-rootless")
#: The subordinate id range given to the user if it has none (clear of the 100000.. range
#: the root-run user-namespaced containers use).
SUBID_FIRST: Final = 400000
SUBID_COUNT: Final = 65536
RUN_USER_DIR: Final = Path("/run/user")
USER_PATH: Final = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
SETUP_LOCK: Final = "rootless-podman-user"
ACTIVE_LOCK: Final = "rootless-podman-active"
LOCK_TIMEOUT: Final = 120.0

STORAGE_CONF: Final = '[storage]\ndriver = "vfs"\n'
CONTAINERS_CONF: Final = (
    '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
)


@dataclass(frozen=True)
class SubordinateIds:
    """One ``/etc/subuid`` or ``/etc/subgid`` range: container id n>=1 is host id first+n-1."""

    first: int
    count: int

    def host_id(self, container_id: int) -> int:
        if not 1 <= container_id <= self.count:
            raise ValueError(f"container id {container_id} is outside 1..{self.count}")
        return self.first + container_id - 1


@dataclass(frozen=True)
class RootlessUser:
    """The system user that runs rootless podman, and how to run commands as it."""

    name: str
    uid: int
    gid: int
    home: Path
    subuids: SubordinateIds
    subgids: SubordinateIds

    @property
    def runtime_dir(self) -> Path:
        return RUN_USER_DIR / str(self.uid)

    def environment(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "PATH": USER_PATH,
        }

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as this user: its ids, no supplementary groups, a clean environment."""
        variables = [f"{key}={value}" for key, value in self.environment().items()]
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            "env",
            "-i",
            f"--chdir={self.home}",
            *variables,
            *argv,
        ]

    def run(
        self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.command(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )

    def podman(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run(["podman", *args], timeout=timeout, input=input)


@dataclass
class RootlessPodmanContainer(PodmanContainer):
    """A container of the rootless user's podman (its ``podman exec`` runs as that user)."""

    user: RootlessUser | None = None
    conmon_pid: int = 0

    def _exec_prefix(self) -> list[str]:
        assert self.user is not None
        return self.user.command(["podman", "exec", self.name])


def rootless_unavailable_reason() -> str | None:
    """Why rootless podman containers cannot run here, or None (the tools it needs)."""
    if os.geteuid() != 0:
        return "setting up the rootless user needs root"
    for tool in ("podman", "runc", "conmon", "newuidmap", "newgidmap", "setpriv", "useradd"):
        if shutil.which(tool, path=USER_PATH) is None:
            return f"{tool} is not installed"
    if not container_rootfs.HOST_BUSYBOX.is_file():
        return f"no static busybox at {container_rootfs.HOST_BUSYBOX}"
    return None


# -- set-up ---------------------------------------------------------------------------------


def _checked(argv: Sequence[str], what: str) -> None:
    result = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        raise ContainerError(f"{what}: {' '.join(argv)}: {_text(result)}")


def _subordinate_ids(path: Path, user: pwd.struct_passwd) -> SubordinateIds | None:
    """The user's first range in ``path`` (entries name the user or its uid), or None."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user.pw_name, str(user.pw_uid)):
            return SubordinateIds(int(fields[1]), int(fields[2]))
    return None


def _overlapping_owner(path: Path, user: pwd.struct_passwd, wanted: SubordinateIds) -> str | None:
    """Another entry of ``path`` whose range overlaps ``wanted``, as its line."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] in (user.pw_name, str(user.pw_uid)):
            continue
        first, count = int(fields[1]), int(fields[2])
        if first < wanted.first + wanted.count and wanted.first < first + count:
            return line
    return None


def _write_owned(home: Path, path: Path, text: str, uid: int, gid: int) -> None:
    """Write ``text`` (if different) to ``path`` under ``home``, creating the directories
    between them; all owned by ``uid``."""
    for parent in reversed(path.parents):
        if parent.is_relative_to(home) and not parent.exists():
            parent.mkdir(mode=0o755)
            os.chown(parent, uid, gid)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    os.chown(path, uid, gid)


def _ensure_runtime_dir(uid: int, gid: int) -> Path:
    RUN_USER_DIR.mkdir(mode=0o755, exist_ok=True)
    runtime_dir = RUN_USER_DIR / str(uid)
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime_dir, uid, gid)
    os.chmod(runtime_dir, 0o700)
    return runtime_dir


def ensure_rootless_user(name: str = ROOTLESS_USER) -> RootlessUser:
    """Create (once) the user, its subordinate ids, runtime directory and podman config."""
    with cache.locked(SETUP_LOCK):
        return _ensure_rootless_user_locked(name)


def _ensure_rootless_user_locked(name: str) -> RootlessUser:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _checked(
            [
                "useradd",
                "--system",
                "--user-group",
                "--create-home",
                "--home-dir",
                str(ROOTLESS_HOME),
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "dvs rootless podman tests",
                name,
            ],
            f"create user {name}",
        )
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    home.mkdir(mode=0o755, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    ranges: dict[str, SubordinateIds] = {}
    for kind, path in (("uid", Path("/etc/subuid")), ("gid", Path("/etc/subgid"))):
        found = _subordinate_ids(path, entry)
        if found is None:
            wanted = SubordinateIds(SUBID_FIRST, SUBID_COUNT)
            clash = _overlapping_owner(path, entry, wanted)
            if clash is not None:
                raise ContainerError(
                    f"{path}: the range {wanted.first}:{wanted.count} for {name} overlaps "
                    f"the entry {clash!r}"
                )
            last = wanted.first + wanted.count - 1
            _checked(
                ["usermod", f"--add-sub{kind}s", f"{wanted.first}-{last}", name],
                f"give {name} subordinate {kind}s",
            )
            found = _subordinate_ids(path, entry)
            if found is None:
                raise ContainerError(f"usermod added no {kind} range for {name} to {path}")
        ranges[kind] = found
    _ensure_runtime_dir(entry.pw_uid, entry.pw_gid)
    config = home / ".config" / "containers"
    _write_owned(home, config / "storage.conf", STORAGE_CONF, entry.pw_uid, entry.pw_gid)
    _write_owned(home, config / "containers.conf", CONTAINERS_CONF, entry.pw_uid, entry.pw_gid)
    return RootlessUser(
        name=name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=home,
        subuids=ranges["uid"],
        subgids=ranges["gid"],
    )


def rootless_podman_image(user: RootlessUser) -> str:
    """The busybox rootfs as an image in ``user``'s storage (imported once per build)."""
    rootfs = container_rootfs.busybox_rootfs()
    tag = f"{PODMAN_IMAGE_REPOSITORY}:{container_rootfs.rootfs_build_id(rootfs)}"
    with cache.locked(SETUP_LOCK):
        if user.podman("image", "exists", tag).returncode == 0:
            return tag
        # the rootfs directory is root's; the user reads the tarball from its stdin
        packed = subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )
        if packed.returncode != 0:
            raise ContainerError(f"tar of {rootfs}: {_text(packed)}")
        imported = user.podman(
            "import",
            "--change",
            f'CMD ["{container_rootfs.IDLE_PROGRAM}"]',
            "-",
            tag,
            input=packed.stdout,
        )
        if imported.returncode != 0:
            raise ContainerError(f"podman import {tag} as {user.name}: {_text(imported)}")
    return tag


# -- the users' lifetime lock and teardown ----------------------------------------------------


@contextlib.contextmanager
def _active_user_share() -> Iterator[int]:
    """Hold a shared lock while a rootless container lives; yields the lock's fd."""
    fd = os.open(
        cache.cache_dir() / f"{ACTIVE_LOCK}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ContainerError(
                        f"{ACTIVE_LOCK}.lock still held exclusively after {LOCK_TIMEOUT:.0f} s"
                    ) from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


def _last_user(fd: int) -> bool:
    """Turn our shared lock into an exclusive one if no other fixture holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _live(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 reaps orphans only now and then)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _live(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _owned_by(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except FileNotFoundError:
        return False


def _stop_pause_process(user: RootlessUser) -> None:
    """End the user's podman pause process (it holds the rootless user namespace)."""
    pid_file = user.runtime_dir / "libpod" / "tmp" / "pause.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if not _live(pid) or not _owned_by(pid, user.uid):
        return
    os.kill(pid, signal.SIGTERM)
    if not _wait_dead(pid, EXIT_TIMEOUT / 3):
        os.kill(pid, signal.SIGKILL)
        if not _wait_dead(pid, EXIT_TIMEOUT):
            raise ContainerError(f"podman pause process {pid} of {user.name} survived SIGKILL")


def _user_processes(uid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _owned_by(int(p), uid)]


def _tear_down(user: RootlessUser) -> None:
    """With no rootless container left: stop the pause process, remove /run/user/UID."""
    listed = user.podman("ps", "--all", "--quiet")
    if listed.returncode == 0 and listed.stdout.strip():
        return  # someone else's container (not one of ours) still uses the runtime dir
    _stop_pause_process(user)
    leftovers = [pid for pid in _user_processes(user.uid) if _live(pid)]
    if leftovers:
        raise ContainerError(f"processes of {user.name} still run: {leftovers}")
    shutil.rmtree(user.runtime_dir, ignore_errors=True)


def _remove_dead_owners_containers(user: RootlessUser) -> None:
    listed = user.podman("ps", "--all", "--format", "{{.Names}}")
    for name in listed.stdout.decode().split():
        if _owner_is_dead(name):
            user.podman("rm", "--force", "--time", "0", name)


# -- the container --------------------------------------------------------------------------


def _vfs_rootfs(user: RootlessUser, graph_root: Path, container_id: str) -> Path:
    """The vfs layer directory that is the container's /, from containers/storage's index."""
    index = graph_root / "vfs-containers" / "containers.json"
    for record in json.loads(index.read_text()):
        if record.get("id") == container_id:
            return graph_root / "vfs" / "dir" / str(record["layer"])
    raise ContainerError(f"{index} has no container {container_id} of {user.name}")


@contextlib.contextmanager
def run_rootless_podman(
    *,
    args: Sequence[str] | None = None,
    hostname: str = container_rootfs.CONTAINER_HOSTNAME,
    start_timeout: float = 60.0,
    user_name: str = ROOTLESS_USER,
) -> Iterator[RootlessPodmanContainer]:
    """Start a detached busybox container of the rootless user's podman; remove it on exit.

    The container runs under runc with ``--network none``; ``args`` default to the idle
    init. On exit the container is removed and its init and conmon are waited for; the last
    fixture using the user also ends the pause process and removes ``/run/user/UID``.
    """
    reason = rootless_unavailable_reason()
    if reason is not None:
        raise ContainerError(f"rootless podman cannot run here: {reason}")
    name = new_container_id()
    cleanup = _Cleanup(f"rootless podman container {name}")
    body_error: BaseException | None = None
    with _active_user_share() as active_fd:
        user = ensure_rootless_user(user_name)
        pid: int | None = None
        conmon_pid: int | None = None
        try:
            _remove_dead_owners_containers(user)
            image = rootless_podman_image(user)
            started = user.podman(
                "run",
                "--detach",
                "--name",
                name,
                "--runtime",
                "runc",
                "--pull",
                "never",
                "--network",
                "none",
                "--no-hosts",
                "--hostname",
                hostname,
                *_podman_ulimits(),
                image,
                *(args if args is not None else [container_rootfs.IDLE_PROGRAM, name]),
                timeout=start_timeout,
            )
            if started.returncode != 0:
                raise ContainerStartError(f"podman run as {user.name}: {_text(started)}")
            inspected = user.podman("inspect", "--type", "container", name)
            if inspected.returncode != 0:
                raise ContainerStartError(f"podman inspect {name}: {_text(inspected)}")
            data: dict[str, Any] = json.loads(inspected.stdout)[0]
            pid = int(data["State"]["Pid"])
            conmon_pid = int(data["State"].get("ConmonPid") or 0) or None
            if not data["State"].get("Running") or pid <= 0:
                logs = user.podman("logs", name)
                raise ContainerStartError(
                    f"{name}: expected a running container, found state "
                    f"{data['State'].get('Status')}: {_text(logs)}"
                )
            info = user.podman("info", "--format", "{{.Store.GraphRoot}}")
            if info.returncode != 0:
                raise ContainerStartError(f"podman info as {user.name}: {_text(info)}")
            graph_root = Path(info.stdout.decode().strip())
            yield RootlessPodmanContainer(
                id=data["Id"],
                runtime="runc",
                pid=pid,
                bundle=Path(data["StaticDir"]),
                rootfs=_vfs_rootfs(user, graph_root, data["Id"]),
                hostname=hostname,
                readonly=False,
                userns=True,
                name=name,
                image=image,
                inspect_data=data,
                user=user,
                conmon_pid=conmon_pid or 0,
            )
        except BaseException as exc:
            body_error = exc
            raise
        finally:

            def remove() -> None:
                result = user.podman("rm", "--force", "--time", "0", name)
                if (
                    result.returncode != 0
                    and user.podman("container", "exists", name).returncode == 0
                ):
                    raise ContainerError(f"podman rm -f as {user.name}: {_text(result)}")

            def wait_gone() -> None:
                for what, gone_pid in (("init", pid), ("conmon", conmon_pid)):
                    if gone_pid is not None and not _wait_dead(gone_pid, EXIT_TIMEOUT):
                        raise ContainerError(f"{what} pid {gone_pid} still runs after podman rm")

            cleanup.step("podman rm", remove)
            cleanup.step("wait for the init and conmon to end", wait_gone)
            if _last_user(active_fd):
                cleanup.step("stop the user's podman", functools.partial(_tear_down, user))
            cleanup.finish(body_error)
