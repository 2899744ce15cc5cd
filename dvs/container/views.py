"""The tools view: what the attached command sees at ``/``, handed over as one mount fd.

THE SEAM between attach and its filesystem backends. The attach child (C, see
csrc/container/attach.c) receives the tools side as a *detached mount* -- an fd made by
``open_tree(OPEN_TREE_CLONE)`` or ``fsmount()`` that is not attached anywhere yet. It moves
that mount on top of "/" in its private mount namespace, mounts the container's root at
the base directory below it and the container's /proc, /dev, /sys and /etc files over it.
The child neither knows nor cares how the mount was made, so a backend is anything that
implements ``ToolsView``:

    class ToolsView(Protocol):
        backend_name: str                                # "mount", "fuse", ...
        def make_mount_fd(self, ctx: TargetContext) -> int: ...
        def close(self) -> None: ...

``make_mount_fd`` is called in the dvs process (host mount namespace) once per attach,
after the target's context is known (its user namespace and id maps are in ``ctx``); it
returns a new detached mount fd that the caller closes once the child has it. ``close``
runs after the session ended (a FUSE server stops there). Backends:

- ``mount`` (here): ``open_tree(tools_root, OPEN_TREE_CLONE|AT_RECURSIVE)``, made private
  (a clone of a shared mount would otherwise be a peer of the original, and mounts made
  under it in the child would propagate back to the host). When the target lives in a
  user namespace, each mount of the tree is cloned on its own and id-mapped with the
  target's user namespace (``mount_setattr(MOUNT_ATTR_IDMAP)``, 5.12): files owned by host
  root then appear owned by the container's root, and files the container's root creates
  land as host root -- CntrFS's uid shifting, done by the VFS. proc, sysfs and the like
  cannot be id-mapped (and are covered by the container's own anyway) and stay as they
  are; mounts are attached onto the detached tree (Linux 6.15 allows mounting on
  detached mounts; before that, only the root mount is id-mapped).
- ``fuse``: provided by ``dvs.fs`` (CntrFS), looked up lazily as
  ``dvs.fs.make_tools_view(root)`` or ``dvs.fs.FuseToolsView(root)``. Its
  ``make_mount_fd(ctx)`` does fsopen("fuse") / fsconfig(fd=<dev fd>, rootmode=...,
  allow_other, default_permissions) / fsmount and serves the tree from the dvs process,
  shifting ids with ``ctx.uid_map``/``ctx.gid_map`` (``IdExtent`` rows: inside, outside,
  length) the way CntrFS does. Until dvs.fs provides it, ``--backend fuse`` raises
  BackendUnavailable.

The tools root is the host's ``/`` by default, or any directory, or an OCI bundle (its
config.json's ``root.path``) -- a "fat" tools image next to a slim container.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dvs.container import mountinfo
from dvs.container.context import TargetContext
from dvs.container.errors import BackendUnavailable
from dvs.container.mountinfo import MountEntry
from dvs.errors import DvsError
from dvs.lowlevel import sys as llsys

BACKENDS: tuple[str, ...] = ("mount", "fuse")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: subtrees of the tools side that the container's own cover; never id-mapped or cloned
COVERED = ("proc", "sys", "dev")


@runtime_checkable
class ToolsView(Protocol):
    backend_name: str

    def make_mount_fd(self, ctx: TargetContext) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ToolsRoot:
    """Where the tools come from: a directory, and the PATH to find them with."""

    path: str
    search_path: str
    source: str  # "host", "directory" or "OCI bundle <dir>"


def tools_root(spec: str | None, host_path: str | None = None) -> ToolsRoot:
    """``None``: the host (its PATH); a directory; or an OCI bundle (config.json)."""
    if spec is None:
        return ToolsRoot("/", host_path or os.environ.get("PATH") or DEFAULT_PATH, "host")
    path = os.path.realpath(spec)
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
            root = str(config.get("root", {}).get("path", "rootfs"))
            env = config.get("process", {}).get("env", []) or []
        except (OSError, ValueError, AttributeError) as exc:
            raise DvsError(f"tools bundle {spec}: unreadable config.json: {exc}") from None
        rootfs = os.path.realpath(os.path.join(path, root))
        if not os.path.isdir(rootfs):
            raise DvsError(f"tools bundle {spec}: root {rootfs} is not a directory")
        search = next((e[5:] for e in env if isinstance(e, str) and e.startswith("PATH=")), None)
        return ToolsRoot(rootfs, search or DEFAULT_PATH, f"OCI bundle {path}")
    if not os.path.isdir(path):
        raise DvsError(f"tools {spec!r} is neither a directory nor an OCI bundle")
    return ToolsRoot(path, DEFAULT_PATH, "directory")


def submounts(entries: Sequence[MountEntry], root: str) -> list[tuple[str, MountEntry]]:
    """Mounts strictly below ``root`` as (path relative to root, entry), parents first,
    leaving out the covered subtrees and mounts hidden under a later mount at the same
    place (the last one listed on a mount point is the visible one)."""
    base = root.rstrip("/")
    chosen: dict[str, MountEntry] = {}
    for entry in entries:
        mp = entry.mount_point
        if base and not mp.startswith(base + "/"):
            continue
        rel = mp[len(base) :].strip("/")
        if not rel or rel.split("/")[0] in COVERED:
            continue
        chosen.pop(rel, None)  # a later mount on the same place hides the earlier one
        chosen[rel] = entry
    return sorted(chosen.items(), key=lambda item: item[0].count("/"))


@dataclass
class MountView:
    """Backend ``mount``: a clone of the tools tree (see module note)."""

    root: str = "/"
    idmap: bool = True
    warnings: list[str] = field(default_factory=list)
    backend_name: str = "mount"

    def make_mount_fd(self, ctx: TargetContext) -> int:
        if self.idmap and ctx.in_user_ns and "user" in ctx.ns_fds:
            return self._idmapped_tree(ctx.ns_fds["user"])
        tree = llsys.open_tree(
            llsys.AT_FDCWD,
            self.root,
            llsys.OPEN_TREE_CLONE | llsys.OPEN_TREE_CLOEXEC | llsys.AT_RECURSIVE,
        )
        try:
            _make_private(tree, recursive=True)
        except BaseException:
            os.close(tree)
            raise
        return tree

    def _idmapped_tree(self, userns_fd: int) -> int:
        flags = llsys.OPEN_TREE_CLONE | llsys.OPEN_TREE_CLOEXEC
        tree = llsys.open_tree(llsys.AT_FDCWD, self.root, flags)
        try:
            _make_private(tree, recursive=False)
            try:
                _idmap(tree, userns_fd)
            except OSError as exc:
                self.warnings.append(
                    f"tools root {self.root} cannot be id-mapped ({exc.strerror}); its files "
                    "keep their host owners (unmapped ones show as nobody)"
                )
            mounts = submounts(mountinfo.read(), self.root)
            for rel, entry in mounts:
                self._add_submount(tree, rel, entry, userns_fd)
        except BaseException:
            os.close(tree)
            raise
        return tree

    def _add_submount(self, tree: int, rel: str, entry: MountEntry, userns_fd: int) -> None:
        try:
            sub = llsys.open_tree(
                llsys.AT_FDCWD, entry.mount_point, llsys.OPEN_TREE_CLONE | llsys.OPEN_TREE_CLOEXEC
            )
        except OSError as exc:
            self.warnings.append(f"tools mount {entry.mount_point} left out: {exc.strerror}")
            return
        try:
            _make_private(sub, recursive=False)
            with contextlib.suppress(OSError):  # proc-like file systems cannot be id-mapped
                _idmap(sub, userns_fd)
            llsys.move_mount(sub, "", tree, rel, llsys.MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as exc:
            self.warnings.append(f"tools mount {entry.mount_point} left out: {exc.strerror}")
        finally:
            os.close(sub)

    def close(self) -> None:
        pass


def _make_private(fd: int, *, recursive: bool) -> None:
    flags = llsys.AT_EMPTY_PATH | (llsys.AT_RECURSIVE if recursive else 0)
    llsys.mount_setattr(fd, "", flags, propagation=llsys.MS_PRIVATE)


def _idmap(fd: int, userns_fd: int) -> None:
    llsys.mount_setattr(
        fd, "", llsys.AT_EMPTY_PATH, attr_set=llsys.MOUNT_ATTR_IDMAP, userns_fd=userns_fd
    )


def open_view(backend: str, root: str, *, idmap: bool = True) -> ToolsView:
    """The tools view of ``backend`` over directory ``root``."""
    if backend == "mount":
        return MountView(root, idmap)
    if backend == "fuse":
        try:
            fs = importlib.import_module("dvs.fs")
        except ImportError:
            fs = None
        factory = getattr(fs, "make_tools_view", None) or getattr(fs, "FuseToolsView", None)
        if factory is None:
            raise BackendUnavailable(
                "the fuse backend is not available yet: dvs.fs (CntrFS) provides no tools "
                "view; use --backend mount"
            )
        view = factory(root)
        if not isinstance(view, ToolsView):
            raise BackendUnavailable(f"dvs.fs.make_tools_view returned {view!r}, not a ToolsView")
        return view
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
