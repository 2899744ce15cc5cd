"""The fence around the C core: the only package that touches ``dvs._native``.

Everything in here is a thin, typed wrapper around one C entry point. C functions return a
non-negative result or ``-errno``; ``check`` turns a negative result into the matching
``OSError`` subclass (``FileNotFoundError``, ``PermissionError``, ...), so callers get the
standard Python exceptions for syscall failures and ``dvs.errors`` for dvs-level ones.
Code outside ``dvs.lowlevel`` never sees ``ffi`` or ``lib``.
"""

from __future__ import annotations

import os

try:
    from dvs._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "the dvs C core is not built; run scripts/setup.sh (or python3 setup.py build_ext "
        "--inplace)"
    ) from exc

__all__ = ["check", "ffi", "lib"]


def check(result: int, what: str, filename: str | None = None) -> int:
    """Return ``result`` if it is >= 0; raise the OSError for ``-result`` otherwise."""
    if result >= 0:
        return result
    err = -result
    raise OSError(err, f"{what}: {os.strerror(err)}", filename)
