"""Container attach: how fast it attaches, and what file I/O costs through the attached view.

1. Attach latency to first output, p50 and p95 over N interleaved runs, against the
   kernel-only baseline ``nsenter -t PID -a`` (util-linux: setns into every namespace and
   exec, nothing else -- no mount view, no cgroups, no ids/capabilities/seccomp):
   - ``nsenter -t PID -a true`` (time to exit) and ``nsenter -t PID -a echo x`` (first byte);
   - ``dvs container attach ID -- echo x`` and ``dvs container exec ID -- echo x`` (the CLI:
     includes starting the Python interpreter and resolving the name);
   - the Python API, ``Session(ID, ["echo", "x"])`` in a running program (name resolution
     included) and ``Session(pid, ...)``.
2. File I/O through the attached view against the same files natively, with fio (a host
   tool, so the same binary runs in both places), psync engine, page cache warm
   (``invalidate=0``): 1 MiB sequential read, 4 KiB random read at QD1, 1 MiB sequential
   write (no fsync). Inside: the container's files at /var/lib/cntr (runc container) and
   the tools side (host /var/tmp) through the *id-mapped* view of a user-namespaced
   container. Natively: the same files by their host paths. Also a metadata loop
   (create + 4 KiB write + stat + unlink, Python) in both places.
The ratio is attached / native from the same run; the mount-API view is the kernel's own
VFS path, so about 1.0 is the expectation.

Run as root: ``python3 benchmarks/bench_container.py [--runs 30] [--io-seconds 0.5] [--reps 15]``
(many short back-to-back pairs: on a shared 2-vCPU machine the median of per-pair ratios
is far steadier than long runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dvs.container import PIPE, Session  # noqa: E402
from dvs.testing.containers import OciContainer, run_container  # noqa: E402


def first_output_latency(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    assert proc.returncode == 0, argv
    return elapsed


def exit_latency(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def api_latency(target: str | int) -> float:
    start = time.perf_counter()
    with Session(target, ["echo", "x"], stdout=PIPE) as session:
        assert session.stdout is not None
        session.stdout.read(1)
        elapsed = time.perf_counter() - start
        session.communicate(timeout=30)
    assert session.returncode == 0
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_latency(box: OciContainer, runs: int) -> None:
    py = [sys.executable, "-m", "dvs", "container"]
    cases: dict[str, Callable[[], float]] = {
        "nsenter -a true (exit)": lambda: exit_latency(
            ["nsenter", "-t", str(box.pid), "-a", "true"]
        ),
        "nsenter -a echo x": lambda: first_output_latency(
            ["nsenter", "-t", str(box.pid), "-a", "echo", "x"]
        ),
        "dvs attach CLI (name)": lambda: first_output_latency(
            [*py, "attach", box.id, "--", "echo", "x"]
        ),
        "dvs exec CLI (name)": lambda: first_output_latency(
            [*py, "exec", box.id, "--", "echo", "x"]
        ),
        "dvs attach API (name)": lambda: api_latency(box.id),
        "dvs attach API (pid)": lambda: api_latency(box.pid),
        "python3 -c pass (interpreter start)": lambda: exit_latency([sys.executable, "-c", "pass"]),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():  # warm-up
        case()
    order = list(cases)
    shuffle = random.Random(7).shuffle
    for _ in range(runs):
        shuffle(order)  # interleaved, in a new order each round: noise hits every case alike
        for name in order:
            samples[name].append(cases[name]())
    base = statistics.median(samples["nsenter -a echo x"])
    print(f"\nattach latency to first output, {runs} interleaved runs (ms)")
    print(f"{'case':38} {'p50':>8} {'p95':>8} {'p50/nsenter':>12}")
    for name, values in samples.items():
        p50, p95 = statistics.median(values) * 1e3, percentile(values, 0.95) * 1e3
        print(f"{name:38} {p50:8.2f} {p95:8.2f} {p50 / 1e3 / base:11.1f}x")


# ---- file I/O ---------------------------------------------------------------------------------

FIO_JOBS = {
    "seq read 1M": ["--rw=read", "--bs=1M"],
    "rand read 4k QD1": ["--rw=randread", "--bs=4k"],
    "seq write 1M": ["--rw=write", "--bs=1M"],
}

META_SCRIPT = r"""
import os, sys, time
d = sys.argv[1]; n = int(sys.argv[2]); data = b"x" * 4096
t = time.perf_counter()
for i in range(n):
    p = f"{d}/f{i}"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, data); os.close(fd)
    os.stat(p)
for i in range(n):
    os.unlink(f"{d}/f{i}")
print(n / (time.perf_counter() - t))
"""


def fio_argv(job: str, path: str, seconds: float, size: str) -> list[str]:
    return [
        shutil.which("fio") or "fio",
        "--name=dvs",
        f"--filename={path}",
        f"--size={size}",
        "--ioengine=psync",
        "--invalidate=0",
        "--time_based",
        f"--runtime={seconds}",
        "--output-format=json",
        *FIO_JOBS[job],
    ]


def fio_result(output: bytes, job: str) -> float:
    """Bytes/s for the 1 MiB jobs, IOPS for the 4 KiB one."""
    data = json.loads(output[output.index(b"{") :])
    side = data["jobs"][0]["write" if "write" in job else "read"]
    return float(side["bw_bytes"] if "1M" in job else side["iops"])


def run_native(argv: list[str]) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def run_attached(box: OciContainer, argv: list[str]) -> bytes:
    with Session(box.id, argv, stdout=PIPE, stderr=PIPE) as session:
        out, err = session.communicate(timeout=600)
    if session.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} in the attached view: status {session.returncode} "
            f"(signal {session.signal}), warnings {session.warnings}: {err[-2000:]!r}"
        )
    return out


def paired(
    native: Callable[[], float], attached: Callable[[], float], reps: int
) -> tuple[float, float, list[float]]:
    """Run the two back to back ``reps`` times, alternating which goes first (load drifts on
    a shared machine); return both medians and the per-pair ratios attached/native."""
    natives, attacheds, ratios = [], [], []
    for i in range(reps):
        if i % 2:
            a, n = attached(), native()
        else:
            n, a = native(), attached()
        natives.append(n)
        attacheds.append(a)
        ratios.append(a / n)
    return statistics.median(natives), statistics.median(attacheds), ratios


def bench_io(
    label: str,
    box: OciContainer,
    inside_dir: str,
    native_dir: str,
    seconds: float,
    reps: int,
) -> None:
    size = "512M"
    run_native(
        ["dd", "if=/dev/urandom", f"of={native_dir}/big", "bs=1M", "count=512", "status=none"]
    )
    run_native(["cat", f"{native_dir}/big"])  # warm the page cache
    print(f"\n{label}")
    print(f"fio psync, page cache warm, {seconds:g} s per run; {reps} back-to-back pairs")
    print(f"{'job':22} {'native':>12} {'attached':>12} {'ratio (median of pairs)':>24}")

    def show(job: str, unit: str, scale: float, n: float, a: float, ratios: list[float]) -> None:
        spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(f"{job:22} {n / scale:7.0f} {unit:4} {a / scale:7.0f} {unit:4} {spread:>24}")

    for job in FIO_JOBS:
        name = "wfile" if "write" in job else "big"
        n, a, ratios = paired(
            lambda job=job, name=name: fio_result(
                run_native(fio_argv(job, f"{native_dir}/{name}", seconds, size)), job
            ),
            lambda job=job, name=name: fio_result(
                run_attached(box, fio_argv(job, f"{inside_dir}/{name}", seconds, size)), job
            ),
            reps,
        )
        unit, scale = ("MB/s", 1e6) if "1M" in job else ("IOPS", 1.0)
        show(job, unit, scale, n, a, ratios)
    n, a, ratios = paired(
        lambda: float(run_native([sys.executable, "-c", META_SCRIPT, native_dir, "3000"])),
        lambda: float(run_attached(box, [sys.executable, "-c", META_SCRIPT, inside_dir, "3000"])),
        reps,
    )
    show("create+write+stat+rm", "op/s", 1.0, n, a, ratios)
    for name in ("big", "wfile"):
        Path(native_dir, name).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--io-seconds", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--skip-io", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )
    with run_container("runc") as box:
        print(f"target: busybox container under runc, init pid {box.pid}")
        bench_latency(box, args.runs)
        if not args.skip_io:
            bench_io(
                "container side (/var/lib/cntr/tmp, plain runc container)",
                box,
                "/var/lib/cntr/tmp",
                str(box.rootfs / "tmp"),
                args.io_seconds,
                args.reps,
            )
    if not args.skip_io:
        with (
            run_container("runc", userns=True) as box,
            tempfile.TemporaryDirectory(dir="/var/tmp", prefix="dvs-bench-") as tools_dir,
        ):
            os.chmod(tools_dir, 0o777)
            bench_io(
                "tools side (host /var/tmp through the id-mapped view, userns container)",
                box,
                tools_dir,
                tools_dir,
                args.io_seconds,
                args.reps,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
