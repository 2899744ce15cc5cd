"""Container attach (CNTR, re-done): tools for slim containers, without touching them.

``attach(target, command)`` runs ``command`` with the tools side (the host, a directory or
an OCI bundle) at ``/`` and the container's root at ``/var/lib/cntr``, in the container's
complete process context; ``exec_in(target, command)`` runs it in the container's own
root; ``Session`` is the same as a context manager for programs that embed dvs. Targets
are container names of any engine, pids, or command-line text (``resolve``).
"""

from __future__ import annotations

from dvs.container.attach import (
    DEVNULL,
    PIPE,
    AttachOptions,
    Session,
    attach,
    exec_in,
)
from dvs.container.errors import AmbiguousTarget, AttachFailed, BackendUnavailable
from dvs.container.resolve import Target, resolve
from dvs.container.views import ToolsView

__all__ = [
    "DEVNULL",
    "PIPE",
    "AmbiguousTarget",
    "AttachFailed",
    "AttachOptions",
    "BackendUnavailable",
    "Session",
    "Target",
    "ToolsView",
    "attach",
    "exec_in",
    "resolve",
]
