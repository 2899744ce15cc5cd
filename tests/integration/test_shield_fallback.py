"""The fallback engine for real: a child process whose seccomp filter denies
io_uring_setup (as a container runtime's profile can) probes, gets the pread/pwrite thread
pool from ``dvs.probe``, and still moves and verifies data through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent(
    """
    import errno, json, os, sys
    import numpy as np
    from dvs.lowlevel import sys as llsys, uring
    llsys.seccomp_deny([llsys.NR_IO_URING_SETUP], errno.EPERM)
    from dvs import probe
    from dvs.shield.engine import default_kind, open_engine
    report = probe.probe()
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        uring.Engine("io_uring", files=[fd]).close()
        ring_error = 0
    except OSError as exc:
        ring_error = exc.errno
    buf = uring.Buffer(64 * 4096)
    payload = np.random.default_rng(5).integers(0, 256, buf.size, dtype=np.uint8)
    buf.np[:] = payload
    with open_engine([fd], buffers=[buf], entries=16) as engine:
        ios = uring.IoArray(64)
        a = ios.np
        a["file"] = 0; a["len"] = 4096; a["buf"] = 0
        a["offset"] = np.arange(64, dtype=np.uint64)[::-1] * 4096
        a["addr"] = buf.addr + np.arange(64, dtype=np.uint64) * 4096
        a["opcode"] = uring.OP_WRITE
        engine.run(ios)
        buf.np[:] = 0
        a["opcode"] = uring.OP_READ
        done = engine.run(ios)
        stats = engine.stats()
        print(json.dumps({
            "backend": report.backends["shield engine"],
            "uring_available": report.io_uring.available,
            "ring_error": ring_error,
            "kind": engine.kind,
            "all_ok": bool((done.np["res"] == 4096).all()),
            "data_ok": bool(np.array_equal(buf.np, payload)),
            "syscalls": stats.syscalls,
            "completed": stats.completed,
        }))
    """
)


def test_a_seccomp_blocked_host_gets_the_thread_pool_and_it_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"\0" * (64 * 4096))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(data)],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ring_error"] == 1, "io_uring_setup must fail with EPERM in the child"
    assert not result["uring_available"]
    assert result["backend"].startswith("threads with pread/pwrite")
    assert result["kind"] == "threads"
    assert result["all_ok"] and result["data_ok"]
    assert result["completed"] == 128
    assert result["syscalls"] >= 128, "every pread/pwrite is counted"
    # the payload went through the thread pool to the real file, in reverse block order
    raw = data.read_bytes()
    first_block_written = raw[63 * 4096 :]
    assert first_block_written != b"\0" * 4096
