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
    # sealed sequential rows: `openssl speed` run right before each repetition (bytes/s)
    gcm_paired: list[float] = field(default_factory=list)
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


def c_loop(
    loop: Path, engine: str, mode: str, path: Path, bs: int, qd: int, ops: int, direct: bool
) -> tuple[float, float]:
    res = subprocess.run(
        [
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
        ],
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
    def cmd(n: int) -> list[str]:
        return [
            str(loop),
            engine,
            mode,
            str(path),
            str(FILE_BYTES),
            str(bs),
            str(qd),
            str(n),
            str(int(direct)),
            str(int("write" in mode)),
        ]

    big, small = perf_syscalls(cmd(ops)), perf_syscalls(cmd(ops // 2))
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


def run_io(args: argparse.Namespace, bins: dict[str, Path], tmp: Path) -> list[Row]:
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
            if direct and "write" in mode and bs == BLOCK and qd == 1:
                continue  # O_DIRECT QD1 writes: too slow on this virtual disk to be useful
            ops = max(ops // (10 if args.quick else 1) // (4 if direct else 1), 64)
            write = "write" in mode
            systems = ["C psync", "C liburing", "dvs ring", "dvs sealed"]
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
                            # the GCM ceiling of this very moment, for a paired ratio
                            row.gcm_paired.append(kb.openssl_gcm_bytes_per_s(1) or float("nan"))
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


def run_sqlite(
    args: argparse.Namespace, bins: dict[str, Path], tmp: Path
) -> dict[str, list[float]]:
    rounds = 20 if not args.quick else 5
    out: dict[str, list[float]] = {}
    for _ in range(args.reps * 2):  # cheap, and noisier than the rest: more samples
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
            seconds = float(res.stdout.split("seconds=")[1])
            n = int(res.stdout.split("statements=")[1].split()[0])
            out.setdefault(f"C driver, {system}", []).append(n / seconds)
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
            out.setdefault(f"Python sqlite3, {system}", []).append(run.ops_per_s)
    return out


def fmt_rate(v: float) -> str:
    return f"{v / 1e3:,.1f} k" if v < 1e6 else f"{v / 1e6:,.2f} M"


def report(
    args: argparse.Namespace,
    rows: list[Row],
    crypto: dict[str, float],
    sql: dict[str, list[float]],
    check: tuple[int, int] | None,
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
    for r in rows:
        if r.system == "dvs sealed" and r.gcm_paired and len(r.gcm_paired) == len(r.mb_per_s):
            wall = statistics.median(
                mb * 1e6 / g for mb, g in zip(r.mb_per_s, r.gcm_paired, strict=True)
            )
            cpu = statistics.median(
                mb * 1e6 / g for mb, g in zip(r.mb_per_cpu_s, r.gcm_paired, strict=True)
            )
            lines.append(
                f"- sealed {r.workload} ({'O_DIRECT' if r.direct else 'buffered'}, QD{r.qd}): "
                f"{statistics.median(r.mb_per_s):,.0f} MB/s wall-clock = {wall:.2f}x, and "
                f"{statistics.median(r.mb_per_cpu_s):,.0f} MB per CPU-second (all threads, "
                f"io-wq included) = {cpu:.2f}x the `openssl speed -evp aes-256-gcm` figure "
                f"measured right before each repetition (median "
                f"{statistics.median(r.gcm_paired) / 1e9:.2f} GB per user-CPU-second; "
                f"medians of paired ratios)"
            )
    lines.append("")
    lines.append(
        "SQLite mixed workload (500-row insert txn, 200 indexed point selects, 50 indexed "
        "range aggregates, 200-row update txn per round; journal_mode=DELETE, "
        "synchronous=FULL, 4 KiB pages), statements/s:"
    )
    for k, v in sql.items():
        base = sql.get("C driver, plain" if k.startswith("C") else "Python sqlite3, plain", [])
        rate = statistics.median(v)
        ratio = ""
        if len(base) == len(v) and "plain" not in k:
            # paired: each repetition's ratio, then the median (the machine is shared)
            ratio = f", {statistics.median(a / b for a, b in zip(v, base, strict=True)):.2f}x plain"
        lines.append(f"- {k}: {rate:,.0f} statements/s (median of {len(v)}{ratio})")
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
        "--parts", default="io,crypto,sqlite", help="comma-separated: io, crypto, sqlite"
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
        sql: dict[str, list[float]] = {}
        if "io" in parts:
            print("I/O workloads", flush=True)
            rows = run_io(args, bins, tmp)
            check = counter_check(tmp) if shutil.which("perf") else None
        if "crypto" in parts:
            print("crypto ceiling", flush=True)
            crypto = run_crypto(args)
        if "sqlite" in parts:
            print("SQLite", flush=True)
            sql = run_sqlite(args, bins, tmp)
    text = report(args, rows, crypto, sql, check)
    command = "python3 benchmarks/bench_shield.py " + " ".join(sys.argv[1:])
    section = f"## Shielded I/O (issue 4)\n\nCommand: `{command.strip()}`\n\n{text}\n"
    print()
    print(section)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": [r.__dict__ for r in rows], "crypto": crypto, "sqlite": sql}, indent=1
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
