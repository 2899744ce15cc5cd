"""The project cache: built artefacts shared by tests, benchmarks and the demo.

Artefacts (a busybox rootfs, a guest kernel kit, the minimal KVM guest) are expensive to build
and identical between runs, so they live in one directory that git ignores:
``$DVS_CACHE_DIR`` or ``<repo>/.cache/dvs``. Several test runs may build the same artefact at
once (parallel sessions, xdist), so every build happens under an exclusive ``flock`` on
``<name>.lock`` and is published by an atomic ``rename`` of a finished temporary directory:
a reader either sees nothing or a complete artefact, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """The cache root, created on first use."""
    root = Path(os.environ.get("DVS_CACHE_DIR") or _REPO_ROOT / ".cache" / "dvs")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the exclusive build lock of artefact ``name`` (blocks until it is free)."""
    lock_path = cache_dir() / f"{name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def artefact(name: str, build: Callable[[Path], None]) -> Path:
    """Return the cached directory ``name``, building it with ``build(tmpdir)`` if missing.

    ``build`` fills an empty temporary directory; on success it is renamed into place.
    A failed build leaves nothing behind, so the next call tries again.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    with locked(name):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir()))
        try:
            build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
