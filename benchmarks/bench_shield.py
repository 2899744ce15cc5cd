"""Shielded I/O benchmarks: the dvs ring and the sealed volume against plain C baselines
measured in the same run, with syscalls per operation, the enclave-exit cost MODEL, the
AES-GCM ceiling, and SQLite on a plain file, on dvs and on SQLCipher.

    python3 benchmarks/bench_shield.py [--quick] [--reps 3] [--write-results]

Every figure states engine, queue depth, block size and whether O_DIRECT was used. The
machine is a shared 2-vCPU VM: each configuration runs ``--reps`` times, the baselines
interleaved with dvs, and the table shows medians; ratios are medians of per-repetition
ratios (each taken within one repetition). Syscalls: the dvs engines count their own
(checked against perf in the "counter check" line and in
tests/integration/test_shield_syscall_count.py); the C baselines are counted from outside
with ``perf stat -e raw_syscalls:sys_enter`` (a run of N ops minus a run of N/2, so start-up
cancels). The exit cost model is a MODEL: measured time plus syscalls x C_exit cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
# numpy's OpenBLAS threads spin on a 2-vCPU machine; nothing here needs BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dvs.lowlevel import uring as u  # noqa: E402
from dvs.lowlevel.shield import BLOCK  # noqa: E402
from dvs.shield import bench as kb  # noqa: E402
from dvs.shield import sqlite as ssql  # noqa: E402
from dvs.shield.engine import cpu_hz, exit_cost_model  # noqa: E402
from dvs.shield.volume import Volume  # noqa: E402

FILE_BYTES = 256 << 20
KEY = bytes(range(32))


@dataclass
class Row:
    workload: str  # e.g. "4 KiB randread"
    qd: int
    direct: bool
    system: str  # "C psync", "C liburing", "dvs ring", "dvs sealed"
    ops_per_s: list[float] = field(default_factory=list)
    mb_per_s: list[float] = field(default_factory=list)
    syscalls_per_op: float = float("nan")
    # sealed sequential rows: `openssl speed` run right before each repetition (bytes/s),
    # per user-CPU-second and (-elapsed) per wall-clock second
    gcm_paired: list[float] = field(default_factory=list)
    gcm_elapsed: list[float] = field(default_factory=list)
    mb_per_cpu_s: list[float] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, bool]:
        return (self.workload, self.qd, self.direct)


def build(tmp: Path) -> dict[str, Path]:
    """Compile the C baselines from benchmarks/*.c (plain gcc, Debian packages)."""
    out: dict[str, Path] = {}
    cc = ["gcc", "-O2", "-Wall"]
    out["loop"] = tmp / "uring_loop"
    subprocess.run([*cc, "-o", out["loop"], HERE / "uring_loop.c", "-luring"], check=True)
    src = HERE / "sqlite_workload.c"
    out["sqlite plain"] = tmp / "sqlite_plain"
    subprocess.run([*cc, "-o", out["sqlite plain"], src, "-lsqlite3"], check=True)
    out["sqlite dvs"] = tmp / "sqlite_dvs"
    core = [*sorted((ROOT / "csrc/shield").glob("*.c")), *sorted((ROOT / "csrc/uring").glob("*.c"))]
    subprocess.run(
        [
            *cc,
            "-DWITH_DVS",
            f"-I{ROOT / 'csrc'}",
            "-o",
            out["sqlite dvs"],
            src,
            *core,
            ROOT / "csrc/sys/sync.c",
            "-lsqlite3",
            "-luring",
            "-lcrypto",
            "-lpthread",
        ],
        check=True,
    )
    if Path("/usr/include/sqlcipher/sqlite3.h").exists():
        out["sqlite sqlcipher"] = tmp / "sqlite_sqlcipher"
        subprocess.run(
            [
                *cc,
                "-DWITH_SQLCIPHER",
                "-DSQLITE_HAS_CODEC",
                "-I/usr/include/sqlcipher",
                "-o",
                out["sqlite sqlcipher"],
                src,
                "-lsqlcipher",
            ],
            check=True,
        )
    return out


def perf_syscalls(cmd: list[str]) -> int | None:
    if shutil.which("perf") is None:
        return None
    res = subprocess.run(
        ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=600,
    )
    for line in res.stderr.splitlines():
        if "raw_syscalls:sys_enter" in line and line.split(",")[0].isdigit():
            return int(line.split(",")[0])
    return None


def c_loop_command(
    loop: Path, engine: str, mode: str, path: Path, bs: int, qd: int, ops: int, direct: bool
) -> list[str]:
    """The C baseline's command line (the arguments of benchmarks/uring_loop.c)."""
    return [
        str(loop),
        engine,
        mode,
        str(path),
        str(FILE_BYTES),
        str(bs),
        str(qd),
        str(ops),
        str(int(direct)),
        str(int("write" in mode)),
    ]


def c_loop(
    loop: Path, engine: str, mode: str, path: Path, bs: int, qd: int, ops: int, direct: bool
) -> tuple[float, float]:
    res = subprocess.run(
        c_loop_command(loop, engine, mode, path, bs, qd, ops, direct),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    seconds = float(res.stdout.split("seconds=")[1])
    return ops / seconds, ops * bs / seconds / 1e6


def c_loop_syscalls(
    loop: Path, engine: str, mode: str, path: Path, bs: int, qd: int, ops: int, direct: bool
) -> float:
    big = perf_syscalls(c_loop_command(loop, engine, mode, path, bs, qd, ops, direct))
    small = perf_syscalls(c_loop_command(loop, engine, mode, path, bs, qd, ops // 2, direct))
    if big is None or small is None:
        return float("nan")
    return (big - small) / (ops - ops // 2)


WORKLOADS = [
    # name, mode, block size, queue depth, ops (full run)
    ("4 KiB randread", "randread", BLOCK, 1, 100_000),
    ("4 KiB randread", "randread", BLOCK, 32, 300_000),
    ("4 KiB randwrite", "randwrite", BLOCK, 1, 100_000),
    ("4 KiB randwrite", "randwrite", BLOCK, 32, 300_000),
    ("1 MiB seqread", "seqread", 1 << 20, 4, 2048),
    ("1 MiB seqwrite", "seqwrite", 1 << 20, 4, 1024),
]


def run_io(
    args: argparse.Namespace, bins: dict[str, Path], tmp: Path, *, sealed_only: bool = False
) -> list[Row]:
    """Every workload, or with ``sealed_only`` the 1 MiB sequential ones alone (the sealed
    throughput against the GCM ceiling, with the C liburing loop and the dvs ring)."""
    rows: dict[tuple[str, int, bool, str], Row] = {}
    data = tmp / "data"
    kb.prepare_file(data, FILE_BYTES)
    vol_path = tmp / "sealed"
    for direct in (False, True):
        vol_dir = Volume.create(
            vol_path, FILE_BYTES, key=KEY, direct=direct, read_slots=256, write_slots=1024
        )
        kb.volume_sequential(vol_dir, FILE_BYTES, write=True)  # every block holds data
        vol_dir.close()
        for name, mode, bs, qd, ops in WORKLOADS:
            if sealed_only and bs == BLOCK:
                continue
            if direct and "write" in mode and bs == BLOCK and qd == 1:
                continue  # O_DIRECT QD1 writes: too slow on this virtual disk to be useful
            ops = max(ops // (10 if args.quick else 1) // (4 if direct else 1), 64)
            write = "write" in mode
            systems = ["C psync", "C liburing", "dvs ring", "dvs sealed"]
            if sealed_only:
                systems.remove("C psync")
            for system in systems:
                rows.setdefault((name, qd, direct, system), Row(name, qd, direct, system))
            for _rep in range(args.reps):
                for system in systems:
                    row = rows[(name, qd, direct, system)]
                    if system.startswith("C"):
                        eng = "psync" if system == "C psync" else "uring"
                        rate, mb = c_loop(bins["loop"], eng, mode, data, bs, qd, ops, direct)
                        row.ops_per_s.append(rate)
                        row.mb_per_s.append(mb)
                    elif system == "dvs ring":
                        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
                        fd = os.open(data, flags)
                        buf = u.Buffer(max(qd, 1) * bs)
                        with u.Engine(
                            "io_uring", files=[fd], buffers=[buf], entries=max(qd, 2)
                        ) as e:
                            if bs == BLOCK:
                                run = kb.ring_random(e, buf, FILE_BYTES // bs, ops, qd, write=write)
                            else:
                                run = kb.ring_sequential(
                                    e, buf, FILE_BYTES, ops * bs, qd, write=write, block=bs
                                )
                        os.close(fd)
                        buf.close()
                        row.ops_per_s.append(run.ops_per_s)
                        row.mb_per_s.append(run.mb_per_s)
                        row.syscalls_per_op = run.syscalls_per_op
                    else:
                        if bs != BLOCK:
                            # the GCM ceiling of this very moment, for paired ratios
                            row.gcm_paired.append(kb.openssl_gcm_bytes_per_s(1) or float("nan"))
                            row.gcm_elapsed.append(
                                kb.openssl_gcm_bytes_per_s(1, elapsed=True) or float("nan")
                            )
                        with Volume.open(
                            vol_path, key=KEY, direct=direct, read_slots=256, write_slots=1024
                        ) as vol:
                            if bs == BLOCK:
                                kb.volume_random(vol, 2_000, qd, write=False)  # load the tree
                                run = kb.volume_random(vol, ops, qd, write=write)
                            else:
                                run = kb.volume_sequential(vol, ops * bs, write=write, block=bs)
                                row.mb_per_cpu_s.append(run.mb_per_cpu_s)
                        row.ops_per_s.append(run.ops_per_s)
                        row.mb_per_s.append(run.mb_per_s)
                        row.syscalls_per_op = run.syscalls_per_op
            for system in ("C psync", "C liburing"):
                if (name, qd, direct, system) not in rows:
                    continue
                eng = "psync" if system == "C psync" else "uring"
                rows[(name, qd, direct, system)].syscalls_per_op = c_loop_syscalls(
                    bins["loop"], eng, mode, data, bs, qd, min(ops, 50_000), direct
                )
            print(f"  done: {name} QD{qd} {'O_DIRECT' if direct else 'buffered'}", flush=True)
    return list(rows.values())


def counter_check(tmp: Path) -> tuple[int, int]:
    """The dvs ring's own syscall count vs perf's, for one configuration (differential)."""
    script = textwrap.dedent(
        """
        import os, sys
        from dvs.lowlevel import uring as u
        from dvs.shield import bench as kb
        fd = os.open(sys.argv[1], os.O_RDWR)
        buf = u.Buffer(32 * 4096)
        e = u.Engine("io_uring", files=[fd], buffers=[buf], entries=32)
        r = kb.ring_random(e, buf, 65536, int(sys.argv[2]), 32, write=False)
        print(r.syscalls)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    counts = []
    for ops in (20_000, 60_000):
        res = subprocess.run(
            [
                "perf",
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                "--",
                sys.executable,
                "-c",
                script,
                str(tmp / "data"),
                str(ops),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        outside = int(next(x for x in res.stderr.splitlines() if "raw_syscalls" in x).split(",")[0])
        counts.append((outside, int(res.stdout.strip().splitlines()[-1])))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


RING_VARIANTS: list[tuple[str, dict[str, bool]]] = [
    ("COOP_TASKRUN, lazy reap (default)", {}),
    ("COOP_TASKRUN, eager reap (before)", {"eager_taskrun": True}),
    ("no COOP_TASKRUN", {"coop_taskrun": False}),
    ("DEFER_TASKRUN + SINGLE_ISSUER", {"coop_taskrun": False, "defer_taskrun": True}),
]
RING_WAITS = [1, 8, 16, 32]


@dataclass
class RingVariant:
    name: str
    reap_wait: int
    ops_per_s: list[float] = field(default_factory=list)
    syscalls_per_op: list[float] = field(default_factory=list)
    sleeps_per_op: list[float] = field(default_factory=list)
    vs_c: list[float] = field(default_factory=list)


def run_ring_variants(
    args: argparse.Namespace, bins: dict[str, Path], tmp: Path
) -> list[RingVariant]:
    """4 KiB O_DIRECT random reads at QD32: the dvs ring with each completion-work mode and
    reap strategy (completions waited for per io_uring_enter, which also carries the
    refill), the C liburing loop in the same repetition as the baseline. sleeps/op: the
    submitting thread's voluntary context switches (each a wait in io_uring_enter)."""
    import resource

    data = tmp / "data"
    if not data.exists():
        kb.prepare_file(data, FILE_BYTES)
    os.sync()  # no writeback of the freshly written file competing with the reads
    ops = 60_000 if not args.quick else 10_000
    out: dict[tuple[str, int], RingVariant] = {}
    for _rep in range(args.reps):
        for name, kw in RING_VARIANTS:
            # the baseline right before each group: the disk's speed drifts with the load
            c_rate, _ = c_loop(bins["loop"], "uring", "randread", data, BLOCK, 32, ops, True)
            for wait in RING_WAITS:
                v = out.setdefault((name, wait), RingVariant(name, wait))
                fd = os.open(data, os.O_RDWR | os.O_DIRECT)
                buf = u.Buffer(32 * BLOCK)
                try:
                    with u.Engine("io_uring", files=[fd], buffers=[buf], entries=32, **kw) as e:
                        before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
                        run = kb.ring_random(
                            e, buf, FILE_BYTES // BLOCK, ops, 32, write=False, reap_wait=wait
                        )
                        sleeps = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
                finally:
                    os.close(fd)
                    buf.close()
                v.ops_per_s.append(run.ops_per_s)
                v.syscalls_per_op.append(run.syscalls_per_op)
                v.sleeps_per_op.append(sleeps / ops)
                v.vs_c.append(run.ops_per_s / c_rate)
    print("  done: ring variants", flush=True)
    return list(out.values())


def run_crypto(args: argparse.Namespace) -> dict[str, float]:
    res: dict[str, list[float]] = {"openssl": [], "openssl aead": [], "dvs": []}
    for _ in range(args.reps):
        o = kb.openssl_gcm_bytes_per_s(2 if not args.quick else 1)
        if o:
            res["openssl"].append(o)
        out = subprocess.run(
            [
                "openssl",
                "speed",
                "-aead",
                "-evp",
                "aes-256-gcm",
                "-bytes",
                "4096",
                "-seconds",
                "2" if not args.quick else "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        import re

        m = re.search(r"AES-256-GCM\s+([\d.]+)k", out)
        if m:
            res["openssl aead"].append(float(m.group(1)) * 1000)
        res["dvs"].append(kb.dvs_gcm_bytes_per_s(100_000 if not args.quick else 20_000))
    return {k: statistics.median(v) for k, v in res.items() if v}


@dataclass
class SqlRuns:
    wall: dict[str, list[float]] = field(default_factory=dict)  # statements/s
    cpu: dict[str, list[float]] = field(default_factory=dict)  # statements per CPU-second
    syncs_per_txn: dict[str, float] = field(default_factory=dict)


def _sqlite_syncs(exe: Path, system: str, db: Path, rounds: int) -> float | None:
    """fdatasync/fsync per transaction of one C-driver run: system calls for plain and
    SQLCipher, io_uring FSYNC requests (opcode 3) for dvs, counted by perf tracepoints."""
    if shutil.which("perf") is None:
        return None
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    if system == "dvs":
        events = ["-e", "io_uring:io_uring_submit_req", "--filter", "opcode == 3"]
    else:
        events = ["-e", "syscalls:sys_enter_fdatasync", "-e", "syscalls:sys_enter_fsync"]
    res = subprocess.run(
        ["perf", "stat", "-x,", *events, "--", str(exe), str(db), str(rounds)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    total = 0
    for line in res.stderr.splitlines():
        first = line.split(",")[0]
        if first.isdigit():
            total += int(first)
    # two transactions per round, plus the schema's three statements (autocommit)
    return total / (2 * rounds + 3)


def run_sqlite(args: argparse.Namespace, bins: dict[str, Path], tmp: Path) -> SqlRuns:
    rounds = 20 if not args.quick else 5
    out = SqlRuns()
    for _ in range(args.reps * 3):  # cheap, and noisier than the rest: more samples
        for system in ("plain", "dvs", "sqlcipher"):
            exe = bins.get(f"sqlite {system}")
            if exe is None:
                continue
            db = tmp / f"c-{system}.db"
            for p in tmp.glob(f"c-{system}.db*"):
                p.unlink()
            res = subprocess.run(
                [str(exe), str(db), str(rounds)],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            seconds = float(res.stdout.split("seconds=")[1].split()[0])
            cpu = float(res.stdout.split("cpu=")[1].split()[0])
            n = int(res.stdout.split("statements=")[1].split()[0])
            out.wall.setdefault(f"C driver, {system}", []).append(n / seconds)
            out.cpu.setdefault(f"C driver, {system}", []).append(n / cpu)
        # the same workload through Python's sqlite3 module
        for system in ("plain", "dvs"):
            db = tmp / f"py-{system}.db"
            for p in tmp.glob(f"py-{system}.db*"):
                p.unlink()
            if system == "plain":
                run = kb.sqlite_mixed(lambda db=db: __import__("sqlite3").connect(db), rounds)
            else:
                name = f"bench-{os.getpid()}-{time.monotonic_ns()}"
                vfs = ssql.register(name, key=KEY)
                run = kb.sqlite_mixed(lambda db=db, vfs=vfs: vfs.connect(db), rounds)
                vfs.unregister()
            out.wall.setdefault(f"Python sqlite3, {system}", []).append(run.ops_per_s)
            out.cpu.setdefault(f"Python sqlite3, {system}", []).append(run.ops / run.cpu_seconds)
    for system in ("plain", "dvs", "sqlcipher"):
        exe = bins.get(f"sqlite {system}")
        if exe is not None:
            syncs = _sqlite_syncs(exe, system, tmp / f"s-{system}.db", rounds)
            if syncs is not None:
                out.syncs_per_txn[system] = syncs
    return out


def fmt_rate(v: float) -> str:
    return f"{v / 1e3:,.1f} k" if v < 1e6 else f"{v / 1e6:,.2f} M"


def report(
    args: argparse.Namespace,
    rows: list[Row],
    crypto: dict[str, float],
    sql: SqlRuns,
    check: tuple[int, int] | None,
    ring_variants: list[RingVariant],
) -> str:
    hz = cpu_hz()
    lines = []
    lines.append(
        f"Machine: {platform.node()}, {os.cpu_count()} vCPU, Linux {platform.release()}, "
        f"load average at start {os.getloadavg()[0]:.1f}; {args.reps} repetitions, "
        f"medians; file {FILE_BYTES >> 20} MiB, page cache warm unless O_DIRECT."
    )
    lines.append("")
    lines.append(
        "| workload | QD | O_DIRECT | system | ops/s | MB/s | syscalls/op | vs C liburing |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    by_key: dict[tuple[str, int, bool], dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault(r.key, {})[r.system] = r
    for key, systems in by_key.items():
        base = systems.get("C liburing")
        for name in ("C psync", "C liburing", "dvs ring", "dvs sealed"):
            r = systems.get(name)
            if r is None or not r.ops_per_s:
                continue
            ratio = ""
            if base and name != "C liburing" and len(base.ops_per_s) == len(r.ops_per_s):
                pairs = zip(r.ops_per_s, base.ops_per_s, strict=True)
                ratio = f"{statistics.median(a / b for a, b in pairs):.2f}x"
            lines.append(
                f"| {key[0]} | {key[1]} | {'yes' if key[2] else 'no'} | {name} | "
                f"{fmt_rate(statistics.median(r.ops_per_s))} | "
                f"{statistics.median(r.mb_per_s):,.0f} | {r.syscalls_per_op:.3f} | {ratio} |"
            )
    lines.append("")
    if check:
        lines.append(
            f"Counter check (dvs ring, 4 KiB randread QD32, 40,000 ops, differential): "
            f"perf counted {check[0]} syscalls, the engine counted {check[1]}."
        )
        lines.append("")
    lines.append("AES-256-GCM ceiling, one core, 4 KiB buffers:")
    for k, v in crypto.items():
        label = {
            "openssl": "`openssl speed -evp aes-256-gcm -bytes 4096`",
            "openssl aead": "`openssl speed -aead -evp aes-256-gcm -bytes 4096` "
            "(IV+tag per buffer)",
            "dvs": "dvs seal loop (one EVP context, per-block IV, 40-byte AAD, tag)",
        }[k]
        lines.append(f"- {label}: {v / 1e9:.2f} GB/s")
    ring_mb = {
        r.key: statistics.median(r.mb_per_s) for r in rows if r.system == "dvs ring" and r.mb_per_s
    }
    for r in rows:
        if r.system == "dvs sealed" and r.gcm_paired and len(r.gcm_paired) == len(r.mb_per_s):
            cpu = statistics.median(
                mb * 1e6 / g for mb, g in zip(r.mb_per_cpu_s, r.gcm_paired, strict=True)
            )
            wall_vs_elapsed = ""
            if len(r.gcm_elapsed) == len(r.mb_per_s):
                ratio = statistics.median(
                    mb * 1e6 / g for mb, g in zip(r.mb_per_s, r.gcm_elapsed, strict=True)
                )
                wall_vs_elapsed = (
                    f" = {ratio:.2f}x `openssl speed -elapsed` (wall-clock, median "
                    f"{statistics.median(r.gcm_elapsed) / 1e9:.2f} GB/s)"
                )
            wall_vs_cpu = statistics.median(
                mb * 1e6 / g for mb, g in zip(r.mb_per_s, r.gcm_paired, strict=True)
            )
            device = ""
            if r.key in ring_mb:
                bound = ring_mb[r.key] * 1e6 / statistics.median(r.gcm_paired)
                device = (
                    f"; the dvs ring alone (no crypto) moves {ring_mb[r.key]:,.0f} MB/s on this "
                    f"workload = {bound:.2f}x, the most any sealed figure could reach here"
                )
            lines.append(
                f"- sealed {r.workload} ({'O_DIRECT' if r.direct else 'buffered'}, QD{r.qd}): "
                f"{statistics.median(r.mb_per_cpu_s):,.0f} MB per CPU-second (all threads, "
                f"io-wq included) = {cpu:.2f}x `openssl speed -evp aes-256-gcm` (per "
                f"user-CPU-second, median {statistics.median(r.gcm_paired) / 1e9:.2f} GB/s); "
                f"{statistics.median(r.mb_per_s):,.0f} MB/s wall-clock{wall_vs_elapsed}, "
                f"{wall_vs_cpu:.2f}x the per-CPU figure{device} (both openssl runs right "
                f"before each repetition; medians of paired ratios)"
            )
    lines.append("")
    if ring_variants:
        lines.append(
            "Ring completion modes and reap strategies (4 KiB randread, QD32, O_DIRECT, dvs "
            "ring driven from Python, one submit+wait io_uring_enter per crossing; the C "
            "liburing loop (no setup flags, submit_and_wait(1)) in the same repetition; "
            "sleeps/op = voluntary context switches of the submitting thread):"
        )
        lines.append("")
        lines.append(
            "| completion work | waits for | ops/s | syscalls/op | sleeps/op | vs C liburing |"
        )
        lines.append("|---|---|---|---|---|---|")
        for v in ring_variants:
            lines.append(
                f"| {v.name} | {v.reap_wait} | {fmt_rate(statistics.median(v.ops_per_s))} | "
                f"{statistics.median(v.syscalls_per_op):.3f} | "
                f"{statistics.median(v.sleeps_per_op):.3f} | "
                f"{statistics.median(v.vs_c):.2f}x |"
            )
        lines.append("")
    lines.append(
        "SQLite mixed workload (500-row insert txn, 200 indexed point selects, 50 indexed "
        "range aggregates, 200-row update txn per round; journal_mode=DELETE, "
        "synchronous=FULL, 4 KiB pages; buffered files), statements/s wall-clock and per "
        "CPU-second (the process's CPU time, kernel I/O workers included), ratios paired "
        "per repetition:"
    )
    for k, v in sql.wall.items():
        plain = "C driver, plain" if k.startswith("C") else "Python sqlite3, plain"
        base, cbase, cpu = sql.wall.get(plain, []), sql.cpu.get(plain, []), sql.cpu.get(k, [])
        ratio = ""
        if len(base) == len(v) and "plain" not in k:
            w = statistics.median(a / b for a, b in zip(v, base, strict=True))
            c = statistics.median(a / b for a, b in zip(cpu, cbase, strict=True))
            ratio = f"; {w:.2f}x plain wall-clock, {c:.2f}x plain per CPU-second"
        lines.append(
            f"- {k}: {statistics.median(v):,.0f} statements/s, "
            f"{statistics.median(cpu):,.0f} per CPU-second (median of {len(v)}{ratio})"
        )
    if sql.syncs_per_txn:
        lines.append(
            "- syncs per transaction (C driver, perf tracepoints: fdatasync/fsync calls; for "
            "dvs io_uring FSYNC requests): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sql.syncs_per_txn.items())
        )
    lines.append("")
    lines.append(
        f"Enclave-exit cost MODEL (not a measurement): measured time + syscalls x C_exit "
        f"cycles at {hz / 1e9:.1f} GHz; modelled ops/s:"
    )
    lines.append("")
    lines.append("| workload | QD | O_DIRECT | system | 8,000 cyc | 12,000 cyc | 17,000 cyc |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.ops_per_s or r.syscalls_per_op != r.syscalls_per_op:
            continue
        rate = statistics.median(r.ops_per_s)
        models = exit_cost_model(1.0, int(r.syscalls_per_op * rate), int(rate), cpu_hz=hz)
        lines.append(
            f"| {r.workload} | {r.qd} | {'yes' if r.direct else 'no'} | {r.system} | "
            + " | ".join(fmt_rate(m.modelled_ops_per_s) for m in models)
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a tenth of the operations")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the test files go (default: a temp dir)")
    ap.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--json", default=None, help="also dump raw numbers here")
    ap.add_argument(
        "--parts",
        default="io,ring,crypto,sqlite",
        help="comma-separated: io, ring (completion modes), crypto, sqlite; sealed: of io "
        "only the 1 MiB sequential rows (the sealed figures against the GCM ceiling)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as t:
        tmp = Path(t)
        print("building the C baselines", flush=True)
        bins = build(tmp)
        parts = set(args.parts.split(","))
        rows: list[Row] = []
        check = None
        crypto: dict[str, float] = {}
        sql = SqlRuns()
        ring_variants: list[RingVariant] = []
        if "io" in parts:
            print("I/O workloads", flush=True)
            rows = run_io(args, bins, tmp)
            check = counter_check(tmp) if shutil.which("perf") else None
        elif "sealed" in parts:
            print("sealed sequential workloads", flush=True)
            rows = run_io(args, bins, tmp, sealed_only=True)
        if "ring" in parts:
            print("ring completion modes", flush=True)
            ring_variants = run_ring_variants(args, bins, tmp)
        if "crypto" in parts:
            print("crypto ceiling", flush=True)
            crypto = run_crypto(args)
        if "sqlite" in parts:
            print("SQLite", flush=True)
            sql = run_sqlite(args, bins, tmp)
    text = report(args, rows, crypto, sql, check, ring_variants)
    command = "python3 benchmarks/bench_shield.py " + " ".join(sys.argv[1:])
    section = f"## Shielded I/O (issue 4)\n\nCommand: `{command.strip()}`\n\n{text}\n"
    print()
    print(section)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [r.__dict__ for r in rows],
                    "crypto": crypto,
                    "sqlite": sql.__dict__,
                    "ring_variants": [v.__dict__ for v in ring_variants],
                },
                indent=1,
            )
        )
    if args.write_results:
        results = HERE / "RESULTS.md"
        old = results.read_text() if results.exists() else "# Benchmark results\n"
        begin, end = "<!-- shield:begin -->", "<!-- shield:end -->"
        block = f"{begin}\n{section}{end}"
        if begin in old:
            old = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
        else:
            old = old.rstrip() + "\n\n" + block + "\n"
        results.write_text(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
