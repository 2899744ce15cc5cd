"""Native fuzzers for the C core: libFuzzer harnesses from csrc/fuzz/, built and run.

A harness is one C file with ``LLVMFuzzerTestOneInput``; it is compiled with clang together
with the C sources it exercises, instrumented for coverage (``-fsanitize=fuzzer``) and
checked by AddressSanitizer and UndefinedBehaviorSanitizer (any report aborts the run).
Builds are cached artefacts keyed by a hash of every source that goes in, so editing the
walker rebuilds the fuzzer. ``run_libfuzzer`` runs one for a time budget and returns its
execution count, coverage and any crash input it wrote. Needs ``clang`` and the compiler-rt
runtime (Debian ``libclang-rt-14-dev``); ``libfuzzer_missing()`` says what is absent.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dvs.testing import cache

CSRC = Path(__file__).resolve().parents[2] / "csrc"

HARNESS_SOURCES: dict[str, tuple[str, ...]] = {
    "fuzz_virtqueue": (
        "fuzz/fuzz_virtqueue.c",
        "virtio/queue.c",
        "virtio/blk.c",
        "virtio/blk_file.c",
        "virtio/console.c",
        "guestmem/guestmem.c",
        "sys/sys.c",
    ),
}


@dataclass(frozen=True)
class FuzzRun:
    executions: int
    seconds: float
    coverage: int
    """libFuzzer's ``cov:`` (instrumented edges reached)."""
    corpus_units: int
    crash: Path | None
    """The input that crashed it (``crash-*``/``leak-*``/``timeout-*``), if any."""
    log_tail: str


def libfuzzer_missing() -> str | None:
    """Why a libFuzzer harness cannot be built here, or None."""
    if shutil.which("clang") is None:
        return "clang is not installed"
    resource = subprocess.run(
        ["clang", "-print-resource-dir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not list(Path(resource).glob("lib/linux/libclang_rt.fuzzer-x86_64.a")):
        return "the compiler-rt libFuzzer runtime is missing (apt install libclang-rt-14-dev)"
    return None


def build_libfuzzer(harness: str) -> Path:
    """The built fuzzer binary for ``harness`` (cached)."""
    sources = [CSRC / s for s in HARNESS_SOURCES[harness]]
    digest = hashlib.sha256()
    for path in [*sources, *sorted(CSRC.rglob("*.h"))]:
        digest.update(path.read_bytes())

    def build(out: Path) -> None:
        subprocess.run(
            [
                "clang", "-g", "-O1", "-std=gnu11",
                "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
                f"-I{CSRC}", *map(str, sources), "-o", str(out / harness),
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip

    return cache.artefact(f"{harness}-{digest.hexdigest()[:12]}", build) / harness


def run_libfuzzer(
    binary: Path,
    corpus: Path,
    seconds: int,
    *,
    artifacts: Path,
    extra: Sequence[str] = (),
) -> FuzzRun:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            str(binary),
            f"-max_total_time={seconds}",
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}/",
            *extra,
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    log = proc.stderr

    def stat(name: str) -> int:
        m = re.search(rf"stat::{name}:\s+(\d+)", log)
        return int(m.group(1)) if m else 0

    coverage = [int(c) for c in re.findall(r"\bcov: (\d+)", log)]
    crashes = sorted(artifacts.glob("crash-*")) + sorted(artifacts.glob("timeout-*"))
    crashes += sorted(artifacts.glob("leak-*")) + sorted(artifacts.glob("oom-*"))
    return FuzzRun(
        executions=stat("number_of_executed_units"),
        seconds=float(seconds),
        coverage=max(coverage, default=0),
        corpus_units=len(list(corpus.iterdir())),
        crash=crashes[0] if crashes else (None if proc.returncode == 0 else artifacts),
        log_tail="\n".join(log.splitlines()[-25:]),
    )
