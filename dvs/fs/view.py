"""The container-attach seam for ``--backend fuse``: the tools directory as a detached mount.

Agreed with container attach (dvs.container): attach receives the tools view as a
*detached mount fd* and moves it into the attach child's private mount namespace with
``move_mount``. For the ``fuse`` backend this object starts a CntrFS server for the tools
directory in the dvs parent -- in the host mount namespace, where the tools directory is
-- and creates the FUSE filesystem there with the new mount API. The mount fd can cross
into any mount namespace; requests from the container reach the server's threads in the
parent (as in CNTR 1.x, whose server also ran in the parent, outside the container).

Ids: in a user-namespaced container, the tools' files (owned by host root) should appear
owned by the container's root, and files the container's root creates should land as host
root -- CNTR's "map down / map up". The view takes the target's uid_map/gid_map (from the
attach context, or read from ``/proc/<pid>/{uid,gid}_map``) and the server translates
every id through them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from dvs.fs.server import CntrFs, MountOptions, read_id_map
from dvs.lowlevel.fuse import IdRange, Stats


def _ranges(value: Any) -> tuple[IdRange, ...] | None:
    """Accept IdRange sequences, (inside, outside, count) tuples or uid_map text."""
    if value is None:
        return None
    if isinstance(value, str):
        rows = [line.split() for line in value.splitlines() if line.strip()]
        ranges = tuple(IdRange(int(a), int(b), int(c)) for a, b, c in rows)
    else:
        ranges = tuple(
            v if isinstance(v, IdRange) else IdRange(int(v[0]), int(v[1]), int(v[2])) for v in value
        )
    if ranges == (IdRange(0, 0, 4294967295),):
        return ()
    return ranges


class FuseToolsView:
    """Serves ``source_dir`` through CntrFS and hands out one detached mount of it."""

    backend_name = "fuse"

    def __init__(
        self,
        source_dir: str | os.PathLike[str],
        uid_map: Sequence[IdRange] | str | None = None,
        gid_map: Sequence[IdRange] | str | None = None,
        options: MountOptions | None = None,
    ) -> None:
        self.source_dir = os.fspath(source_dir)
        self._uid_map = _ranges(uid_map)
        self._gid_map = _ranges(gid_map)
        self._options = options or MountOptions()
        self.server: CntrFs | None = None

    def _maps_for(self, ctx: Any) -> tuple[tuple[IdRange, ...], tuple[IdRange, ...]]:
        uid_map, gid_map = self._uid_map, self._gid_map
        for name in ("uid_map", "gid_map"):
            current = uid_map if name == "uid_map" else gid_map
            if current is None and ctx is not None:
                found = _ranges(getattr(ctx, name, None))
                if found is None:
                    pid = getattr(ctx, "pid", None) or getattr(ctx, "target_pid", None)
                    if isinstance(pid, int) and pid > 0:
                        found = read_id_map(pid, name[:3])
                if name == "uid_map":
                    uid_map = found
                else:
                    gid_map = found
        return uid_map or (), gid_map or ()

    def make_mount_fd(self, ctx: Any = None) -> int:
        """Start the server and return a detached mount of the tools dir (caller closes it).

        ``ctx`` is the attach context; its ``uid_map``/``gid_map`` (or ``pid``) give the
        target's id maps unless the view was built with explicit ones.
        """
        if self.server is not None:
            raise RuntimeError("this view already made its mount; make a new view")
        uid_map, gid_map = self._maps_for(ctx)
        opts = replace(self._options, uid_map=uid_map, gid_map=gid_map)
        self.server = CntrFs(self.source_dir, opts)
        try:
            return self.server.make_mount_fd()
        except BaseException:
            self.server.close()
            self.server = None
            raise

    def stats(self) -> Stats | None:
        return self.server.stats() if self.server else None

    def close(self) -> None:
        """Stop serving: callers still inside the view get ENOTCONN, nobody hangs."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> FuseToolsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
