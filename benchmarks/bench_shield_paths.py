"""The sealed volume's speed paths, A/B in one run: 1 MiB sequential reads and writes
(buffered and O_DIRECT) with and without the sequential readahead and the AES-GCM helper
thread, every variant in each repetition, ratios paired per repetition against the plain
path (one thread, no readahead: what the volume did before both existed).

    python3 benchmarks/bench_shield_paths.py [--gib 0.5] [--reps 8]

MB/s is wall-clock; MB per CPU-second counts every thread of the process (helper and
kernel I/O workers included), the unit in which a path's cost per byte shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dvs.shield import bench as kb  # noqa: E402
from dvs.shield.volume import Volume  # noqa: E402

KEY = bytes(range(32))
FILE_BYTES = 256 << 20
SLOTS = {"read_slots": 256, "write_slots": 1024}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"crypto_threads": 1, "readahead": False},
    "readahead": {"crypto_threads": 1, "readahead": True},
    "helper": {"crypto_threads": 2, "readahead": False},
    "readahead+helper": {"crypto_threads": 2, "readahead": True},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=0.5, help="read per run (writes: half)")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    print(f"load average at start {os.getloadavg()[0]:.1f}, {os.cpu_count()} vCPU")
    res: dict[tuple[str, bool, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as t:
        for direct in (False, True):
            vol = Volume.create(
                Path(t) / f"v{int(direct)}", FILE_BYTES, key=KEY, direct=direct, **SLOTS
            )
            kb.volume_sequential(vol, FILE_BYTES, write=True)
            vol.close()
        for _rep in range(args.reps):
            for direct in (False, True):
                for mode in ("seqread", "seqwrite"):
                    for name, kw in VARIANTS.items():
                        if mode == "seqwrite" and kw["readahead"]:
                            continue  # readahead only concerns reads
                        total = int(args.gib * (1 << 30)) // (2 if mode == "seqwrite" else 1)
                        with Volume.open(
                            Path(t) / f"v{int(direct)}", key=KEY, direct=direct, **SLOTS, **kw
                        ) as vol:
                            run = kb.volume_sequential(vol, total, write=mode == "seqwrite")
                        res.setdefault((mode, direct, name), []).append(
                            (run.mb_per_s, run.mb_per_cpu_s)
                        )
    print(f"load average at end {os.getloadavg()[0]:.1f}; medians of {args.reps} repetitions")
    print("| workload | O_DIRECT | path | MB/s | MB per CPU-s | wall vs plain | CPU vs plain |")
    print("|---|---|---|---|---|---|---|")
    for (mode, direct, name), runs in res.items():
        base = res[(mode, direct, "plain")]
        wall = statistics.median(a[0] / b[0] for a, b in zip(runs, base, strict=True))
        cpu = statistics.median(a[1] / b[1] for a, b in zip(runs, base, strict=True))
        print(
            f"| 1 MiB {mode} QD4 | {'yes' if direct else 'no'} | {name} | "
            f"{statistics.median(r[0] for r in runs):,.0f} | "
            f"{statistics.median(r[1] for r in runs):,.0f} | {wall:.2f}x | {cpu:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
