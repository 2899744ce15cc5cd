"""CntrFS benchmarks: the FUSE proxy against native ext4 and against other FUSE servers, in
one run, with ratios.

Configurations (each serves the same backing directory on the same ext4):
  native       the backing directory itself, no FUSE
  dvs          CntrFS with kernel passthrough (the default)
  dvs-nopt     CntrFS without passthrough (writeback cache), every read/write in the daemon
  pyfuse3      pyfuse3's examples/passthroughfs.py (Python, Trio), taken from pyfuse3's sdist
               (``pip download``) at run time -- the Python baseline (extra ``baseline``)
  libfuse-ll   libfuse 3.14's example/passthrough_ll.c built from libfuse3-dev (C, libfuse,
               no kernel passthrough) -- a C baseline
Workloads: fio psync sequential 1 MiB read and write, 4 KiB random read at queue depth 1
(page cache warm: ``invalidate=0``); a C loop (benchmarks/fsbench.c) for stat() of 10 000
files, create+4 KiB write+close+unlink of 10 000 files and readdir of a 10 000-entry
directory (first pass on a fresh mount = cold, later passes = warm); and CNTR's own macro
benchmarks from Debian packages: dbench, fs_mark, postmark.

The machine is shared and noisy: every repetition runs all configurations back to back, the
table shows the median over repetitions, and ratios come from the same run.

Usage (root): python3 benchmarks/bench_fs.py [--reps 3] [--quick] [--configs dvs,native,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvs.fs import CntrFs, MountOptions
from dvs.testing.cache import cache_dir

HERE = Path(__file__).resolve().parent
FILES = 10_000


# ---- helpers -------------------------------------------------------------------------------


def sh(*cmd: str, stdin: str | None = None, timeout: float = 600, cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr or out.stdout}")
    return out.stdout


def build_fsbench() -> Path:
    target = cache_dir() / "fsbench"
    src = HERE / "fsbench.c"
    if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
        sh("gcc", "-O2", "-Wall", "-o", str(target), str(src))
    return target


def build_passthrough_ll() -> Path | None:
    src = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")
    target = cache_dir() / "passthrough_ll-3.14"
    if not src.exists():
        return None
    if not target.exists():
        flags = sh("pkg-config", "--cflags", "--libs", "fuse3").split()
        sh("gcc", "-O2", "-o", str(target), str(src), *flags)
    return target


def pyfuse3_example() -> Path | None:
    """examples/passthroughfs.py from the installed pyfuse3's sdist (never committed)."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import version

    ver = version("pyfuse3")
    target = cache_dir() / f"pyfuse3-{ver}-passthroughfs.py"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        sh(
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            f"pyfuse3=={ver}",
        )
        sdist = next(Path(tmp).glob("pyfuse3-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(
                m for m in tar.getmembers() if m.name.endswith("examples/passthroughfs.py")
            )
            data = tar.extractfile(member)
            assert data is not None
            target.write_bytes(data.read())
    return target


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc.poll() is not None:
            raise RuntimeError(f"the FUSE server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not mounted within {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def external_mount(cmd: list[str], mnt: Path) -> Iterator[Path]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- configurations ------------------------------------------------------------------------


class Setup:
    def __init__(self, work: Path, fsbench: Path, pyfuse3: Path | None, ll: Path | None):
        self.work = work
        self.native = work / "native"
        self.backing = work / "backing"
        self.mnt = work / "mnt"
        self.fsbench = fsbench
        self.pyfuse3 = pyfuse3
        self.ll = ll

    def prepare(self, big_mib: int) -> None:
        for root in (self.native, self.backing):
            (root / "files").mkdir(parents=True, exist_ok=True)
            (root / "scratch").mkdir(exist_ok=True)
            if len(os.listdir(root / "files")) != FILES:
                sh(str(self.fsbench), "mkfiles", str(root / "files"), str(FILES))
            big = root / "big"
            if not big.exists() or big.stat().st_size != big_mib << 20:
                sh("dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={big_mib}", "status=none")
        self.mnt.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def mounted(self, name: str) -> Iterator[Path]:
        if name == "native":
            yield self.native
        elif name in ("dvs", "dvs-nopt"):
            opts = MountOptions.parse("nopassthrough" if name == "dvs-nopt" else "")
            with CntrFs(self.backing, opts) as fs:
                fs.mount(self.mnt)
                yield self.mnt
        elif name == "pyfuse3":
            assert self.pyfuse3 is not None
            with external_mount(
                [sys.executable, str(self.pyfuse3), str(self.backing), str(self.mnt)], self.mnt
            ) as root:
                yield root
        elif name == "libfuse-ll":
            assert self.ll is not None
            with external_mount(
                [str(self.ll), "-f", "-o", f"source={self.backing}", str(self.mnt)], self.mnt
            ) as root:
                yield root
        else:
            raise ValueError(name)


# ---- workloads ----------------------------------------------------------------------------


def fio(root: Path, rw: str, bs: str, runtime: float, size_mib: int, filename: str) -> float:
    out = sh(
        "fio",
        "--name=bench",
        f"--filename={root / filename}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size_mib}M",
        "--ioengine=psync",
        "--iodepth=1",
        "--invalidate=0",
        "--time_based",
        f"--runtime={runtime}",
        "--output-format=json",
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["bw_bytes"] if "M" in bs else side["iops"])


def fsbench(setup: Setup, *args: str) -> list[float]:
    out = sh(str(setup.fsbench), *args)
    return [float(json.loads(line)["ops_per_s"]) for line in out.splitlines()]


def dbench(root: Path, seconds: int) -> float:
    d = root / "scratch" / "dbench"
    d.mkdir(exist_ok=True)
    out = sh("dbench", "-D", str(d), "-t", str(seconds), "-c", "/usr/share/dbench/client.txt", "2")
    shutil.rmtree(d, ignore_errors=True)
    match = re.search(r"Throughput ([\d.]+) MB/sec", out)
    return float(match.group(1)) if match else float("nan")


def fs_mark(root: Path, files: int) -> float:
    d = root / "scratch" / "fm"  # fs_mark wants paths under 40 bytes
    d.mkdir(exist_ok=True)
    # fs_mark writes fs_log.txt into its working directory
    out = sh(
        "fs_mark", "-d", str(d), "-n", str(files), "-s", "4096", "-L", "1", "-S", "0", cwd=d.parent
    )
    shutil.rmtree(d, ignore_errors=True)
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    return float(rows[-1][3]) if rows else float("nan")


def postmark(root: Path, files: int, transactions: int) -> float:
    d = root / "scratch" / "postmark"
    d.mkdir(exist_ok=True)
    script = f"set location {d}\nset number {files}\nset transactions {transactions}\nrun\nquit\n"
    start = time.monotonic()
    sh("postmark", stdin=script)
    elapsed = time.monotonic() - start
    shutil.rmtree(d, ignore_errors=True)
    return transactions / elapsed


WORKLOADS: list[tuple[str, str, str]] = [
    ("seq_read", "sequential 1 MiB read", "MB/s"),
    ("seq_write", "sequential 1 MiB write", "MB/s"),
    ("rand_read", "4 KiB random read QD1", "IOPS"),
    ("stat_cold", "stat() 10k files, cold", "k/s"),
    ("stat_warm", "stat() 10k files, warm", "k/s"),
    ("create", "create+4K write+unlink 10k", "k/s"),
    ("readdir_cold", "readdir 10k entries, cold", "lists/s"),
    ("readdir_warm", "readdir 10k entries, warm", "lists/s"),
    ("dbench", "dbench, 2 clients", "MB/s"),
    ("fs_mark", "fs_mark 4 KiB files", "files/s"),
    ("postmark", "postmark", "tx/s"),
]


def run_config(setup: Setup, name: str, quick: bool, big_mib: int) -> dict[str, float]:
    rt = 2 if quick else 3
    res: dict[str, float] = {}
    with setup.mounted(name) as root:
        sh("dd", f"if={root / 'big'}", "of=/dev/null", "bs=1M", "status=none")  # warm caches
        res["seq_read"] = fio(root, "read", "1M", rt, big_mib, "big") / 1e6
        res["rand_read"] = fio(root, "randread", "4k", rt, big_mib, "big")
        res["seq_write"] = fio(root, "write", "1M", rt, 256, "scratch/written") / 1e6
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / "scratch" / "written")
        stats = fsbench(setup, "stat", str(root / "files"), str(FILES), "3")
        res["stat_cold"], res["stat_warm"] = stats[0] / 1e3, max(stats[1:]) / 1e3
        res["create"] = fsbench(setup, "create", str(root / "scratch"), str(FILES), "4096")[0] / 1e3
        lists = fsbench(setup, "readdir", str(root / "files"), "4")
        res["readdir_cold"], res["readdir_warm"] = lists[0], max(lists[1:])
        res["dbench"] = dbench(root, 5 if quick else 10)
        res["fs_mark"] = fs_mark(root, 2000 if quick else 5000)
        res["postmark"] = postmark(root, 500 if quick else 1000, 5000 if quick else 20000)
    return res


# ---- report --------------------------------------------------------------------------------


def fmt(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def report(results: dict[str, list[dict[str, float]]], configs: list[str]) -> str:
    med = {
        c: {k: statistics.median(r[k] for r in results[c]) for k in results[c][0]} for c in configs
    }
    lines = ["| workload | unit | " + " | ".join(configs) + " | dvs/native | dvs/pyfuse3 |"]
    lines.append("|" + "---|" * (len(configs) + 4))
    for key, label, unit in WORKLOADS:
        row = [label, unit] + [fmt(med[c][key]) for c in configs]
        dvs, nat = med.get("dvs", {}).get(key), med.get("native", {}).get(key)
        py = med.get("pyfuse3", {}).get(key)
        row.append(f"{dvs / nat:.2f}x" if dvs and nat else "")
        row.append(f"{dvs / py:.0f}x" if dvs and py else "")
        lines.append("| " + " | ".join(row) + " |")
    targets = [
        ("seq_read", 0.95),
        ("rand_read", 0.9),
        ("stat_warm", 0.7),
        ("create", 0.3),
    ]
    lines.append("")
    for key, goal in targets:
        if "dvs" in med and "native" in med:
            ratio = med["dvs"][key] / med["native"][key]
            verdict = "met" if ratio >= goal else "MISSED"
            lines.append(f"- target {key} >= {goal}x native: {ratio:.2f}x ({verdict})")
    if "pyfuse3" in med and "dvs" in med:
        slower = [k for k, _, _ in WORKLOADS if med["dvs"][k] <= med["pyfuse3"][k]]
        lines.append(
            "- faster than pyfuse3 on every row: "
            + ("yes" if not slower else f"NO ({', '.join(slower)})")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller files")
    parser.add_argument("--configs", default="native,dvs,dvs-nopt,pyfuse3,libfuse-ll")
    parser.add_argument("--work", default="/var/tmp/dvsfs", help="ext4 scratch directory")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fs: needs root (FUSE mounts)", file=sys.stderr)
        return 2
    fsbench_bin = build_fsbench()
    pyfuse3 = pyfuse3_example()
    ll = build_passthrough_ll()
    configs = [c for c in args.configs.split(",") if c]
    if "pyfuse3" in configs and pyfuse3 is None:
        print("bench_fs: pyfuse3 not installed (pip install '.[baseline]'); skipping it")
        configs.remove("pyfuse3")
    if "libfuse-ll" in configs and ll is None:
        configs.remove("libfuse-ll")
    big_mib = 256 if args.quick else 512
    work = Path(args.work)
    setup = Setup(work, fsbench_bin, pyfuse3, ll)
    setup.prepare(big_mib)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}; load {os.getloadavg()[0]:.1f}; work dir {work} "
        f"({sh('findmnt', '-n', '-o', 'FSTYPE', '-T', str(work)).strip()})"
    )
    print("engines: fio psync iodepth=1, invalidate=0 (page cache warm); fsbench.c loops")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for name in configs:
            start = time.monotonic()
            results[name].append(run_config(setup, name, args.quick, big_mib))
            print(f"rep {rep + 1}/{args.reps} {name}: {time.monotonic() - start:.0f} s", flush=True)
    table = report(results, configs)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
