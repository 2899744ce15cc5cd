"""CntrFS: the FUSE proxy filesystem that serves a directory (the tools side) to a container.

``CntrFs`` runs the C server (csrc/fuse/) for one source directory and mounts it -- at a
path (``mount``) or as a detached mount (``make_mount_fd``) that another mount namespace
attaches with ``move_mount``; ``FuseToolsView`` is the container-attach seam built on that.
No request is ever handled in Python: Python chooses the options, starts, observes
(``stats``) and stops the server.
"""

from __future__ import annotations

from dvs.fs.server import CntrFs, MountOptions, read_id_map
from dvs.fs.view import FuseToolsView

__all__ = ["CntrFs", "FuseToolsView", "MountOptions", "read_id_map"]
