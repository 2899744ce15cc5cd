"""CntrFS benchmarks: the FUSE proxy against native ext4 and against other FUSE servers, in
one run, with ratios.

Configurations (each serves the same backing directory on the same ext4):
  native       the backing directory itself, no FUSE
  dvs          CntrFS with kernel passthrough, requests over FUSE-over-io_uring (the defaults
               when the kernel offers the ring; ``-o enable_uring`` so it does)
  dvs-dev      the same over /dev/fuse read/write (``-o uring=off``)
  dvs-nopt     CntrFS without passthrough (writeback cache), every read/write in the daemon
  dvs-cache    dvs with passthrough_hp's cache policy (``-o timeout=86400``: entries and
               attributes trusted for a day -- only right when nobody else changes the tree)
  pyfuse3      pyfuse3's examples/passthroughfs.py (Python, Trio), taken from pyfuse3's sdist
               (``pip download``) at run time -- the Python baseline (extra ``baseline``)
  libfuse-ll   libfuse 3.14's example/passthrough_ll.c built from libfuse3-dev (C, libfuse,
               no kernel passthrough) -- a C baseline
  libfuse-hp   libfuse 3.14's example/passthrough_hp.cc (C++, libfuse's fastest passthrough
               server, the reference issue 8 names), built from Debian's fuse3 source tarball
               (deb.debian.org, SHA-256 checked against Debian's fuse3_3.14.0-4.dsc) with the
               options it ships with -- libfuse 3.14 has no kernel passthrough either
Workloads: fio psync sequential 1 MiB read and write, 4 KiB random read at queue depth 1
(page cache warm: ``invalidate=0``); a C loop (benchmarks/fsbench.c) for stat() of 10 000
files, create+4 KiB write+close+unlink of 10 000 files and readdir of a 10 000-entry
directory (first pass on a fresh mount = cold, later passes = warm); and CNTR's own macro
benchmarks from Debian packages: dbench, fs_mark, postmark.

The machine is shared and noisy: every repetition runs all configurations back to back, the
table shows the median over repetitions, and ratios come from the same run.

Usage (root): python3 benchmarks/bench_fs.py [--reps 3] [--quick] [--configs dvs,native,...]
                                            [--workloads create,stat_warm,...]
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
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvs.fs import CntrFs, MountOptions
from dvs.testing.cache import cache_dir

HERE = Path(__file__).resolve().parent
FILES = 10_000
# short names for mount points and scratch directories: fs_mark refuses paths of 40+ bytes
TAGS = {
    "native": "n",
    "dvs": "d",
    "dvs-dev": "v",
    "dvs-nopt": "w",
    "pyfuse3": "p",
    "libfuse-ll": "l",
    "libfuse-hp": "h",
    "dvs-cache": "c",
}
# Debian 12's fuse3 source (libfuse3-dev ships passthrough_ll.c but not passthrough_hp.cc)
FUSE3_ORIG = "http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_3.14.0.orig.tar.xz"
FUSE3_ORIG_SHA256 = "96115b2a8ff34bd1e0c7b00c5dfd8297571d7e165042b94498c9a26356a9a70a"
DVS_OPTIONS = {
    "dvs": "uring=auto,enable_uring",
    "dvs-dev": "uring=off",
    "dvs-nopt": "nopassthrough,uring=auto,enable_uring",
    "dvs-cache": "uring=auto,enable_uring,timeout=86400",
}


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


def build_passthrough_hp() -> Path | None:
    """passthrough_hp from Debian's fuse3 3.14 source; None (with the reason) when unreachable."""
    import hashlib
    import urllib.request

    target = cache_dir() / "passthrough_hp-3.14"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "fuse3.tar.xz"
        try:
            with urllib.request.urlopen(FUSE3_ORIG, timeout=60) as response:
                tarball.write_bytes(response.read())
        except OSError as exc:
            print(f"bench_fs: libfuse-hp skipped: cannot fetch {FUSE3_ORIG}: {exc}")
            return None
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != FUSE3_ORIG_SHA256:
            print(f"bench_fs: libfuse-hp skipped: {FUSE3_ORIG} has SHA-256 {digest}")
            return None
        example = "fuse-3.14.0/example/"
        with tarfile.open(tarball) as tar:
            for name in ("passthrough_hp.cc", "passthrough_helpers.h", "cxxopts.hpp"):
                data = tar.extractfile(example + name)
                assert data is not None
                (Path(tmp) / name).write_bytes(data.read())
        flags = sh("pkg-config", "--cflags", "--libs", "fuse3").split()
        sh(
            "g++",
            "-O2",
            "-std=c++17",
            "-o",
            str(target),
            str(Path(tmp) / "passthrough_hp.cc"),
            *flags,
        )
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
    """native: the directory itself; every FUSE configuration serves ``backing`` (same
    files, same ext4) at its own mount point, all mounted at once so workloads can
    alternate between configurations second by second."""

    def __init__(
        self,
        work: Path,
        fsbench: Path,
        pyfuse3: Path | None,
        ll: Path | None,
        hp: Path | None = None,
    ):
        self.work = work
        self.native = work / "native"
        self.backing = work / "backing"
        self.fsbench = fsbench
        self.pyfuse3 = pyfuse3
        self.ll = ll
        self.hp = hp
        self.announced: set[str] = set()

    def prepare(self, big_mib: int, configs: list[str]) -> None:
        for root in (self.native, self.backing):
            (root / "files").mkdir(parents=True, exist_ok=True)
            (root / "scratch").mkdir(exist_ok=True)
            for name in configs:
                (root / "scratch" / TAGS[name]).mkdir(exist_ok=True)
            if len(os.listdir(root / "files")) != FILES:
                sh(str(self.fsbench), "mkfiles", str(root / "files"), str(FILES))
            big = root / "big"
            if not big.exists() or big.stat().st_size != big_mib << 20:
                sh("dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={big_mib}", "status=none")

    @contextlib.contextmanager
    def mounted(self, name: str) -> Iterator[Path]:
        if name == "native":
            yield self.native
            return
        mnt = self.work / f"m{TAGS[name]}"
        mnt.mkdir(exist_ok=True)
        if name in DVS_OPTIONS:
            opts = MountOptions.parse(DVS_OPTIONS[name])
            with CntrFs(self.backing, opts) as fs:
                fs.mount(mnt)
                transport = fs.negotiated.transport if fs.negotiated else "?"
                if name not in self.announced:
                    self.announced.add(name)
                    print(f"  {name}: -o {DVS_OPTIONS[name]}, transport {transport}", flush=True)
                yield mnt
        elif name == "pyfuse3":
            assert self.pyfuse3 is not None
            with external_mount(
                [sys.executable, str(self.pyfuse3), str(self.backing), str(mnt)], mnt
            ) as root:
                yield root
        elif name == "libfuse-ll":
            assert self.ll is not None
            with external_mount(
                [str(self.ll), "-f", "-o", f"source={self.backing}", str(mnt)], mnt
            ) as root:
                yield root
        elif name == "libfuse-hp":
            assert self.hp is not None
            with external_mount(
                [str(self.hp), "--foreground", str(self.backing), str(mnt)], mnt
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


def dbench(base: Path, seconds: int) -> float:
    d = base / "dbench"
    d.mkdir(exist_ok=True)
    out = sh("dbench", "-D", str(d), "-t", str(seconds), "-c", "/usr/share/dbench/client.txt", "2")
    shutil.rmtree(d, ignore_errors=True)
    match = re.search(r"Throughput ([\d.]+) MB/sec", out)
    return float(match.group(1)) if match else float("nan")


def fs_mark(base: Path, files: int) -> float:
    d = base / "fm"  # fs_mark wants paths under 40 bytes
    d.mkdir(exist_ok=True)
    # fs_mark writes fs_log.txt into its working directory
    out = sh(
        "fs_mark", "-d", str(d), "-n", str(files), "-s", "4096", "-L", "1", "-S", "0", cwd=d.parent
    )
    shutil.rmtree(d, ignore_errors=True)
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    return float(rows[-1][3]) if rows else float("nan")


def postmark(base: Path, files: int, transactions: int) -> float:
    d = base / "pm"
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


def drop_dentries() -> None:
    """Forget cached dentries and inodes everywhere (page cache stays): equal cold starts."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2")


def steady_workloads(
    setup: Setup, quick: bool, big_mib: int
) -> list[tuple[str, Callable[[Path, str], float]]]:
    rt = 2 if quick else 3

    def seq_write(root: Path, name: str) -> float:
        target = f"scratch/{name}/written"
        value = fio(root, "write", "1M", rt, 256, target) / 1e6
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / target)
        return value

    return [
        ("seq_read", lambda root, name: fio(root, "read", "1M", rt, big_mib, "big") / 1e6),
        ("rand_read", lambda root, name: fio(root, "randread", "4k", rt, big_mib, "big")),
        ("seq_write", seq_write),
        (
            "stat_warm",
            lambda root, name: (
                max(fsbench(setup, "stat", str(root / "files"), str(FILES), "2")) / 1e3
            ),
        ),
        (
            "create",
            lambda root, name: (
                fsbench(setup, "create", str(root / "scratch" / name), str(FILES), "4096")[0] / 1e3
            ),
        ),
        (
            "readdir_warm",
            lambda root, name: max(fsbench(setup, "readdir", str(root / "files"), "2")),
        ),
        ("dbench", lambda root, name: dbench(root / "scratch" / name, 5 if quick else 10)),
        ("fs_mark", lambda root, name: fs_mark(root / "scratch" / name, 2000 if quick else 5000)),
        (
            "postmark",
            lambda root, name: postmark(
                root / "scratch" / name, 500 if quick else 1000, 5000 if quick else 20000
            ),
        ),
    ]


def run_steady(
    setup: Setup, configs: list[str], reps: int, quick: bool, big_mib: int, only: set[str]
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    with contextlib.ExitStack() as stack:
        roots = {c: stack.enter_context(setup.mounted(c)) for c in configs}
        for root in roots.values():
            sh("dd", f"if={root / 'big'}", "of=/dev/null", "bs=1M", "status=none")
        for key, work in steady_workloads(setup, quick, big_mib):
            if key not in only:
                continue
            for rep in range(reps):
                order = configs if rep % 2 == 0 else configs[::-1]  # cancels linear drift
                for name in order:
                    out[name].setdefault(key, []).append(work(roots[name], TAGS[name]))
            print(f"  {key}: done (load {os.getloadavg()[0]:.1f})", flush=True)
    return out


def run_cold(setup: Setup, configs: list[str], reps: int) -> dict[str, dict[str, list[float]]]:
    """First stat/readdir pass on a fresh mount, after dropping dentries and inodes."""
    out: dict[str, dict[str, list[float]]] = {
        c: {"stat_cold": [], "readdir_cold": []} for c in configs
    }
    for rep in range(reps):
        for name in configs if rep % 2 == 0 else configs[::-1]:
            with setup.mounted(name) as root:
                drop_dentries()
                out[name]["stat_cold"].append(
                    fsbench(setup, "stat", str(root / "files"), str(FILES), "1")[0] / 1e3
                )
                drop_dentries()
                out[name]["readdir_cold"].append(
                    fsbench(setup, "readdir", str(root / "files"), "1")[0]
                )
    print("  cold metadata: done", flush=True)
    return out


# ---- report --------------------------------------------------------------------------------


def fmt(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def report(results: dict[str, dict[str, list[float]]], configs: list[str]) -> str:
    med = {c: {k: statistics.median(v) for k, v in results[c].items()} for c in configs}

    def paired(a: str, b: str, key: str) -> float | None:
        """Median over repetitions of the ratio of two runs made back to back."""
        if a not in results or b not in results:
            return None
        pairs = list(zip(results[a][key], results[b][key], strict=True))
        return statistics.median(x / y for x, y in pairs if y)

    ratios = ["dvs/native", "dvs-dev/native", "dvs/pyfuse3", "dvs/libfuse-hp"]
    lines = ["| workload | unit | " + " | ".join(configs + ratios) + " |"]
    lines.append("|" + "---|" * (len(configs) + len(ratios) + 2))
    for key, label, unit in WORKLOADS:
        if not all(key in med[c] for c in configs):
            continue
        row = [label, unit] + [fmt(med[c][key]) for c in configs]
        for column in ratios:
            a, b = column.split("/")
            both = key in results.get(a, {}) and key in results.get(b, {})
            r = paired(a, b, key) if both else None
            row.append("" if r is None else f"{r:.0f}x" if r >= 10 else f"{r:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for key, goal in [("seq_read", 0.95), ("rand_read", 0.9), ("stat_warm", 0.7), ("create", 0.3)]:
        ratio = paired("dvs", "native", key) if key in results.get("dvs", {}) else None
        if ratio is not None:
            verdict = "met" if ratio >= goal else "MISSED"
            lines.append(f"- target {key} >= {goal}x native: {ratio:.2f}x ({verdict})")
    if "pyfuse3" in med and "dvs" in med:
        slower = [
            k
            for k, _, _ in WORKLOADS
            if k in results["dvs"] and (paired("dvs", "pyfuse3", k) or 0) <= 1
        ]
        lines.append(
            "- faster than pyfuse3 on every row: "
            + ("yes" if not slower else f"NO ({', '.join(slower)})")
        )
    if "libfuse-hp" in med and "dvs" in med:
        behind = [
            k
            for k, _, _ in WORKLOADS
            if k in results["dvs"]
            and k in results["libfuse-hp"]
            and (paired("dvs", "libfuse-hp", k) or 0) < 1
        ]
        lines.append(
            "- at least as fast as libfuse's passthrough_hp on every row: "
            + ("yes" if not behind else f"no ({', '.join(behind)})")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller files")
    parser.add_argument(
        "--configs", default="native,dvs,dvs-dev,dvs-nopt,pyfuse3,libfuse-ll,libfuse-hp"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(k for k, _, _ in WORKLOADS),
        help="subset of: " + ", ".join(k for k, _, _ in WORKLOADS),
    )
    parser.add_argument("--work", default="/var/tmp/dvsfs", help="ext4 scratch directory")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fs: needs root (FUSE mounts)", file=sys.stderr)
        return 2
    fsbench_bin = build_fsbench()
    pyfuse3 = pyfuse3_example()
    configs = [c for c in args.configs.split(",") if c]
    ll = build_passthrough_ll() if "libfuse-ll" in configs else None
    hp = build_passthrough_hp() if "libfuse-hp" in configs else None
    if "pyfuse3" in configs and pyfuse3 is None:
        print("bench_fs: pyfuse3 not installed (pip install '.[baseline]'); skipping it")
        configs.remove("pyfuse3")
    if "libfuse-ll" in configs and ll is None:
        configs.remove("libfuse-ll")
    if "libfuse-hp" in configs and hp is None:
        configs.remove("libfuse-hp")
    big_mib = 256 if args.quick else 512
    work = Path(args.work)
    setup = Setup(work, fsbench_bin, pyfuse3, ll, hp)
    setup.prepare(big_mib, configs)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}; load {os.getloadavg()[0]:.1f}; work dir {work} "
        f"({sh('findmnt', '-n', '-o', 'FSTYPE', '-T', str(work)).strip()})"
    )
    print("engines: fio psync iodepth=1, invalidate=0 (page cache warm); fsbench.c loops")
    start = time.monotonic()
    only = set(args.workloads.split(","))
    results = run_steady(setup, configs, args.reps, args.quick, big_mib, only)
    if only & {"stat_cold", "readdir_cold"}:
        for name, cold in run_cold(setup, configs, args.reps).items():
            results[name].update({k: v for k, v in cold.items() if k in only})
    print(f"total {time.monotonic() - start:.0f} s")
    print()
    print(report(results, configs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
