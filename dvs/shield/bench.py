"""Measurement kernels for shielded I/O, shared by ``dvs shield bench`` and
benchmarks/bench_shield.py.

Each kernel runs one workload with the batch in C and the loop in Python, and returns the
wall time, the operations done and the syscalls the engine's I/O threads made (the engine's
own counter, which tests/integration/test_shield_syscall_count.py checks against perf).
Workloads: 4 KiB random reads/writes at a queue depth, and large sequential transfers, on
the raw ring (no crypto) and on a sealed volume; a mixed SQLite workload; the AES-GCM
ceiling. Buffers of the raw-ring workloads are reused round-robin and never checked: the
point is the I/O path, not the data.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dvs.lowlevel.shield import BLOCK, crypto_bench
from dvs.lowlevel.uring import OP_FDATASYNC, OP_READ, OP_WRITE, Buffer, DoneArray, Engine, IoArray
from dvs.shield.volume import Volume


@dataclass(frozen=True)
class Run:
    """One measured run."""

    label: str
    ops: int
    seconds: float
    bytes_moved: int
    syscalls: int
    cpu_seconds: float = 0.0  # user + system time of every thread of this process

    @property
    def mb_per_cpu_s(self) -> float:
        """Throughput per CPU-second: what the work costs, whatever else the machine ran
        (the unit `openssl speed` reports in, which counts user CPU time)."""
        return self.bytes_moved / self.cpu_seconds / 1e6 if self.cpu_seconds else 0.0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def syscalls_per_op(self) -> float:
        return self.syscalls / self.ops if self.ops else 0.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def prepare_file(path: str | os.PathLike[str], size: int, *, fill: bool = True) -> None:
    """A file of ``size`` bytes of incompressible data (so reads hit real pages)."""
    chunk = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        if fill:
            for _ in range(size // len(chunk)):
                f.write(chunk)
        f.truncate(size)


def ring_random(
    engine: Engine,
    buf: Buffer,
    file_blocks: int,
    ops: int,
    qd: int,
    *,
    write: bool,
    block: int = BLOCK,
    seed: int = 3,
    label: str = "",
) -> Run:
    """Random ``block``-sized transfers kept at queue depth ``qd`` on the raw engine."""
    rng = np.random.default_rng(seed)
    ios = IoArray(ops)
    a = ios.np
    a["opcode"] = OP_WRITE if write else OP_READ
    a["file"] = 0
    a["len"] = block
    a["offset"] = rng.integers(0, file_blocks, ops).astype(np.uint64) * block
    a["buf"] = 0
    slots = buf.size // block
    a["addr"] = buf.addr + (np.arange(ops, dtype=np.uint64) % min(qd, slots)) * block
    a["user_data"] = np.arange(ops, dtype=np.uint64)
    return _drive(engine, ios, ops, qd, block, label, sync=write)


def ring_sequential(
    engine: Engine,
    buf: Buffer,
    file_bytes: int,
    total_bytes: int,
    qd: int,
    *,
    write: bool,
    block: int = 1 << 20,
    label: str = "",
) -> Run:
    ops = total_bytes // block
    ios = IoArray(ops)
    a = ios.np
    a["opcode"] = OP_WRITE if write else OP_READ
    a["file"] = 0
    a["len"] = block
    a["offset"] = (np.arange(ops, dtype=np.uint64) * block) % (file_bytes // block * block)
    a["buf"] = 0
    slots = buf.size // block
    a["addr"] = buf.addr + (np.arange(ops, dtype=np.uint64) % min(qd, slots)) * block
    a["user_data"] = np.arange(ops, dtype=np.uint64)
    return _drive(engine, ios, ops, qd, block, label, sync=write)


def _drive(
    engine: Engine, ios: IoArray, ops: int, qd: int, block: int, label: str, *, sync: bool
) -> Run:
    """Keep ``qd`` requests in flight until all ``ops`` completed; writes end with an
    fdatasync inside the timing (durable, like the sealed volume's flush)."""
    done = DoneArray(max(qd, 64))
    before = engine.stats()
    submit_and_reap = engine.submit_and_reap  # the loop is the measured path: keep it lean
    t0 = time.perf_counter()
    sent = engine.submit(ios, 0, min(qd, ops))
    got = 0
    while got < ops:
        k = qd - (sent - got)
        if k > ops - sent:
            k = ops - sent
        accepted, n = submit_and_reap(ios, sent, k, done, 1)
        sent += accepted
        got += n
    if sync:
        fsync = IoArray(1)
        fsync.set(0, OP_FDATASYNC, user_data=1 << 62)
        if engine.run(fsync).np["res"][0] < 0:
            raise OSError(f"{label}: fdatasync failed")
    seconds = time.perf_counter() - t0
    res = done.np["res"]
    if (res[: min(got, len(res))] < 0).any():
        raise OSError(-int(res[res < 0][0]), f"{label}: a transfer failed")
    stats = engine.stats().minus(before)
    return Run(label, ops, seconds, ops * block, stats.syscalls)


def volume_random(
    vol: Volume, ops: int, qd: int, *, write: bool, seed: int = 4, label: str = ""
) -> Run:
    """Random 4 KiB blocks, ``qd`` per call (gathered/scattered in one batch)."""
    capacity_blocks = vol.capacity // BLOCK
    span = min(capacity_blocks, max(vol.size // BLOCK, 1)) if not write else capacity_blocks
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, span, ops).astype(np.uint64)
    data = np.frombuffer(os.urandom(qd * BLOCK), dtype=np.uint8).copy()
    before = vol.io_stats()
    t0 = time.perf_counter()
    for i in range(0, ops, qd):
        batch = blocks[i : i + qd]
        if write:
            vol.write_blocks_at(batch, data[: len(batch) * BLOCK])
        else:
            vol.read_blocks_at(batch, data[: len(batch) * BLOCK])
    if write:
        vol.flush()
    seconds = time.perf_counter() - t0
    stats = vol.io_stats().minus(before)
    return Run(label, ops, seconds, ops * BLOCK, stats.syscalls)


def volume_sequential(
    vol: Volume, total_bytes: int, *, write: bool, block: int = 1 << 20, label: str = ""
) -> Run:
    n_blocks = block // BLOCK
    ops = total_bytes // block
    # writes sweep the whole capacity; reads sweep what holds data
    span = max(1, (vol.capacity if write else vol.size) // block)
    data = np.frombuffer(os.urandom(block), dtype=np.uint8).copy()
    before = vol.io_stats()
    cpu0 = _cpu()
    t0 = time.perf_counter()
    for i in range(ops):
        first = (i % span) * n_blocks
        if write:
            vol.write_blocks(first, data)
        else:
            vol.read_blocks_into(first, n_blocks, data)
    if write:
        vol.flush()
    seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    stats = vol.io_stats().minus(before)
    return Run(label, ops, seconds, ops * block, stats.syscalls, cpu)


# ---- the AES-GCM ceiling -------------------------------------------------------------------


def openssl_gcm_bytes_per_s(seconds: int = 2) -> float | None:
    """``openssl speed -evp aes-256-gcm`` at 4 KiB buffers, one core (bytes per second of
    user CPU time: openssl speed times with times(2) unless -elapsed)."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "speed", "-evp", "aes-256-gcm", "-bytes", "4096", "-seconds", str(seconds)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    m = re.search(r"AES-256-GCM\s+([\d.]+)k", out)
    return float(m.group(1)) * 1000 if m else None


def dvs_gcm_bytes_per_s(blocks: int = 200_000) -> float:
    """This code's seal rate per CPU-second of the sealing thread: one reused EVP context,
    4 KiB blocks with the volume's AAD."""
    return blocks * BLOCK / crypto_bench(blocks)


# ---- SQLite --------------------------------------------------------------------------------

SQLITE_SCHEMA = """
create table if not exists items(
    id integer primary key, category integer, name text, price real, stock integer,
    payload text);
create index if not exists items_category on items(category);
create index if not exists items_name on items(name);
"""


def sqlite_mixed(connect: Callable[[], sqlite3.Connection], rounds: int = 20, seed: int = 5) -> Run:
    """The mixed workload (defined here): per round, one transaction inserting 500 rows,
    200 point selects through the name index, 50 range aggregates through the category
    index, one transaction updating 200 rows by key. Default SQLite settings
    (journal_mode=DELETE, synchronous=FULL, 4 KiB pages)."""
    import random

    rng = random.Random(seed)
    db = connect()
    db.executescript(SQLITE_SCHEMA)
    db.commit()
    statements = 0
    next_id = 1
    t0 = time.perf_counter()
    for _ in range(rounds):
        rows = []
        for _ in range(500):
            rows.append(
                (
                    next_id,
                    rng.randrange(100),
                    f"item-{next_id:08d}",
                    rng.random() * 100,
                    rng.randrange(1000),
                    "p" * rng.randrange(50, 300),
                )
            )
            next_id += 1
        with db:
            db.executemany("insert into items values (?, ?, ?, ?, ?, ?)", rows)
        for _ in range(200):
            db.execute(
                "select price, stock from items where name = ?",
                (f"item-{rng.randrange(1, next_id):08d}",),
            ).fetchall()
        for _ in range(50):
            db.execute(
                "select count(*), sum(price) from items where category = ?",
                (rng.randrange(100),),
            ).fetchall()
        with db:
            db.executemany(
                "update items set stock = stock - 1 where id = ?",
                [(rng.randrange(1, next_id),) for _ in range(200)],
            )
        statements += 500 + 200 + 50 + 200
    seconds = time.perf_counter() - t0
    db.close()
    return Run("sqlite mixed", statements, seconds, 0, 0)
