"""Errors of container attach, refining the dvs tree (dvs.errors).

A caller reacts to *whose* fault a failure is: no or several matching targets (the name),
a target that went away (retry), a missing privilege, a backend that is not there, or a
step of the attach itself that the kernel refused (which step, and the errno).
"""

from __future__ import annotations

import os

from dvs.errors import DvsError, TargetNotFound


class AmbiguousTarget(TargetNotFound):
    """Several different containers or processes match; ``candidates`` describes each."""

    def __init__(self, target: str, candidates: list[str], tried: list[str] | None = None):
        self.candidates = list(candidates)
        super().__init__(target, tried)
        listing = "".join(f"\n  - {c}" for c in self.candidates)
        self.args = (
            f"{target!r} is ambiguous: it matches {len(self.candidates)} targets:{listing}"
            "\n(name one exactly, or choose the engine with -t)",
        )


class UnknownType(DvsError, ValueError):
    """A ``-t`` value that names no resolver."""


class BackendUnavailable(DvsError):
    """The requested tools-view backend cannot be used on this host (yet)."""


class AttachFailed(DvsError):
    """A step of entering the target's context failed (``step`` says which, ``errno``)."""

    def __init__(self, step: str, errno: int, detail: str = "") -> None:
        self.step = step
        self.errno = errno
        message = f"attach failed while {step}: {os.strerror(errno)}"
        super().__init__(f"{message} ({detail})" if detail else message)
