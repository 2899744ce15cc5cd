"""Real CntrFS mounts for tests, benchmarks and the demo.

``cntrfs_mount`` creates a source directory and a mount point (world-searchable, so tests
can act as other users), mounts CntrFS there in this process and tears everything down
again -- lazily unmounting and aborting the connection even when the body failed, so a
broken test never leaves a hanging mount behind.

``DVS_TEST_FS_URING=off|on|auto`` sets the transport of every mount made here whose options
do not name one (``uring=auto`` is the default), so the whole suite can run over /dev/fuse
read/write and over FUSE-over-io_uring.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dvs.fs.server import CntrFs, MountOptions


@dataclass
class MountedFs:
    source: Path
    mountpoint: Path
    fs: CntrFs


def world_dir(prefix: str, base: str | None = None) -> Path:
    """A fresh directory readable and searchable by everybody (tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def world_tempdir(prefix: str, base: str | None = None) -> Iterator[Path]:
    """``world_dir`` removed again afterwards (never through a mount still below it)."""
    path = world_dir(prefix, base)
    try:
        yield path
    finally:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        if not any(line.split()[4].startswith(str(path)) for line in mountinfo):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def cntrfs_mount(
    options: str | MountOptions = "",
    *,
    source: str | os.PathLike[str] | None = None,
    base: str | None = None,
) -> Iterator[MountedFs]:
    """Mount CntrFS over ``source`` (a fresh directory if None) at a fresh mount point."""
    if isinstance(options, MountOptions):
        opts = options
    else:
        transport = os.environ.get("DVS_TEST_FS_URING")
        if transport and "uring=" not in options:
            options = f"uring={transport},{options}"
        opts = MountOptions.parse(options)
    top = world_dir("dvs-cntrfs-", base)
    src = Path(source) if source is not None else top / "src"
    mnt = top / "mnt"
    src.mkdir(exist_ok=True)
    mnt.mkdir()
    if source is None:
        src.chmod(0o755)
    fs = CntrFs(src, opts)
    try:
        fs.mount(mnt)
        yield MountedFs(src, mnt, fs)
    finally:
        try:
            fs.close()
        finally:
            # only a plain directory is removed: never recurse through a live mount
            if not os.path.ismount(mnt):
                shutil.rmtree(top, ignore_errors=True)
