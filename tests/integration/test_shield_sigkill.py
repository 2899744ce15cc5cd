"""Crash consistency with real processes, real files and io_uring: a writer process is
SIGKILLed at random points while it writes and flushes a sealed volume; every time, the
volume opens to exactly the last acknowledged flush or the one in progress.

A fork server (a single-threaded Python with dvs imported) forks one writer per trial, so a
trial costs a fork, not an interpreter start. The writer is deterministic given its seed:
round r writes blocks chosen from (seed, r), flushes, and prints "ack r". The test replays
the same rounds in a model to know what each acknowledged state holds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dvs.lowlevel.shield import BLOCK
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(600)

KEY = bytes(range(50, 82))
CAPACITY = 2048
TRIALS = int(os.environ.get("DVS_SIGKILL_TRIALS", "300"))

ROUND = textwrap.dedent(
    """
    def round_writes(seed, r, capacity):
        import random
        rng = random.Random(seed * 1_000_003 + r)
        writes = []
        for _ in range(rng.randint(1, 24)):
            b = rng.randrange(capacity - 64)
            n = 64 if rng.random() < 0.05 else rng.randint(1, 4)
            writes.append((b, rng.randbytes(n * 4096), rng.random() < 0.5))
        return writes
    """
)

SERVER = ROUND + textwrap.dedent(
    """
    import os, sys
    from dvs.shield.volume import Volume
    path, key, capacity = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    for line in sys.stdin:
        seed, first = (int(x) for x in line.split())
        pid = os.fork()
        if pid == 0:
            try:
                vol = Volume.open(path, key=key, engine_kind="io_uring")
                for r in range(first, first + 100_000):
                    for b, data, submit in round_writes(seed, r, capacity):
                        vol.write_blocks(b, data, submit=submit)
                    vol.flush()
                    os.write(1, f"ack {r}\\n".encode())
            finally:
                os._exit(3)
        os.write(1, f"pid {pid}\\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, f"exit {status}\\n".encode())
    """
)

namespace: dict[str, object] = {}
exec(ROUND, namespace)
round_writes = namespace["round_writes"]


def _apply(model: dict[int, bytes], seed: int, r: int) -> dict[int, bytes]:
    out = dict(model)
    for b, data, _submit in round_writes(seed, r, CAPACITY):  # type: ignore[operator]
        for i in range(len(data) // BLOCK):
            out[b + i] = data[i * BLOCK : (i + 1) * BLOCK]
    return out


def _open_retrying(path: Path) -> Volume:
    # the dead writer's ring is torn down asynchronously; its file lock goes with it
    deadline = time.monotonic() + 10
    while True:
        try:
            return Volume.open(path, key=KEY, readonly=True, engine_kind="io_uring")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _state(vol: Volume, blocks: set[int]) -> dict[int, bytes]:
    zero = bytes(BLOCK)
    return {b: d for b in sorted(blocks) if (d := vol.read_blocks(b, 1)) != zero}


def test_sigkill_at_random_points_leaves_a_flush_boundary(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    Volume.create(path, CAPACITY * BLOCK, key=KEY).close()
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        OPENBLAS_NUM_THREADS="1",  # the server must stay single-threaded to fork safely
        OMP_NUM_THREADS="1",
    )
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(path), KEY.hex(), str(CAPACITY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    rng = random.Random(7)
    model: dict[int, bytes] = {}
    next_round = 0
    outcomes = {"acked": 0, "in flight": 0}
    try:
        for trial in range(TRIALS):
            seed = rng.getrandbits(32)
            server.stdin.write(f"{seed} {next_round}\n")
            server.stdin.flush()
            line = server.stdout.readline()
            assert line.startswith("pid "), line
            pid = int(line.split()[1])
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
            acked = next_round - 1
            while not (line := server.stdout.readline()).startswith("exit"):
                assert line.startswith("ack "), line
                acked = int(line.split()[1])
            assert os.WIFSIGNALED(int(line.split()[1])), f"the writer died on its own: {line}"
            # what the last acknowledged flush holds, and what the next one would
            last = model
            for r in range(next_round, acked + 1):
                last = _apply(last, seed, r)
            upcoming = _apply(last, seed, acked + 1)
            with _open_retrying(path) as vol:
                found = _state(vol, set(upcoming))
                vol.verify()
            if found == last:
                outcomes["acked"] += 1
            else:
                assert found == upcoming, f"trial {trial}: not a flush boundary"
                outcomes["in flight"] += 1
            model = found
            next_round = acked + 2
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert outcomes["acked"] > 0
    print(f"{TRIALS} SIGKILLs: {outcomes}")
