"""SQLite on sealed volumes: a VFS in the C core that Python's own ``sqlite3`` uses.

How it works: Python's ``_sqlite3`` links the system ``libsqlite3.so.0``, the same library
the dvs C core links, so a VFS registered by the core with ``sqlite3_vfs_register`` is
visible to ``sqlite3.connect("file:db?vfs=NAME", uri=True)`` -- unmodified SQL, no
extension loading (this Python has no ``enable_load_extension``).

Each database, journal and temporary file is its own sealed volume (one file on disk);
``xSync`` is a volume flush, which is atomic and durable, so SQLite's rollback-journal
protocol keeps its guarantees across crashes. WAL mode is refused (no shared-memory
methods). Pages that fail authentication surface as ``sqlite3.DatabaseError`` with
``sqlite_errorcode == SQLITE_IOERR_DATA``; ``ShieldVfs.translate_errors()`` turns those into
``dvs.errors.IntegrityError`` naming the file and block. One process per database (an
exclusive flock); several connections inside it share one volume per file.

Keys: a raw 32-byte key, or a passphrase. The passphrase goes through scrypt once, at
registration; every file the VFS creates records the same salt and parameters, and files
with another salt are refused (register another VFS name for them).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dvs.errors import IntegrityError
from dvs.lowlevel import shield as ll
from dvs.lowlevel.uring import EngineKind
from dvs.shield.engine import default_kind
from dvs.shield.errors import NotAVolume

SQLITE_IOERR_DATA = 8202  # SQLITE_IOERR | (32 << 8), SQLite 3.38+
DEFAULT_CAPACITY = 64 << 30  # bytes per file (sparse)


class ShieldVfs:
    """A registered sealed-storage VFS."""

    def __init__(self, name: str) -> None:
        self.name = name

    def uri(self, path: str | os.PathLike[str], **params: str) -> str:
        query = urllib.parse.urlencode({"vfs": self.name, **params})
        return f"file:{urllib.parse.quote(os.fspath(path))}?{query}"

    def connect(self, path: str | os.PathLike[str], **kwargs: Any) -> sqlite3.Connection:
        """``sqlite3.connect`` on this VFS (any sqlite3.connect keyword passes through)."""
        connection: sqlite3.Connection = sqlite3.connect(self.uri(path), uri=True, **kwargs)
        return connection

    def info(self) -> ll.VfsInfo:
        return ll.vfs_info(self.name)

    def unregister(self) -> None:
        ll.vfs_unregister(self.name)

    def as_integrity_error(self, exc: BaseException) -> IntegrityError | None:
        """The IntegrityError behind a sqlite3 error, if it was an authentication failure."""
        if getattr(exc, "sqlite_errorcode", None) != SQLITE_IOERR_DATA:
            return None
        return self.info().failure() or IntegrityError("a database page", None)

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Raise IntegrityError (naming file and block) for pages that fail authentication."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            integrity = self.as_integrity_error(exc)
            if integrity is None:
                raise
            raise integrity from exc


def _header_of(database: Path) -> ll.Header | None:
    if not database.exists() or database.stat().st_size == 0:
        return None
    with database.open("rb") as f:
        slots = f.read(2 * ll.BLOCK)
    for s in range(2):
        try:
            return ll.parse_header(slots[s * ll.BLOCK : (s + 1) * ll.BLOCK])
        except (IntegrityError, NotAVolume, OSError, ValueError):
            continue
    raise NotAVolume(f"{database} is not a sealed SQLite database")


def register(
    name: str = "dvs-shield",
    *,
    key: bytes | None = None,
    passphrase: str | bytes | None = None,
    database: str | os.PathLike[str] | None = None,
    scrypt_log2_n: int = 15,
    capacity: int = DEFAULT_CAPACITY,
    engine_kind: EngineKind | None = None,
    read_slots: int = 32,
    write_slots: int = 256,
    default: bool = False,
) -> ShieldVfs:
    """Register a sealed-storage VFS under ``name``.

    With a ``passphrase``, pass the ``database`` you will open: an existing one lends its
    salt and scrypt parameters; for a new one they are chosen here.
    """
    if (key is None) == (passphrase is None):
        raise ValueError("give exactly one of key= (32 raw bytes) or passphrase=")
    if key is not None:
        k = ll.Key.raw(key)
    else:
        assert passphrase is not None
        secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        header = _header_of(Path(database)) if database is not None else None
        if header is not None and header.kdf != ll.KDF_SCRYPT:
            raise ValueError(f"{database} was sealed with a raw key, not a passphrase")
        log2_n = header.scrypt_log2_n if header else scrypt_log2_n
        r = header.scrypt_r if header else 8
        p = header.scrypt_p if header else 1
        salt = header.kdf_salt if header else secrets.token_bytes(32)
        derived = ll.scrypt(secret, salt, log2_n, r, p)
        k = ll.Key(ll.KDF_DERIVED, derived, log2_n, r, p, salt)
    kind = engine_kind or default_kind()
    ll.vfs_register(
        name,
        k,
        capacity_blocks=(capacity + ll.BLOCK - 1) // ll.BLOCK,
        engine_kind=ll.ENGINE_RING if kind == "io_uring" else ll.ENGINE_THREADS,
        read_slots=read_slots,
        write_slots=write_slots,
        make_default=default,
    )
    return ShieldVfs(name)
