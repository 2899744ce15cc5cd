"""Sealed volumes: files of authenticated-encrypted 4 KiB blocks behind an I/O engine.

What a sealed volume guarantees (the format and protocol are described in
csrc/shield/shield.h):

- Confidentiality and integrity per block: AES-256-GCM, key from a raw 32-byte key or from
  a passphrase through scrypt, per-volume subkeys through HKDF. Nonces come from a counter
  that never repeats under one key, across crashes and reopenings too (reservations are
  durable before use).
- Freshness inside the file: each block's counter and tag sit in a MAC tree whose root is
  in the sealed superblock, and block number and version are in the associated data, so a
  block swapped with another, moved, or replayed from an older version fails to
  authenticate -- reads raise ``IntegrityError`` naming the block and return nothing.
- Crash consistency: ``flush`` is atomic and durable when it returns (one fdatasync: the
  new superblock goes out with the flush's data and nodes, into the slot the previous state
  does not use); after a crash at any point the volume opens as of some completed flush,
  never unreadable. An open that finds the newest superblock's flush torn (a block or node
  it names missing or damaged) serves the previous flush and reports it
  (``open_status.torn_epoch``, ``superblock_damage``); ``strict=True`` refuses instead.
- What is *not* detected from the file alone: replacing the *whole* file by an older copy of
  itself (whole-file rollback) yields an older but fully authentic state. Detecting that
  needs state the attacker cannot roll back: pass the ``Anchor`` from ``flush()`` back to
  ``open(anchor=...)``, or keep an ``anchor_file`` on trusted storage (another disk, a
  TPM-backed store, a remote service). With an anchor, an older epoch -- or another state at
  the same epoch -- raises ``RollbackDetected``; a newer epoch is accepted (the anchor lags
  if a crash hit between the flush and the anchor update).
- One writer: an open takes an exclusive ``flock`` on the file; reading opens share it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvs.lowlevel.shield import (
    BLOCK,
    VOL_CRYPTO_HELPER,
    VOL_DIRECT,
    VOL_EPHEMERAL,
    VOL_LAZY_FORMAT,
    VOL_NO_READAHEAD,
    VOL_READONLY,
    VOL_STRICT,
    Anchor,
    Key,
    Status,
    VolumeHandle,
)
from dvs.lowlevel.uring import NO_BUF, Buffer, Engine, EngineKind, IoStats
from dvs.shield.engine import default_kind

DEFAULT_READ_SLOTS = 256
DEFAULT_WRITE_SLOTS = 1024

Progress = Callable[[int, int], None]


def make_key(
    key: bytes | None = None,
    passphrase: str | bytes | None = None,
    *,
    scrypt_log2_n: int = 15,
) -> Key:
    """Exactly one of a raw 32-byte ``key`` or a ``passphrase`` (scrypt, N=2^log2_n, r=8)."""
    if (key is None) == (passphrase is None):
        raise ValueError("give exactly one of key= (32 raw bytes) or passphrase=")
    if key is not None:
        return Key.raw(key)
    assert passphrase is not None
    return Key.passphrase(passphrase, log2_n=scrypt_log2_n)


@dataclass(frozen=True)
class VerifyReport:
    blocks_checked: int
    blocks_with_data: int
    superblock_damage: int
    epoch: int
    torn_epoch: int = 0  # a newer flush the open discarded because its writes were not all there


def read_anchor_file(path: str | os.PathLike[str]) -> Anchor | None:
    p = Path(path)
    if not p.exists():
        return None
    return Anchor.from_json_dict(json.loads(p.read_text()))


def write_anchor_file(path: str | os.PathLike[str], anchor: Anchor) -> None:
    """Replace the anchor file atomically and durably (write, fsync, rename, fsync dir)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(anchor.to_json_dict()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Volume:
    """A sealed volume, opened on a file (``create``/``open``) or on an engine you hold
    (``create_on``/``open_on``, e.g. the fault-injecting memory disk). ``crypto_threads``:
    1 (default) keeps AES-GCM on the calling thread; 2 shares it, for requests of 32 blocks
    or more, with a helper thread (measured on the shared 2-vCPU machine at load ~4: no
    wall-clock gain, 3-9% more CPU per byte; meant for a machine with an idle core).
    ``readahead``: after two adjacent large reads, the next range of the same size is read
    (as ciphertext, into staging) while the caller works; opened only when asked for."""

    def __init__(
        self,
        handle: VolumeHandle,
        status: Status,
        *,
        engine: Engine,
        arena: Buffer,
        own_engine: bool,
        fd: int = -1,
        path: Path | None = None,
        anchor_file: Path | None = None,
        readonly: bool = False,
    ) -> None:
        self._h: VolumeHandle | None = handle
        self.engine = engine
        self._arena = arena
        self._own_engine = own_engine
        self._fd = fd
        self.path = path
        self.anchor_file = anchor_file
        self.readonly = readonly
        self.open_status = status

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        capacity: int,
        *,
        key: bytes | None = None,
        passphrase: str | bytes | None = None,
        scrypt_log2_n: int = 15,
        engine_kind: EngineKind | None = None,
        direct: bool = False,
        anchor_file: str | os.PathLike[str] | None = None,
        read_slots: int = DEFAULT_READ_SLOTS,
        write_slots: int = DEFAULT_WRITE_SLOTS,
        entries: int = 64,
        sqpoll: bool = False,
        crypto_threads: int = 1,
        readahead: bool = True,
    ) -> Volume:
        """Create (or overwrite) ``path`` as an empty volume of ``capacity`` bytes
        (rounded up to 4 KiB; the file is sparse, up to about twice that when full)."""
        k = make_key(key, passphrase, scrypt_log2_n=scrypt_log2_n)
        blocks = (capacity + BLOCK - 1) // BLOCK
        return cls._on_path(
            Path(path),
            k,
            create_blocks=blocks,
            engine_kind=engine_kind,
            direct=direct,
            anchor_file=anchor_file,
            read_slots=read_slots,
            write_slots=write_slots,
            entries=entries,
            sqpoll=sqpoll,
            crypto_threads=crypto_threads,
            readahead=readahead,
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        passphrase: str | bytes | None = None,
        anchor: Anchor | None = None,
        anchor_file: str | os.PathLike[str] | None = None,
        readonly: bool = False,
        strict: bool = False,
        engine_kind: EngineKind | None = None,
        direct: bool = False,
        read_slots: int = DEFAULT_READ_SLOTS,
        write_slots: int = DEFAULT_WRITE_SLOTS,
        entries: int = 64,
        sqpoll: bool = False,
        crypto_threads: int = 1,
        readahead: bool = True,
    ) -> Volume:
        """Open an existing volume. ``anchor``/``anchor_file``: refuse older states."""
        k = make_key(key, passphrase)
        return cls._on_path(
            Path(path),
            k,
            create_blocks=0,
            engine_kind=engine_kind,
            direct=direct,
            anchor=anchor,
            anchor_file=anchor_file,
            readonly=readonly,
            strict=strict,
            read_slots=read_slots,
            write_slots=write_slots,
            entries=entries,
            sqpoll=sqpoll,
            crypto_threads=crypto_threads,
            readahead=readahead,
        )

    @classmethod
    def _on_path(
        cls,
        path: Path,
        key: Key,
        *,
        create_blocks: int,
        engine_kind: EngineKind | None,
        direct: bool,
        anchor: Anchor | None = None,
        anchor_file: str | os.PathLike[str] | None = None,
        readonly: bool = False,
        strict: bool = False,
        read_slots: int,
        write_slots: int,
        entries: int,
        sqpoll: bool,
        crypto_threads: int = 1,
        readahead: bool = True,
    ) -> Volume:
        if crypto_threads not in (1, 2):
            raise ValueError("crypto_threads is 1 (the calling thread) or 2 (plus a helper)")
        flags = os.O_CLOEXEC | (os.O_RDONLY if readonly else os.O_RDWR)
        if create_blocks:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        fd = os.open(path, flags, 0o600)
        arena: Buffer | None = None
        engine: Engine | None = None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BlockingIOError(
                    exc.errno, f"{path} is open for writing by another process"
                ) from None
            arena = Buffer(VolumeHandle.arena_bytes(read_slots, write_slots))
            kind = engine_kind or default_kind()
            engine = Engine(
                kind,
                files=[fd],
                buffers=[arena],
                entries=entries,
                sqpoll=sqpoll,
            )
            anchor_path = Path(anchor_file) if anchor_file is not None else None
            if anchor is None and anchor_path is not None and not create_blocks:
                anchor = read_anchor_file(anchor_path)
            vflags = (
                (VOL_READONLY if readonly else 0)
                | (VOL_STRICT if strict else 0)
                | (VOL_DIRECT if direct else 0)
                | (VOL_CRYPTO_HELPER if crypto_threads == 2 else 0)
                | (0 if readahead else VOL_NO_READAHEAD)
            )
            if create_blocks:
                handle, status = VolumeHandle.format(
                    engine,
                    key,
                    create_blocks,
                    arena,
                    read_slots=read_slots,
                    write_slots=write_slots,
                    flags=vflags,
                )
            else:
                handle, status = VolumeHandle.open(
                    engine,
                    key,
                    arena,
                    read_slots=read_slots,
                    write_slots=write_slots,
                    flags=vflags,
                    anchor=anchor,
                )
        except BaseException:
            if engine is not None:
                engine.close()
            if arena is not None:
                arena.close()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        volume = cls(
            handle,
            status,
            engine=engine,
            arena=arena,
            own_engine=True,
            fd=fd,
            path=path,
            anchor_file=anchor_path,
            readonly=readonly,
        )
        if anchor_path is not None and create_blocks:
            write_anchor_file(anchor_path, volume.anchor)
        return volume

    @classmethod
    def create_on(
        cls,
        engine: Engine,
        capacity_blocks: int,
        key: Key,
        *,
        file: int = 0,
        arena: Buffer | None = None,
        arena_registered: bool = False,
        read_slots: int = 32,
        write_slots: int = 64,
        ephemeral: bool = False,
        lazy: bool = False,
        crypto_threads: int = 1,
    ) -> Volume:
        """Format file ``file`` of an engine you hold (the engine stays yours). ``lazy``:
        no sync at format (the first flush makes the volume durable; a crash before leaves
        no volume, as for SQLite journals)."""
        arena = arena or Buffer(VolumeHandle.arena_bytes(read_slots, write_slots))
        handle, status = VolumeHandle.format(
            engine,
            key,
            capacity_blocks,
            arena,
            arena_buf=0 if arena_registered else NO_BUF,
            read_slots=read_slots,
            write_slots=write_slots,
            flags=(VOL_EPHEMERAL if ephemeral else 0)
            | (VOL_LAZY_FORMAT if lazy else 0)
            | (VOL_CRYPTO_HELPER if crypto_threads == 2 else 0),
            file=file,
        )
        return cls(handle, status, engine=engine, arena=arena, own_engine=False)

    @classmethod
    def open_on(
        cls,
        engine: Engine,
        key: Key,
        *,
        file: int = 0,
        arena: Buffer | None = None,
        arena_registered: bool = False,
        read_slots: int = 32,
        write_slots: int = 64,
        anchor: Anchor | None = None,
        strict: bool = False,
        readonly: bool = False,
        crypto_threads: int = 1,
    ) -> Volume:
        arena = arena or Buffer(VolumeHandle.arena_bytes(read_slots, write_slots))
        handle, status = VolumeHandle.open(
            engine,
            key,
            arena,
            arena_buf=0 if arena_registered else NO_BUF,
            read_slots=read_slots,
            write_slots=write_slots,
            flags=(VOL_STRICT if strict else 0)
            | (VOL_READONLY if readonly else 0)
            | (VOL_CRYPTO_HELPER if crypto_threads == 2 else 0),
            file=file,
            anchor=anchor,
        )
        return cls(handle, status, engine=engine, arena=arena, own_engine=False, readonly=readonly)

    # ---- data ----------------------------------------------------------------------------

    def _live(self) -> VolumeHandle:
        if self._h is None:
            raise ValueError("the volume is closed")
        return self._h

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length), short at the end of the volume's data."""
        return self._live().pread(length, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._live().pwrite(data, offset)

    def read_blocks(self, first: int, count: int) -> bytes:
        out = bytearray(count * BLOCK)
        self._live().read_blocks_into(first, count, out)
        return bytes(out)

    def read_blocks_into(self, first: int, count: int, out: Any) -> None:
        self._live().read_blocks_into(first, count, out)

    def write_blocks(self, first: int, data: Any, *, submit: bool = True) -> None:
        """Write whole blocks; ``submit=False`` lets them gather for a larger batch."""
        self._live().write_blocks(first, data, submit=submit)

    def read_blocks_at(self, blocks: Any, out: Any) -> None:
        """Gather the blocks listed in ``blocks`` (numpy uint64) into ``out``, batched: the
        way to keep a queue depth above one with scattered blocks."""
        self._live().read_list_into(blocks, out)

    def write_blocks_at(self, blocks: Any, data: Any, *, submit: bool = True) -> None:
        """Scatter whole blocks of ``data`` to the listed block numbers, as one batch."""
        self._live().write_list(blocks, data, submit=submit)

    def truncate(self, size: int) -> None:
        self._live().truncate(size)

    def flush(self) -> Anchor:
        """Make everything written so far durable, atomically; returns the new anchor (and
        writes it to the anchor file, if one is kept)."""
        self._live().flush()
        anchor = self.anchor
        if self.anchor_file is not None and not self.readonly:
            write_anchor_file(self.anchor_file, anchor)
        return anchor

    # ---- state ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._live().status().size

    @property
    def capacity(self) -> int:
        return self._live().status().capacity_blocks * BLOCK

    @property
    def epoch(self) -> int:
        return self._live().status().epoch

    @property
    def anchor(self) -> Anchor:
        return self._live().anchor()

    def status(self) -> Status:
        return self._live().status()

    def locate(self, block: int) -> int | None:
        """Which 4 KiB block of the file holds logical ``block`` (None: never written)."""
        return self._live().locate(block)

    def live_blocks(self) -> list[int]:
        """The file's 4 KiB blocks the committed state uses (after a flush)."""
        return self._live().live_blocks()

    def io_stats(self) -> IoStats:
        return self.engine.stats()

    def verify(self, progress: Progress | None = None, chunk_blocks: int = 8192) -> VerifyReport:
        """Authenticate every block of the volume's data and the tree above it."""
        total = (self.size + BLOCK - 1) // BLOCK
        with_data = 0
        done = 0
        while done < total:
            n = min(chunk_blocks, total - done)
            with_data += self._live().verify(done, n)
            done += n
            if progress:
                progress(done, total)
        if progress and total == 0:
            progress(0, 0)
        st = self.status()
        return VerifyReport(
            done,
            with_data,
            self.open_status.superblock_damage,
            st.epoch,
            self.open_status.torn_epoch,
        )

    # ---- lifetime ------------------------------------------------------------------------

    def close(self, *, discard: bool = False) -> None:
        """Flush (unless ``discard``: drop everything since the last flush) and release."""
        if self._h is None:
            return
        flush_error: BaseException | None = None
        if not discard and not self.readonly:
            try:
                self.flush()  # so the anchor file, if any, records the final state
            except BaseException as exc:
                flush_error = exc
        handle, self._h = self._h, None
        try:
            handle.close(discard=discard or flush_error is not None)
        finally:
            self._release()
        if flush_error is not None:
            raise flush_error

    def _release(self) -> None:
        if self._own_engine:
            self.engine.close()
            self._arena.close()
        if self._fd >= 0:
            # the ring's registered-file reference outlives close() (io_uring tears rings
            # down asynchronously), so drop the lock explicitly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_h", None) is not None:
            try:
                self.close()
            except Exception as exc:  # never raise from a finaliser
                warnings.warn(f"sealed volume closed by the GC failed: {exc}", stacklevel=1)
