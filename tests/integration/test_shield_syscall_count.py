"""The engines' syscall counters are honest: an outside count by the kernel's own
tracepoint (``perf stat -e raw_syscalls:sys_enter``, all threads of the process) agrees
with what the engine reports. Two runs that differ only in the number of batches are
compared, so interpreter start-up and engine set-up cancel out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(180)]

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from dvs.lowlevel import uring
    kind, batches, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fd = os.open(path, os.O_RDWR)
    buf = uring.Buffer(32 * 4096)
    engine = uring.Engine(kind, files=[fd], buffers=[buf], entries=32)
    ios = uring.IoArray(32)
    done = uring.DoneArray(32)
    a = ios.np
    a["file"] = 0; a["len"] = 4096; a["buf"] = 0; a["opcode"] = uring.OP_READ
    a["addr"] = buf.addr + np.arange(32, dtype=np.uint64) * 4096
    offsets = (np.random.default_rng(3).integers(0, 256, (batches, 32)) * 4096).astype(np.uint64)
    before = engine.stats()
    for b in range(batches):
        a["offset"] = offsets[b]
        sent = engine.submit(ios, 0, 32)
        got = 0
        while got < 32:
            got += engine.reap(done, min_wait=32 - got)
    after = engine.stats()
    engine.close()
    print(json.dumps({"syscalls": after.syscalls - before.syscalls,
                      "ops": after.completed - before.completed}))
    """
)


def _run(kind: str, batches: int, data: Path) -> tuple[int, int, int]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [
            "perf",
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter",
            "--",
            sys.executable,
            "-c",
            CHILD,
            kind,
            str(batches),
            str(data),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    inside = json.loads(out.stdout.strip().splitlines()[-1])
    line = next(x for x in out.stderr.splitlines() if "raw_syscalls:sys_enter" in x)
    outside = int(line.split(",")[0])
    return outside, inside["syscalls"], inside["ops"]


@pytest.mark.skipif(shutil.which("perf") is None, reason="needs perf (linux-perf)")
@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_the_engine_counts_what_the_kernel_counts(kind: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(os.urandom(256 * 4096))
    small = _run(kind, 50, data)
    large = _run(kind, 250, data)
    outside = large[0] - small[0]
    inside = large[1] - small[1]
    ops = large[2] - small[2]
    assert ops == 200 * 32
    # the interpreter may make a handful of syscalls of its own (allocation, GC)
    assert abs(outside - inside) <= max(8, inside * 0.03), (kind, outside, inside)
    if kind == "io_uring":
        assert inside / ops <= 0.05, "batched page-cache reads: one enter per 32 ops"
    else:
        assert inside / ops >= 1.0
