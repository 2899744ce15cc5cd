"""Engine policy for shielded I/O, and the enclave-exit cost model.

Which engine: ``dvs.probe`` sets up a ring and asks for its opcodes; if that works (and the
kernel has READ/WRITE/READ_FIXED/WRITE_FIXED/FSYNC), the shield uses an io_uring ring,
otherwise -- ``kernel.io_uring_disabled``, or a seccomp profile that denies io_uring_setup
as container runtimes' default profiles do -- it uses the pread/pwrite thread pool. Both
move the same requests and count the syscalls their I/O threads make.

Why syscalls: on SGX every syscall is an enclave exit (EEXIT + EENTER), reported at
8,000-17,000 cycles (HotCalls, ISCA'17; Gramine's performance notes), against ~150 for a
plain syscall. There is no SGX here, so ``exit_cost_model`` only *models* what a run would
cost if each counted syscall were such an exit; it measures nothing about enclaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dvs.lowlevel.uring import Buffer, Engine, EngineKind
from dvs.probe import probe

DEFAULT_EXIT_CYCLES = (8_000, 12_000, 17_000)


def default_kind() -> EngineKind:
    """The engine this host gets, from ``dvs.probe().backends["shield engine"]``."""
    choice = probe().backends.get("shield engine", "")
    return "io_uring" if choice.startswith("io_uring") else "threads"


def open_engine(
    files: Sequence[int],
    *,
    kind: EngineKind | None = None,
    buffers: Sequence[Buffer] = (),
    entries: int = 64,
    sqpoll: bool = False,
    single_issuer: bool = True,
) -> Engine:
    """An engine of ``kind`` (default: the probe's choice) over ``files``."""
    return Engine(
        kind or default_kind(),
        files=files,
        buffers=buffers,
        entries=entries,
        sqpoll=sqpoll,
        single_issuer=single_issuer,
    )


@dataclass(frozen=True)
class ExitModel:
    """A modelled run: measured time plus ``syscalls`` enclave exits of ``exit_cycles``."""

    exit_cycles: int
    cpu_hz: float
    measured_s: float
    syscalls: int
    ops: int

    @property
    def modelled_s(self) -> float:
        return self.measured_s + self.syscalls * self.exit_cycles / self.cpu_hz

    @property
    def modelled_ops_per_s(self) -> float:
        return self.ops / self.modelled_s if self.modelled_s else 0.0


def exit_cost_model(
    measured_s: float,
    syscalls: int,
    ops: int,
    *,
    cpu_hz: float,
    exit_cycles: Sequence[int] = DEFAULT_EXIT_CYCLES,
) -> list[ExitModel]:
    """MODEL, not a measurement: the run's time if every syscall cost an enclave exit."""
    return [ExitModel(c, cpu_hz, measured_s, syscalls, ops) for c in exit_cycles]


def cpu_hz() -> float:
    """The nominal TSC/CPU frequency from /proc/cpuinfo (for the model only)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "@" in line:
                    ghz = line.rsplit("@", 1)[1].strip().removesuffix("GHz")
                    return float(ghz) * 1e9
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return 2.0e9
