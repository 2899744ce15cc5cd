"""``dvs shield format|fsck|bench|sqlite``: sealed volumes from the command line.

Keys never go on the command line (they would show in ``ps`` and shell history): a
passphrase comes from ``--passphrase-file``, the environment variable named by
``--passphrase-env`` (default ``DVS_SHIELD_PASSPHRASE``) or a prompt on a terminal; a raw key
from ``--key-file`` (32 bytes, or 64 hex characters). Formatting with ``--fill`` and checking
large volumes show a progress bar on stderr. ``fsck`` exits 1 when anything fails to
authenticate, naming the block; ``--anchor FILE`` keeps/compares the freshness anchor.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from dvs.errors import DvsError, IntegrityError

if TYPE_CHECKING:
    from dvs.cli import Cli
    from dvs.lowlevel.uring import EngineKind

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'256M', '4g', '1048576' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in SIZE_UNITS else ""
    number = t[:-1] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 4G)") from None
    return int(value * SIZE_UNITS[unit])


class ProgressBar:
    """A one-line progress bar on a terminal (plain periodic lines otherwise)."""

    def __init__(self, label: str, total: int, unit: int = 1 << 20, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = -1

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        if done == self.shown or (
            now - self.last < (0.1 if self.tty else 2.0) and done < self.total
        ):
            return
        self.last = now
        self.shown = done
        frac = done / self.total if self.total else 1.0
        rate = done / max(now - self.start, 1e-9) / self.unit
        bar = "#" * int(frac * 30)
        text = (
            f"{self.label} [{bar:<30}] {frac * 100:5.1f}% "
            f"{done / self.unit:,.0f}/{self.total / self.unit:,.0f} MiB {rate:,.0f} MiB/s"
        )
        if self.tty:
            self.stream.write("\r" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.update(self.total, self.total)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def add_key_args(
    parser: argparse.ArgumentParser, title: str = "key (never on the command line)"
) -> None:
    """The options that say where a volume's key comes from (shared with serve-blk)."""
    g = parser.add_argument_group(title)
    g.add_argument("--key-file", type=Path, help="a raw 32-byte key (binary or 64 hex chars)")
    g.add_argument("--passphrase-file", type=Path, help="read the passphrase from this file")
    g.add_argument(
        "--passphrase-env",
        default="DVS_SHIELD_PASSPHRASE",
        help="environment variable holding the passphrase (default: %(default)s)",
    )


def read_key(args: argparse.Namespace, *, confirm: bool = False) -> dict[str, object]:
    if args.key_file:
        raw = args.key_file.read_bytes()
        text = raw.strip()
        if len(text) == 64:
            try:
                return {"key": bytes.fromhex(text.decode())}
            except ValueError:
                pass
        if len(raw) != 32:
            raise DvsError(f"{args.key_file}: a key file holds 32 bytes or 64 hex characters")
        return {"key": raw}
    if args.passphrase_file:
        return {"passphrase": args.passphrase_file.read_text().rstrip("\n")}
    env = os.environ.get(args.passphrase_env)
    if env:
        return {"passphrase": env}
    if sys.stdin.isatty():
        first = getpass.getpass("passphrase: ")
        if confirm and getpass.getpass("again: ") != first:
            raise DvsError("the passphrases differ")
        return {"passphrase": first}
    raise DvsError(f"no key: use --key-file, --passphrase-file or set {args.passphrase_env}")


def _engine(args: argparse.Namespace) -> EngineKind | None:
    return None if args.engine == "auto" else args.engine


# ---- format ---------------------------------------------------------------------------------


def _format(args: argparse.Namespace) -> int:
    from dvs.shield.volume import Volume

    key = read_key(args, confirm=True)
    vol = Volume.create(
        args.path,
        args.size,
        scrypt_log2_n=args.scrypt_log2n,
        engine_kind=_engine(args),
        direct=args.direct,
        anchor_file=args.anchor,
        **key,  # type: ignore[arg-type]
    )
    try:
        if args.fill:
            # every block sealed once (the volume then reads as zeros up to its capacity, like
            # a block device): the file is fully allocated and used space looks like unused
            chunk = 1 << 20
            zeros = bytes(chunk)
            bar = ProgressBar("format", vol.capacity)
            for off in range(0, vol.capacity, chunk):
                n = min(chunk, vol.capacity - off)
                vol.write_blocks(off // 4096, zeros[:n])
                bar.update(off + n)
            vol.flush()
            bar.finish()
        st = vol.status()
        print(
            json.dumps(
                {
                    "path": str(args.path),
                    "volume_id": st.volume_id.hex(),
                    "capacity": st.capacity_blocks * 4096,
                    "kdf": "scrypt" if st.kdf == 1 else "raw key",
                    "engine": vol.engine.kind,
                    "epoch": st.epoch,
                },
                indent=1,
            )
        )
    finally:
        vol.close()
    return 0


# ---- fsck -----------------------------------------------------------------------------------


def _fsck(args: argparse.Namespace) -> int:
    from dvs.shield.volume import Volume

    key = read_key(args)
    try:
        vol = Volume.open(
            args.path,
            readonly=True,
            strict=args.strict,
            anchor_file=args.anchor,
            engine_kind=_engine(args),
            **key,  # type: ignore[arg-type]
        )
    except IntegrityError as exc:
        print(f"fsck: FAILED: {exc}", file=sys.stderr)
        return 1
    try:
        size = vol.size
        bar = ProgressBar("fsck", max(size, 1))
        try:
            report = vol.verify(progress=lambda done, total: bar.update(done * 4096, total * 4096))
        except IntegrityError as exc:
            print(f"\nfsck: FAILED: {exc}", file=sys.stderr)
            return 1
        bar.finish()
        damage = report.superblock_damage
        result = {
            "path": str(args.path),
            "epoch": report.epoch,
            "size": size,
            "blocks_checked": report.blocks_checked,
            "blocks_with_data": report.blocks_with_data,
            "superblock_copies_damaged": [s for s in (0, 1) if damage & (1 << s)],
            "torn_flush_discarded": report.torn_epoch or None,
            "anchor": "checked" if args.anchor and args.anchor.exists() else "none",
        }
        print(json.dumps(result, indent=1))
        if report.torn_epoch:
            print(
                f"fsck: the flush of epoch {report.torn_epoch} did not complete (a crash "
                "before its sync, or tampering): its superblock names blocks that are not "
                f"all there; the previous flush (epoch {report.epoch}) is served and the "
                "next flush rewrites that slot",
                file=sys.stderr,
            )
            return 1
        if damage:
            print(
                "fsck: a superblock copy failed to authenticate (torn write or tampering); "
                "the other copy holds the newest state and the next flush rewrites it",
                file=sys.stderr,
            )
            return 1
    finally:
        vol.close(discard=True)
    return 0


# ---- bench ----------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from dvs.lowlevel import uring as u
    from dvs.shield import bench as kb
    from dvs.shield.engine import cpu_hz, default_kind, exit_cost_model
    from dvs.shield.volume import Volume

    kind: EngineKind = _engine(args) or default_kind()
    size = args.size
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = Path(tmp) / "data"
        kb.prepare_file(data, size)
        fd = os.open(data, os.O_RDWR | (os.O_DIRECT if args.direct else 0))
        buf = u.Buffer(args.qd * 4096)
        rows = []
        with u.Engine(kind, files=[fd], buffers=[buf], entries=max(args.qd, 2)) as engine:
            rows.append(
                kb.ring_random(
                    engine,
                    buf,
                    size // 4096,
                    args.ops,
                    args.qd,
                    write=False,
                    label=f"{kind} engine, no crypto",
                )
            )
        os.close(fd)
        buf.close()
        with Volume.create(
            Path(tmp) / "sealed",
            size,
            key=os.urandom(32),
            engine_kind=kind,
            direct=args.direct,
        ) as vol:
            kb.volume_sequential(vol, size, write=True)
            rows.append(
                kb.volume_random(vol, args.ops, args.qd, write=False, label="sealed volume")
            )
    hz = cpu_hz()
    print(
        f"4 KiB random reads, QD{args.qd}, {'O_DIRECT' if args.direct else 'page cache'}, "
        f"engine {kind}:"
    )
    for r in rows:
        models = exit_cost_model(r.seconds, r.syscalls, r.ops, cpu_hz=hz)
        modelled = ", ".join(f"{m.exit_cycles} cyc: {m.modelled_ops_per_s:,.0f}" for m in models)
        print(
            f"  {r.label:26} {r.ops_per_s:12,.0f} ops/s  {r.syscalls_per_op:6.3f} syscalls/op  "
            f"MODEL if each syscall were an enclave exit -> ops/s {modelled}"
        )
    return 0


# ---- sqlite ---------------------------------------------------------------------------------


def _sqlite(args: argparse.Namespace) -> int:
    from dvs.shield import sqlite as ssql

    key = read_key(args, confirm=not args.database.exists())
    name = f"dvs-cli-{os.getpid()}"
    vfs = ssql.register(
        name,
        database=args.database,
        engine_kind=_engine(args),
        **key,  # type: ignore[arg-type]
    )
    try:
        db = vfs.connect(args.database, isolation_level=None)
        try:
            with vfs.translate_errors():
                for statement in args.sql:
                    cur = db.execute(statement)
                    for row in cur.fetchall():
                        print("|".join("" if v is None else str(v) for v in row))
        finally:
            db.close()
    finally:
        vfs.unregister()
    return 0


def register(cli: Cli) -> None:
    cli.group("shield", "sealed storage: authenticated-encrypted volumes, SQLite on top")

    p = cli.command("format", "create a sealed volume", _format, group="shield")
    p.add_argument("path", type=Path)
    p.add_argument("--size", type=parse_size, required=True, help="capacity, e.g. 1G")
    p.add_argument("--fill", action="store_true", help="seal every block now (progress bar)")
    p.add_argument("--scrypt-log2n", type=int, default=15, help="scrypt N = 2^this")
    p.add_argument("--anchor", type=Path, help="write the freshness anchor to this file")
    p.add_argument("--engine", choices=["auto", "io_uring", "threads"], default="auto")
    p.add_argument("--direct", action="store_true", help="O_DIRECT")
    add_key_args(p)

    p = cli.command("fsck", "authenticate every block of a sealed volume", _fsck, group="shield")
    p.add_argument("path", type=Path)
    p.add_argument("--anchor", type=Path, help="refuse states older than this anchor file")
    p.add_argument("--strict", action="store_true", help="a damaged superblock copy is fatal")
    p.add_argument("--engine", choices=["auto", "io_uring", "threads"], default="auto")
    add_key_args(p)

    p = cli.command(
        "bench",
        "quick I/O benchmark: engine vs sealed volume, syscalls/op, exit model",
        _bench,
        group="shield",
    )
    p.add_argument("--size", type=parse_size, default=parse_size("64M"))
    p.add_argument("--ops", type=int, default=50_000)
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--direct", action="store_true")
    p.add_argument("--dir", default=None, help="where the scratch files go")
    p.add_argument("--engine", choices=["auto", "io_uring", "threads"], default="auto")

    p = cli.command("sqlite", "run SQL on a sealed SQLite database", _sqlite, group="shield")
    p.add_argument("database", type=Path)
    p.add_argument("sql", nargs="+", help="statements, run in order (autocommit)")
    p.add_argument("--engine", choices=["auto", "io_uring", "threads"], default="auto")
    add_key_args(p)
