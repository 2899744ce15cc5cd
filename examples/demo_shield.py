"""Demo section: shielded storage. An io_uring engine that batches I/O (syscalls per
operation, and what that would mean if each syscall were an enclave exit -- a model, there
is no SGX here), a sealed volume that survives a crash and refuses tampering, and SQLite on
top of it through Python's own sqlite3 module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dvs.errors import IntegrityError
from dvs.lowlevel import uring
from dvs.shield import bench
from dvs.shield.engine import cpu_hz, default_kind, exit_cost_model
from dvs.shield.volume import Volume


def run() -> None:
    kind = default_kind()
    print(f"engine chosen by the probe: {kind}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)

        # 1. the engine: 4 KiB random reads at queue depth 1 and 32, syscalls counted
        data = tmpdir / "data"
        bench.prepare_file(data, 32 << 20)
        fd = os.open(data, os.O_RDONLY)
        buf = uring.Buffer(32 * 4096)
        with uring.Engine(kind, files=[fd], buffers=[buf], entries=32) as engine:
            for qd in (1, 32):
                r = bench.ring_random(engine, buf, 8192, 20_000, qd, write=False)
                model = exit_cost_model(r.seconds, r.syscalls, r.ops, cpu_hz=cpu_hz())[1]
                print(
                    f"  QD{qd:<2} {r.ops_per_s:10,.0f} reads/s  {r.syscalls_per_op:.3f} "
                    f"syscalls/op  (MODEL at 12,000-cycle exits: "
                    f"{model.modelled_ops_per_s:,.0f} reads/s)"
                )
        os.close(fd)
        buf.close()

        # 2. a sealed volume: write, flush, "crash", reopen, tamper
        path = tmpdir / "sealed.vol"
        key = os.urandom(32)
        with Volume.create(path, 16 << 20, key=key) as vol:
            vol.write(0, b"flushed state")
            anchor = vol.flush()
            vol.write(0, b"never flushed")
            vol.close(discard=True)  # as if the process died before the next flush
        with Volume.open(path, key=key, anchor=anchor) as vol:
            print("  after the crash:", vol.read(0, 13), f"(epoch {vol.epoch})")
            page = vol.locate(0)
        assert page is not None
        with path.open("r+b") as f:
            f.seek(page * 4096 + 1)
            f.write(b"\x00")
        with Volume.open(path, key=key) as vol:
            try:
                vol.read(0, 13)
            except IntegrityError as exc:
                print("  tampered block refused:", exc)

    # 3. SQLite on sealed volumes
    from shield_sqlite import main as sqlite_demo

    with tempfile.TemporaryDirectory() as tmp:
        sqlite_demo(Path(tmp))
