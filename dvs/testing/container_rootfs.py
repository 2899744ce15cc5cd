"""The slim container root filesystem: static busybox plus a few recognisable /etc files.

A container runtime needs nothing but a directory tree (the OCI bundle's ``root.path``); the
kernel resolves the container's ``/`` through ``pivot_root`` into that tree, so from the host
``/proc/PID/root`` of any container process is a view of it. The tree built here is:

* ``bin/busybox``, a copy of the host's static ``/bin/busybox`` (no shared libraries, so no
  ``/lib``), and one *relative* symlink per applet as ``busybox --list-full`` places them
  (``bin/sh -> busybox``, ``usr/bin/env -> ../../bin/busybox``). Relative links resolve the same
  from inside the container and from the host through ``/proc/PID/root``; absolute ones
  (what ``busybox --install -s DIR`` writes) would point at the build directory.
* ``/etc/{passwd,group,hostname,hosts,resolv.conf}`` with contents no host has (a TEST-NET
  address, the ``dvs.test`` domain), so a test can tell the container's files from the host's,
  and ``/etc/dvs-rootfs`` as a marker.
* ``/usr/bin/dvs-idle``: the default container init, a shell loop around ``sleep`` that exits
  on SIGTERM. It is started with the container id as argument, so the init is recognisable in
  ``/proc/PID/cmdline`` from the host.
* empty mount points ``/proc /sys /dev /tmp /run``, plus ``/root`` and ``/home/dvs``.

User-namespaced containers map container uid 0 to host uid 100000 (runc 1.1 has no idmapped
rootfs mounts), so they need a copy whose every owner is shifted by 100000; it is cached as a
separate artefact. Both artefacts are named after a content version and the hash of the host's
busybox, so a changed busybox or changed contents build a new artefact instead of reusing a stale
one. Artefacts are shared read-only by all runs: containers get a per-bundle copy, never the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from dvs.errors import DvsError
from dvs.testing import cache

HOST_BUSYBOX: Final = Path("/bin/busybox")

#: Bump when the contents written below change, so old caches are not reused.
ROOTFS_VERSION: Final = 1

CONTAINER_HOSTNAME: Final = "dvs-container"
CONTAINER_DOMAIN: Final = "dvs.test"
#: A TEST-NET-1 address (RFC 5737): never a real host's name server.
CONTAINER_NAMESERVER: Final = "192.0.2.53"
CONTAINER_ADDRESS: Final = "192.0.2.10"
IDLE_PROGRAM: Final = "/usr/bin/dvs-idle"
MARKER_PATH: Final = "/etc/dvs-rootfs"
MARKER_TEXT: Final = f"dvs busybox rootfs v{ROOTFS_VERSION}\n"

#: The id shift of user-namespaced containers: container id N is host id N + USERNS_ID_BASE.
USERNS_ID_BASE: Final = 100000
USERNS_ID_COUNT: Final = 65536

ETC_FILES: Final[dict[str, str]] = {
    "passwd": (
        "root:x:0:0:root:/root:/bin/sh\n"
        "dvs:x:1000:1000:dvs test user:/home/dvs:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ),
    "group": "root:x:0:\ndvs:x:1000:\nnogroup:x:65534:\n",
    "hostname": f"{CONTAINER_HOSTNAME}\n",
    "hosts": (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost\n"
        f"{CONTAINER_ADDRESS}\t{CONTAINER_HOSTNAME}.{CONTAINER_DOMAIN} {CONTAINER_HOSTNAME}\n"
    ),
    "resolv.conf": (
        "# dvs test container resolver: not the host's resolv.conf\n"
        f"nameserver {CONTAINER_NAMESERVER}\n"
        f"search {CONTAINER_DOMAIN}\n"
    ),
}

# SIGTERM ends the loop at once: ``wait`` returns when a trapped signal arrives, while a
# foreground ``sleep`` would delay the trap until it finished.
IDLE_SCRIPT: Final = """#!/bin/sh
# dvs-idle ID: the init of dvs test containers. Sleeps until SIGTERM/SIGINT; the argument only
# makes the process recognisable from the host (/proc/PID/cmdline).
trap 'exit 0' TERM INT
while :; do
    sleep 3600 &
    wait $!
done
"""


class RootfsBuildError(DvsError):
    """The busybox rootfs could not be built (host busybox missing or unusable)."""


def _busybox_digest() -> str:
    if not HOST_BUSYBOX.is_file():
        raise RootfsBuildError(
            f"expected a static busybox at {HOST_BUSYBOX} (Debian package busybox-static), "
            "found none"
        )
    return hashlib.sha256(HOST_BUSYBOX.read_bytes()).hexdigest()[:12]


def _applet_paths() -> list[str]:
    """Install paths of busybox's applets relative to /, e.g. ``usr/bin/env``."""
    listing = subprocess.run(
        [str(HOST_BUSYBOX), "--list-full"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    # linuxrc is busybox's initrd entry point at the top level: irrelevant for a container.
    return [p for p in listing if "/" in p]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _build_plain(root: Path) -> None:
    for directory in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
        "home/dvs",
        "var",
    ):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    os.chown(root / "home/dvs", 1000, 1000)

    busybox = root / "bin/busybox"
    shutil.copyfile(HOST_BUSYBOX, busybox)
    busybox.chmod(0o755)
    for applet in _applet_paths():
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(busybox, link.parent))

    for name, text in ETC_FILES.items():
        _write(root / "etc" / name, text)
    _write(root / MARKER_PATH.lstrip("/"), MARKER_TEXT)
    _write(root / IDLE_PROGRAM.lstrip("/"), IDLE_SCRIPT, 0o755)


def _shift_owners(root: Path, offset: int) -> None:
    """Add ``offset`` to the owner and group of every entry (symlinks themselves, not targets)."""

    def shift(path: str) -> None:
        info = os.lstat(path)
        os.lchown(path, info.st_uid + offset, info.st_gid + offset)

    shift(str(root))
    # Each entry is shifted exactly once: as a child of the directory being walked.
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            shift(os.path.join(dirpath, name))


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a rootfs keeping owners, modes and symlinks (``cp -a``; shutil drops owners)."""
    subprocess.run(
        ["cp", "-a", "--", str(source), str(destination)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def busybox_rootfs() -> Path:
    """The cached busybox rootfs, owned by host root. Never write into it."""
    name = f"busybox-rootfs-v{ROOTFS_VERSION}-{_busybox_digest()}"

    def build(tmp: Path) -> None:
        _build_plain(tmp / "rootfs")

    return cache.artefact(name, build) / "rootfs"


def busybox_rootfs_userns() -> Path:
    """The cached rootfs with every owner shifted by ``USERNS_ID_BASE`` (root = 100000)."""
    plain = busybox_rootfs()
    name = f"busybox-rootfs-userns{USERNS_ID_BASE}-v{ROOTFS_VERSION}-{_busybox_digest()}"

    def build(tmp: Path) -> None:
        copy_tree(plain, tmp / "rootfs")
        _shift_owners(tmp / "rootfs", USERNS_ID_BASE)

    return cache.artefact(name, build) / "rootfs"


def rootfs_build_id(rootfs: Path) -> str:
    """A short stable id of a cached rootfs (its artefact directory name)."""
    return rootfs.parent.name
