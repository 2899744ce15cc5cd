"""The sealed volume's C entry points (csrc/shield/), typed.

What the C side guarantees and this wrapper relies on (format in csrc/shield/shield.h):
- Every read authenticates what it returns (AES-256-GCM per 4 KiB block, a MAC tree up to
  the sealed superblock). A failing call wipes its destination and returns -EBADMSG with
  the failing block named in the volume status; this module turns that into
  ``IntegrityError`` (or a finer kind from ``dvs.shield.errors``).
- A volume borrows an ``Engine`` (one registered file, optionally a registered arena) and
  belongs to the thread that uses that engine.
- Writes are queued in the arena's write slots; ``flush`` makes everything written so far
  durable as one atomic step, and only a completed flush is a state a crash returns to.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from dvs.errors import IntegrityError
from dvs.lowlevel import check, ffi, lib
from dvs.lowlevel.uring import Buffer, Engine
from dvs.shield.errors import NotAVolume, RollbackDetected, WrongKey

BLOCK: int = lib.DVS_SHIELD_BLOCK
FORMAT_VERSION: int = lib.DVS_SHIELD_FORMAT_VERSION
MAX_CAPACITY_BLOCKS: int = lib.DVS_SHIELD_MAX_CAPACITY
KDF_RAW: int = lib.DVS_KDF_RAW
KDF_SCRYPT: int = lib.DVS_KDF_SCRYPT
KDF_DERIVED: int = lib.DVS_KDF_DERIVED
VOL_READONLY: int = lib.DVS_VOL_READONLY
VOL_EPHEMERAL: int = lib.DVS_VOL_EPHEMERAL
VOL_STRICT: int = lib.DVS_VOL_STRICT
VOL_LAZY_FORMAT: int = lib.DVS_VOL_LAZY_FORMAT
VOL_DIRECT: int = lib.DVS_VOL_DIRECT
VOL_CRYPTO_HELPER: int = lib.DVS_VOL_CRYPTO_HELPER
VOL_NO_READAHEAD: int = lib.DVS_VOL_NO_READAHEAD
VERIFY_LIMIT: int = lib.DVS_SHIELD_VERIFY_LIMIT
WRITE_SUBMIT: int = lib.DVS_WRITE_SUBMIT
CLOSE_ENGINE_GONE: int = lib.DVS_CLOSE_ENGINE_GONE

_FAIL_WHAT = {
    lib.DVS_FAIL_DATA: "data block",
    lib.DVS_FAIL_META: "tree node",
    lib.DVS_FAIL_SUPERBLOCK: "superblock slot",
}


@dataclass(frozen=True)
class Key:
    """How the volume key is obtained: a raw 32-byte key, a passphrase for scrypt, or
    scrypt's output already derived for ``salt`` and the parameters."""

    kdf: int
    secret: bytes
    scrypt_log2_n: int = 15
    scrypt_r: int = 8
    scrypt_p: int = 1
    salt: bytes = bytes(32)

    @staticmethod
    def raw(key: bytes) -> Key:
        if len(key) != 32:
            raise ValueError(f"a raw volume key is 32 bytes, got {len(key)}")
        return Key(KDF_RAW, bytes(key))

    @staticmethod
    def passphrase(passphrase: str | bytes, *, log2_n: int = 15, r: int = 8, p: int = 1) -> Key:
        secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        if not secret:
            raise ValueError("an empty passphrase")
        return Key(KDF_SCRYPT, secret, log2_n, r, p)

    def _c(self) -> tuple[Any, Any]:
        secret = ffi.new("uint8_t[]", self.secret)
        c = ffi.new(
            "struct dvs_shield_key *",
            {
                "kdf": self.kdf,
                "scrypt_log2_n": self.scrypt_log2_n,
                "scrypt_r": self.scrypt_r,
                "scrypt_p": self.scrypt_p,
                "salt": list(self.salt),
                "secret": secret,
                "secret_len": len(self.secret),
            },
        )
        return c, secret


def scrypt(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    """scrypt through OpenSSL: the master key a DERIVED ``Key`` carries."""
    if len(salt) != 32:
        raise ValueError("the salt is 32 bytes")
    out = ffi.new("uint8_t[32]")
    check(lib.dvs_shield_scrypt(passphrase, len(passphrase), salt, log2_n, r, p, out), "scrypt")
    return bytes(ffi.buffer(out))


@dataclass(frozen=True)
class Anchor:
    """Trusted freshness state kept outside the volume file: which volume, which flush
    (epoch) and exactly which state (root entry, size) was last made durable."""

    volume_id: bytes
    epoch: int
    size: int
    root: bytes

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id.hex(),
            "epoch": self.epoch,
            "size": self.size,
            "root": self.root.hex(),
        }

    @staticmethod
    def from_json_dict(d: dict[str, Any]) -> Anchor:
        return Anchor(
            bytes.fromhex(d["volume_id"]), int(d["epoch"]), int(d["size"]), bytes.fromhex(d["root"])
        )


@dataclass(frozen=True)
class Header:
    """The plain (authenticated but unencrypted) part of a superblock slot."""

    version: int
    slot: int
    kdf: int
    scrypt_log2_n: int
    scrypt_r: int
    scrypt_p: int
    levels: int
    kdf_salt: bytes
    volume_id: bytes
    capacity_blocks: int
    data_base: int
    seal_nonce: bytes


def parse_header(block: bytes) -> Header:
    """Parse and check a superblock slot's plain header (untrusted input)."""
    out = ffi.new("struct dvs_shield_header *")
    ret = lib.dvs_shield_parse_header(block, len(block), out)
    if ret == -errno.EMEDIUMTYPE:
        raise NotAVolume("no sealed-volume magic in the superblock")
    if ret == -errno.EBADMSG:
        raise IntegrityError("superblock header", None, "malformed or unknown header")
    check(ret, "parse superblock header")
    return Header(
        version=out.version,
        slot=out.slot,
        kdf=out.kdf,
        scrypt_log2_n=out.scrypt_log2_n,
        scrypt_r=out.scrypt_r,
        scrypt_p=out.scrypt_p,
        levels=out.levels,
        kdf_salt=bytes(out.kdf_salt),
        volume_id=bytes(out.volume_id),
        capacity_blocks=out.capacity_blocks,
        data_base=out.data_base,
        seal_nonce=bytes(out.seal_nonce),
    )


@dataclass
class Status:
    volume_id: bytes
    epoch: int
    size: int
    capacity_blocks: int
    next_counter: int
    nonce_limit: int
    levels: int
    superblock_slot: int
    superblock_damage: int
    kdf: int
    fail_code: int
    fail_kind: int
    fail_level: int
    fail_index: int
    blocks_read: int
    blocks_written: int
    blocks_sealed: int
    blocks_opened: int
    nodes_loaded: int
    nodes_written: int
    commits: int
    reservations: int
    cached_nodes: int
    dirty_blocks: int
    syncs: int
    open_verified: int
    torn_epoch: int


def _status(c: Any) -> Status:
    values: dict[str, Any] = {}
    for name in Status.__dataclass_fields__:
        value = getattr(c, name)
        values[name] = bytes(value) if name == "volume_id" else int(value)
    return Status(**values)


def _raise_for(ret: int, what: str, status: Status, anchor: Anchor | None = None) -> None:
    if ret >= 0:
        return
    if ret == -errno.EBADMSG:
        kind = _FAIL_WHAT.get(status.fail_kind, "volume")
        if status.fail_kind == lib.DVS_FAIL_META:
            kind = f"tree node (level {status.fail_level})"
        raise IntegrityError(kind, status.fail_index, f"{what}: authentication failed")
    if ret == -errno.EKEYREJECTED:
        raise WrongKey()
    if ret == -errno.EMEDIUMTYPE:
        raise NotAVolume(f"{what}: neither superblock slot holds a sealed volume")
    if ret == -errno.ESTALE:
        expected = anchor.epoch if anchor else -1
        detail = ""
        if anchor and status.fail_index == anchor.epoch:
            detail = f"epoch {anchor.epoch} holds a different state than the anchor recorded"
        raise RollbackDetected(status.fail_index, expected, detail)
    if ret == -errno.EXDEV:
        expected = anchor.epoch if anchor else -1
        raise RollbackDetected(-1, expected, "the anchor names another volume")
    check(ret, what)


class VolumeHandle:
    """A sealed volume in the C core, on a borrowed engine and arena."""

    def __init__(self, handle: Any, engine: Engine, arena: Buffer) -> None:
        self._h = handle
        self.engine = engine
        self._arena = arena

    @staticmethod
    def _config(
        arena: Buffer,
        arena_buf: int,
        read_slots: int,
        write_slots: int,
        flags: int,
        file: int,
        capacity_blocks: int,
        anchor: Anchor | None,
    ) -> Any:
        need = int(lib.dvs_shield_arena_bytes(read_slots, write_slots))
        if arena.size < need:
            raise ValueError(f"the arena needs {need} bytes, it has {arena.size}")
        cfg = ffi.new(
            "struct dvs_shield_config *",
            {
                "capacity_blocks": capacity_blocks,
                "arena_addr": arena.addr,
                "arena_len": arena.size,
                "arena_buf": arena_buf,
                "read_slots": read_slots,
                "write_slots": write_slots,
                "flags": flags,
                "file": file,
                "have_anchor": int(anchor is not None),
            },
        )
        if anchor is not None:
            cfg.anchor.volume_id = list(anchor.volume_id)
            cfg.anchor.epoch = anchor.epoch
            cfg.anchor.size = anchor.size
            cfg.anchor.root = list(anchor.root)
        return cfg

    @staticmethod
    def arena_bytes(read_slots: int, write_slots: int) -> int:
        return int(lib.dvs_shield_arena_bytes(read_slots, write_slots))

    @classmethod
    def format(
        cls,
        engine: Engine,
        key: Key,
        capacity_blocks: int,
        arena: Buffer,
        *,
        arena_buf: int = 0,
        read_slots: int = 64,
        write_slots: int = 256,
        flags: int = 0,
        file: int = 0,
    ) -> tuple[VolumeHandle, Status]:
        if not 0 < capacity_blocks <= MAX_CAPACITY_BLOCKS:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY_BLOCKS} blocks")
        cfg = cls._config(
            arena, arena_buf, read_slots, write_slots, flags, file, capacity_blocks, None
        )
        c_key, _keep = key._c()
        out = ffi.new("struct dvs_shield_volume **")
        st = ffi.new("struct dvs_shield_status *")
        ret = lib.dvs_shield_format(engine._live(), c_key, cfg, out, st)
        _raise_for(ret, "format", _status(st))
        return cls(out[0], engine, arena), _status(st)

    @classmethod
    def open(
        cls,
        engine: Engine,
        key: Key,
        arena: Buffer,
        *,
        arena_buf: int = 0,
        read_slots: int = 64,
        write_slots: int = 256,
        flags: int = 0,
        file: int = 0,
        anchor: Anchor | None = None,
    ) -> tuple[VolumeHandle, Status]:
        cfg = cls._config(arena, arena_buf, read_slots, write_slots, flags, file, 0, anchor)
        c_key, _keep = key._c()
        out = ffi.new("struct dvs_shield_volume **")
        st = ffi.new("struct dvs_shield_status *")
        ret = lib.dvs_shield_open(engine._live(), c_key, cfg, out, st)
        _raise_for(ret, "open", _status(st), anchor)
        return cls(out[0], engine, arena), _status(st)

    def _live(self) -> Any:
        if self._h is None:
            raise ValueError("the volume is closed")
        if self.engine.closed:
            raise ValueError("the volume's engine is closed")
        return self._h

    def _fail(self, ret: int, what: str) -> None:
        _raise_for(ret, what, self.status())

    def read_blocks_into(self, first: int, count: int, out: Any) -> None:
        """Authenticate and decrypt blocks [first, first+count) into ``out`` (writable,
        count*4096 bytes)."""
        dst = ffi.from_buffer(out, require_writable=True)
        if len(dst) < count * BLOCK:
            raise ValueError("the destination is smaller than the blocks asked for")
        ret = lib.dvs_shield_read_blocks(self._live(), first, count, dst)
        if ret < 0:
            self._fail(ret, f"read blocks {first}..{first + count - 1}")

    def read_list_into(self, blocks: Any, out: Any) -> None:
        """Gather the listed blocks (a uint64 array) into ``out``, one batch per read_slots."""
        c_blocks = ffi.from_buffer("uint64_t[]", blocks)
        dst = ffi.from_buffer(out, require_writable=True)
        n = len(c_blocks)
        if len(dst) < n * BLOCK:
            raise ValueError("the destination is smaller than the blocks asked for")
        ret = lib.dvs_shield_read_list(self._live(), c_blocks, n, dst)
        if ret < 0:
            self._fail(ret, f"read {n} listed blocks")

    def write_list(self, blocks: Any, data: Any, *, submit: bool = True) -> None:
        c_blocks = ffi.from_buffer("uint64_t[]", blocks)
        src = ffi.from_buffer(data)
        n = len(c_blocks)
        if len(src) != n * BLOCK:
            raise ValueError("one 4096-byte block of data per listed block")
        ret = lib.dvs_shield_write_list(
            self._live(), c_blocks, n, src, WRITE_SUBMIT if submit else 0
        )
        if ret < 0:
            self._fail(ret, f"write {n} listed blocks")

    def write_blocks(self, first: int, data: Any, *, submit: bool = True) -> None:
        src = ffi.from_buffer(data)
        if len(src) % BLOCK:
            raise ValueError("block writes take whole 4096-byte blocks")
        ret = lib.dvs_shield_write_blocks(
            self._live(), first, len(src) // BLOCK, src, WRITE_SUBMIT if submit else 0
        )
        if ret < 0:
            self._fail(ret, f"write blocks from {first}")

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        ret = lib.dvs_shield_pread(self._live(), ffi.from_buffer(buf), length, offset)
        if ret < 0:
            self._fail(ret, f"read {length} bytes at {offset}")
        return bytes(buf[:ret])

    def pwrite(self, data: Any, offset: int) -> int:
        src = ffi.from_buffer(data)
        ret = lib.dvs_shield_pwrite(self._live(), src, len(src), offset)
        if ret < 0:
            self._fail(ret, f"write {len(src)} bytes at {offset}")
        return int(ret)

    def truncate(self, size: int) -> None:
        ret = lib.dvs_shield_truncate(self._live(), size)
        if ret < 0:
            self._fail(ret, f"truncate to {size}")

    def flush(self) -> None:
        ret = lib.dvs_shield_flush(self._live())
        if ret < 0:
            self._fail(ret, "flush")

    def verify(self, first: int, count: int) -> int:
        ret = lib.dvs_shield_verify(self._live(), first, count)
        if ret < 0:
            self._fail(int(ret), f"verify blocks {first}..{first + count - 1}")
        return int(ret)

    def status(self) -> Status:
        st = ffi.new("struct dvs_shield_status *")
        lib.dvs_shield_status(self._live(), st)
        return _status(st)

    def live_blocks(self) -> list[int]:
        """Physical blocks the committed state uses (loads and checks the whole tree)."""
        n = lib.dvs_shield_live_blocks(self._live(), ffi.NULL, 0)
        if n < 0:
            self._fail(int(n), "list live blocks")
        out = ffi.new("uint64_t[]", max(int(n), 1))
        n = lib.dvs_shield_live_blocks(self._live(), out, n)
        if n < 0:
            self._fail(int(n), "list live blocks")
        return sorted(int(out[i]) for i in range(n))

    def locate(self, block: int) -> int | None:
        """The file block holding logical ``block`` now (None: never written)."""
        out = ffi.new("uint64_t *")
        ret = lib.dvs_shield_locate(self._live(), block, out)
        if ret == -errno.ENODATA:
            return None
        if ret < 0:
            self._fail(ret, f"locate block {block}")
        return int(out[0])

    def anchor(self) -> Anchor:
        a = ffi.new("struct dvs_shield_anchor *")
        lib.dvs_shield_anchor(self._live(), a)
        return Anchor(bytes(a.volume_id), int(a.epoch), int(a.size), bytes(a.root))

    def close(self, *, discard: bool = False) -> None:
        """Flush (unless ``discard``) and free the volume; the engine stays open."""
        if self._h is None:
            return
        if self.engine.closed:
            # the engine went first (a failing test, a finaliser): free the memory only,
            # the C volume must not touch the engine it pointed to
            lib.dvs_shield_close(self._h, CLOSE_ENGINE_GONE)
            self._h = None
            return
        st = self.status()
        ret = lib.dvs_shield_close(self._h, int(discard))
        self._h = None
        if ret < 0:
            _raise_for(ret, "close", st)


def crypto_bench(blocks: int, *, open_: bool = False) -> float:
    """Seconds to seal (or open) ``blocks`` 4 KiB blocks with one reused GCM context."""
    ns = ffi.new("uint64_t *")
    check(lib.dvs_shield_crypto_bench(blocks, int(open_), ns), "crypto bench")
    return int(ns[0]) / 1e9


# ---- the SQLite VFS (csrc/shield/vfs.c) -------------------------------------------------


@dataclass
class VfsInfo:
    files_opened: int
    volumes_formatted: int
    syncs: int
    integrity_failures: int
    open_files: int
    io_completed: int
    io_syscalls: int
    fail_kind: int
    fail_level: int
    fail_index: int
    fail_path: str

    def failure(self) -> IntegrityError | None:
        """The last integrity failure as an IntegrityError naming the file and block."""
        if not self.integrity_failures:
            return None
        kind = _FAIL_WHAT.get(self.fail_kind, "volume")
        if self.fail_kind == lib.DVS_FAIL_META:
            kind = f"tree node (level {self.fail_level})"
        return IntegrityError(f"{kind} of {self.fail_path}", self.fail_index)


def vfs_register(
    name: str,
    key: Key,
    *,
    capacity_blocks: int,
    engine_kind: int,
    read_slots: int,
    write_slots: int,
    make_default: bool = False,
) -> None:
    """Register a SQLite VFS; ``key`` must be RAW or DERIVED (no scrypt per file)."""
    if key.kdf not in (KDF_RAW, KDF_DERIVED) or len(key.secret) != 32:
        raise ValueError("the VFS needs a raw key or an already derived one (32 bytes)")
    c_name = ffi.new("char[]", name.encode())
    cfg = ffi.new(
        "struct dvs_vfs_config *",
        {
            "name": c_name,
            "kdf": key.kdf,
            "scrypt_log2_n": key.scrypt_log2_n if key.kdf == KDF_DERIVED else 0,
            "scrypt_r": key.scrypt_r if key.kdf == KDF_DERIVED else 0,
            "scrypt_p": key.scrypt_p if key.kdf == KDF_DERIVED else 0,
            "salt": list(key.salt),
            "secret": list(key.secret),
            "capacity_blocks": capacity_blocks,
            "engine_kind": engine_kind,
            "read_slots": read_slots,
            "write_slots": write_slots,
            "make_default": int(make_default),
        },
    )
    ret = lib.dvs_vfs_register(cfg)
    if ret == -errno.EEXIST:
        raise FileExistsError(errno.EEXIST, f"a dvs VFS named {name!r} is already registered")
    check(ret, f"register VFS {name}")


def vfs_unregister(name: str) -> None:
    ret = lib.dvs_vfs_unregister(name.encode())
    if ret == -errno.EBUSY:
        raise OSError(errno.EBUSY, f"VFS {name!r} still has open files")
    check(ret, f"unregister VFS {name}")


def vfs_info(name: str) -> VfsInfo:
    out = ffi.new("struct dvs_vfs_info *")
    check(lib.dvs_vfs_info(name.encode(), out), f"VFS {name} info")
    values: dict[str, Any] = {}
    for field_name in VfsInfo.__dataclass_fields__:
        value = getattr(out, field_name)
        values[field_name] = (
            ffi.string(value).decode(errors="replace") if field_name == "fail_path" else int(value)
        )
    return VfsInfo(**values)


ENGINE_RING: int = lib.DVS_ENGINE_RING
ENGINE_THREADS: int = lib.DVS_ENGINE_THREADS
