"""Fuzz the virtqueue walker for a time budget and report executions, coverage and crashes.

Two harnesses, each for ``--seconds`` (default 60):
  native   csrc/fuzz/fuzz_virtqueue.c under libFuzzer with ASan + UBSan: the walker and the
           blk/console devices on hostile guest memory (coverage of the C code itself);
  atheris  tests/fuzz/fuzz_virtio.py: the C walker against the Python reference on the same
           inputs (differential; coverage of the reference, which mirrors the walker).
Both start from well-formed guests made by the mock driver. Exit status 1 if either found a
crash or a difference; the input that did it is kept and its path printed.

    python3 benchmarks/fuzz_virtio.py --seconds 300 [--harness native|atheris|both]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fuzz"))

from dvs.testing.fuzzers import build_libfuzzer, libfuzzer_missing, run_libfuzzer  # noqa: E402


def _seed(corpus: Path) -> None:
    import fuzz_virtio

    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(fuzz_virtio.seed_inputs()):
        (corpus / f"seed-{i}").write_bytes(seed)


def native(seconds: int, work: Path) -> bool:
    missing = libfuzzer_missing()
    if missing:
        print(f"native: skipped: {missing}")
        return True
    binary = build_libfuzzer("fuzz_virtqueue")
    corpus = work / "native-corpus"
    _seed(corpus)
    r = run_libfuzzer(binary, corpus, seconds, artifacts=work / "native-artifacts")
    print(
        f"native  (libFuzzer+ASan+UBSan): {r.executions} executions in {seconds} s "
        f"({r.executions / seconds:,.0f}/s), coverage {r.coverage} edges, "
        f"corpus {r.corpus_units} inputs, crash: {r.crash or 'none'}"
    )
    if r.crash:
        print(r.log_tail)
    return r.crash is None


def atheris_run(seconds: int, work: Path) -> bool:
    corpus = work / "atheris-corpus"
    _seed(corpus)
    artifacts = work / "atheris-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fuzz" / "fuzz_virtio.py"),
         f"-max_total_time={seconds}", "-print_final_stats=1",
         f"-artifact_prefix={artifacts}/", str(corpus)],
        capture_output=True, text=True, timeout=seconds + 300, cwd=work,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    m = re.search(r"stat::number_of_executed_units:\s+(\d+)", proc.stderr)
    executions = int(m.group(1)) if m else 0
    cov = max((int(c) for c in re.findall(r"\bcov: (\d+)", proc.stderr)), default=0)
    crashes = sorted(artifacts.iterdir())
    ok = proc.returncode == 0 and not crashes
    print(
        f"atheris (C vs Python reference): {executions} executions in {elapsed:.0f} s "
        f"({executions / max(elapsed, 1):,.0f}/s), coverage {cov} (Python), "
        f"difference/crash: {crashes[0] if crashes else 'none'}"
    )
    if not ok:
        print("\n".join(proc.stderr.splitlines()[-30:]))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="budget per harness")
    parser.add_argument("--harness", choices=["native", "atheris", "both"], default="both")
    parser.add_argument("--keep", type=Path, help="keep corpora and artefacts in this directory")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, Linux {platform.release()}")
    with tempfile.TemporaryDirectory(prefix="dvs-fuzz-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ok = True
        if args.harness in ("native", "both"):
            ok &= native(args.seconds, work)
        if args.harness in ("atheris", "both"):
            ok &= atheris_run(args.seconds, work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
