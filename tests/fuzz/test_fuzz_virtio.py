"""The virtqueue fuzzers run briefly in every test run (long runs: benchmarks/fuzz_virtio.py).

The atheris harness (tests/fuzz/fuzz_virtio.py) compares the C walker with the Python
reference on mutated guests; the native libFuzzer harness (csrc/fuzz/fuzz_virtqueue.c) runs
the walker and the blk/console devices under AddressSanitizer and UBSan. Both start from
well-formed guests made by the mock driver, so the mutations begin on real code paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dvs.testing.fuzzers import build_libfuzzer, libfuzzer_missing, run_libfuzzer

HARNESS = Path(__file__).with_name("fuzz_virtio.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def _seed_corpus(directory: Path) -> Path:
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import fuzz_virtio  # the harness module (imports atheris)
    finally:
        sys.path.pop(0)
    directory.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(fuzz_virtio.seed_inputs()):
        (directory / f"seed-{i}").write_bytes(seed)
    return directory


def test_seeds_are_guests_with_work_for_the_device(tmp_path: Path) -> None:
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import fuzz_virtio
    finally:
        sys.path.pop(0)
    for seed in fuzz_virtio.seed_inputs():
        case = fuzz_virtio.decode(seed)
        assert case is not None
        image, layout, max_segs = case
        fuzz_virtio.MEMORIES[0].write(0, image)
        observed = fuzz_virtio.observe(
            fuzz_virtio.VirtQueue, fuzz_virtio.MEMORIES[0], layout, max_segs
        )
        assert len([o for o in observed if isinstance(o, tuple) and isinstance(o[0], int)]) >= 4
        fuzz_virtio.test_one_input(seed)  # C and reference agree on it


def test_atheris_differential_harness_finds_no_difference(tmp_path: Path) -> None:
    corpus = _seed_corpus(tmp_path / "corpus")
    run = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=20000", "-print_final_stats=1",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stat::number_of_executed_units: 20000" in run.stderr


@pytest.mark.skipif(libfuzzer_missing() is not None, reason=str(libfuzzer_missing()))
def test_native_harness_runs_clean_under_sanitizers(tmp_path: Path) -> None:
    binary = build_libfuzzer("fuzz_virtqueue")
    corpus = _seed_corpus(tmp_path / "corpus")
    result = run_libfuzzer(binary, corpus, 15, artifacts=tmp_path / "artifacts")
    assert result.crash is None, result.log_tail
    assert result.executions > 1000 and result.coverage > 100, result.log_tail
