"""OCI bundles for runc and crun: a directory holding ``config.json`` and the root filesystem.

An OCI runtime (``runc``, ``crun``) starts a container from a *bundle*: ``config.json`` says
what to run (``process.args``, ``env``, ``cwd``, ``rlimits``, capabilities, ``terminal``), where
the root is (``root.path``, relative to the bundle, and ``root.readonly``), which namespaces to
create (``linux.namespaces``), which file systems to mount over the root (``mounts``) and, for a
user namespace, how ids map (``linux.uidMappings``/``gidMappings``: ``containerID`` →
``hostID`` for ``size`` ids).

Choices made here, and why:

* ``config.json`` is written directly rather than edited from ``runc spec``: the same document
  serves runc and crun, and every field is visible in this file. It mirrors ``runc spec``'s
  defaults (its namespaces, mounts, masked and read-only paths, capabilities) with
  ``terminal: false``: a detached container without a terminal inherits the runtime's stdio,
  which the caller points at ``stdio.log`` in the bundle.
* The root is a fresh ``cp -a`` copy of the cached rootfs (about 40 ms): writable containers
  never touch the shared cache, and a ``readonly`` container really has a read-only root
  because the runtime remounts its root bind mount ``MS_RDONLY`` inside the container's mount
  namespace (writes through ``/proc/PID/root`` from the host fail with EROFS too).
* User namespaces: a ``user`` namespace plus mappings 0→100000 (65536 ids) and the rootfs copy
  whose owners are shifted by 100000 (runc 1.1 has no idmapped rootfs mounts). The bundle
  directory is mode 0711 so the container's root (host uid 100000, no capabilities over host
  files) can traverse it to reach its rootfs.
* rlimits: the runtime applies ``process.rlimits`` with ``setrlimit`` in the container, and
  nobody can raise a hard limit above its own without CAP_SYS_RESOURCE, which root lacks here
  (NOFILE hard limit 20000). Requested limits are checked against this process's hard limits
  up front, so a bad request fails with a message instead of an obscure runtime error.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dvs.errors import DvsError
from dvs.testing import container_rootfs

BUNDLE_PREFIX: Final = "dvs-bundle-"
CONFIG_NAME: Final = "config.json"
ROOTFS_NAME: Final = "rootfs"
STDIO_LOG_NAME: Final = "stdio.log"

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_RLIMITS: Final[Mapping[str, tuple[int, int]]] = {"RLIMIT_NOFILE": (1024, 1024)}

# runc spec's defaults: enough for a shell and its tools, far from privileged.
DEFAULT_CAPABILITIES: Final = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")
MASKED_PATHS: Final = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)
READONLY_PATHS: Final = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


class BundleError(DvsError, ValueError):
    """A bundle was requested with options no runtime on this host can satisfy."""


@dataclass(frozen=True)
class Mount:
    """An extra mount in the container (OCI ``mounts`` entry); default a read-only bind."""

    destination: str
    source: str
    type: str = "bind"
    options: tuple[str, ...] = ("rbind", "ro")

    def to_oci(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


@dataclass(frozen=True)
class BundleOptions:
    """What a container should look like; shared by the OCI runtimes and podman."""

    args: tuple[str, ...] | None = None  # None: the idle init with the container id
    hostname: str = container_rootfs.CONTAINER_HOSTNAME
    readonly: bool = False
    userns: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_RLIMITS))
    cwd: str = "/"
    user: tuple[int, int] = (0, 0)
    """``process.user`` (uid, gid) inside the container."""
    capabilities: tuple[str, ...] | None = None
    """None: ``runc spec``'s set as bounding, effective, permitted and ambient. Given: exactly
    these in all five sets, inheritable included (the runtime raises an ambient capability
    only when it is inheritable and permitted, and a non-root process keeps capabilities
    across its execve only through the ambient set)."""

    def process_args(self, container_id: str) -> list[str]:
        if self.args is None:
            return [container_rootfs.IDLE_PROGRAM, container_id]
        if not self.args:
            raise BundleError("expected a non-empty process argument list, found []")
        return list(self.args)

    def check_rlimits(self) -> None:
        """Fail early when a hard limit is above ours: the runtime's setrlimit would fail."""
        for name, (soft, hard) in self.rlimits.items():
            number = getattr(resource, name, None)
            if not isinstance(number, int):
                raise BundleError(f"expected an RLIMIT_* name, found {name!r}")
            if soft > hard:
                raise BundleError(f"{name}: soft limit {soft} is above the hard limit {hard}")
            _, our_hard = resource.getrlimit(number)
            if our_hard != resource.RLIM_INFINITY and hard > our_hard:
                raise BundleError(
                    f"{name}: expected a hard limit <= {our_hard} (this process's hard limit; "
                    f"raising it needs CAP_SYS_RESOURCE), found {hard}"
                )


def _id_mappings() -> list[dict[str, int]]:
    return [
        {
            "containerID": 0,
            "hostID": container_rootfs.USERNS_ID_BASE,
            "size": container_rootfs.USERNS_ID_COUNT,
        }
    ]


def oci_config(options: BundleOptions, container_id: str) -> dict[str, Any]:
    """The ``config.json`` document for ``options`` (rootfs at ``<bundle>/rootfs``)."""
    options.check_rlimits()
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "HOSTNAME": options.hostname}
    env.update(options.env)
    sets = ["bounding", "effective", "permitted", "ambient"]
    if options.capabilities is None:
        caps = list(DEFAULT_CAPABILITIES)
    else:
        caps, sets = list(options.capabilities), [*sets, "inheritable"]
    namespaces = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if options.userns:
        namespaces.append({"type": "user"})
        linux["uidMappings"] = _id_mappings()
        linux["gidMappings"] = _id_mappings()
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]
    mounts.extend(m.to_oci() for m in options.mounts)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": options.user[0], "gid": options.user[1]},
            "args": options.process_args(container_id),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": options.cwd,
            "capabilities": {k: caps for k in sets},
            "rlimits": [
                {"type": name, "soft": soft, "hard": hard}
                for name, (soft, hard) in options.rlimits.items()
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": ROOTFS_NAME, "readonly": options.readonly},
        "hostname": options.hostname,
        "mounts": mounts,
        "linux": linux,
    }


@dataclass(frozen=True)
class Bundle:
    """A bundle directory on disk; ``remove()`` deletes it."""

    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS_NAME

    @property
    def stdio_log(self) -> Path:
        return self.path / STDIO_LOG_NAME

    def read_stdio_log(self, limit: int = 4000) -> str:
        """The tail of what the container and the runtime wrote (for error messages)."""
        try:
            data = self.stdio_log.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace").strip()

    def remove(self) -> None:
        shutil.rmtree(self.path)


def make_bundle(options: BundleOptions, container_id: str, parent: Path | None = None) -> Bundle:
    """Create a fresh bundle (temp dir named after this pid, so leftovers can be attributed)."""
    config = oci_config(options, container_id)  # validates before anything is written
    source = (
        container_rootfs.busybox_rootfs_userns()
        if options.userns
        else container_rootfs.busybox_rootfs()
    )
    path = Path(tempfile.mkdtemp(prefix=f"{BUNDLE_PREFIX}{os.getpid()}-", dir=parent))
    bundle = Bundle(path)
    try:
        path.chmod(0o711)
        container_rootfs.copy_tree(source, bundle.rootfs)
        bundle.config_path.write_text(json.dumps(config, indent=2) + "\n")
        bundle.stdio_log.touch(0o600)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return bundle


def bundle_parent_dirs() -> Sequence[Path]:
    """Where bundles are created (for leftover cleanup)."""
    return (Path(tempfile.gettempdir()),)
