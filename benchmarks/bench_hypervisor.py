"""Cost of acting inside a KVM hypervisor from outside: one injected syscall, and one MMIO
access trapped and answered by dvs.

What is measured (each with its baseline from the same run):

1. Injected syscalls into QEMU -enable-kvm running the minimal guest (``dvs.testing``):
   - native: getpid() in this process (a Python loop, so an upper bound of a syscall);
   - guardian-internal: the guardian injects getpid back to back (``Guardian.bench``): the
     pure ptrace cost (SETREGS, two syscall stops, GETREGS);
   - one request from Python (``KvmSession.inject``), held: + the control-socket round trip;
   - KVM_GET_REGS from Python (an injected ioctl with data copied out of the scratch page);
   - one request while the hypervisor runs: + stopping every thread and resuming them;
   - a full attach + detach (fork the guardian, seize, scratch mmap/munmap, restore).
2. MMIO round trips with the tiny VMM (csrc/testing/tiny_vmm.c): its real-mode loop makes one
   MMIO read exit per iteration. Baseline: the VMM answers the exit itself. Then the same
   loop with dvs attached but not trapping, with dvs trapping the window and answering from
   its C device loop (guardian at the KVM_RUN syscall exit -> socket -> dvs's bank -> socket
   -> kvm_run.mmio.data, -EINTR), and with the guardian answering from the bank it shares
   with dvs (no socket hop). The extra time per iteration is the cost of one trapped MMIO
   round trip.

Run as root: ``python3 benchmarks/bench_hypervisor.py [--seconds S] [--rounds R] [--json]``.
The machine is shared and kvm-pvm emulates guest kernel code: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvs.hypervisor import KvmSession
from dvs.lowlevel import kvm as llkvm
from dvs.testing.kvm_guest import MinimalGuest
from dvs.testing.tiny_vmm import WINDOW_GPA, TinyVmm


def per_call_us(action: Callable[[], object], count: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time per call, in microseconds."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(count):
            action()
        samples.append((time.perf_counter_ns() - start) / count / 1000)
    return statistics.median(samples)


def bench_injection(rounds: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with MinimalGuest(accel="kvm") as guest:
        results["native getpid (Python loop)"] = per_call_us(os.getpid, 200_000, rounds)
        with KvmSession(guest.pid) as session:
            guardian = session._guardian
            samples = [guardian.bench(llkvm.SYS_getpid, 2000) / 2000 / 1000 for _ in range(rounds)]
            results["injected getpid, guardian-internal"] = statistics.median(samples)
            results["injected getpid, one request from Python (held)"] = per_call_us(
                lambda: session.inject(llkvm.SYS_getpid), 1000, rounds
            )
            results["injected KVM_GET_REGS from Python (held)"] = per_call_us(
                lambda: session.get_regs(0), 500, rounds
            )
            results["control round trip without injection (ping)"] = per_call_us(
                guardian.ping, 2000, rounds
            )
            session.run()
            results["injected getpid while running (stop all + resume)"] = per_call_us(
                lambda: session.inject(llkvm.SYS_getpid), 200, rounds
            )

        def cycle() -> None:
            with KvmSession(guest.pid):
                pass

        results["attach + detach"] = per_call_us(cycle, 20, rounds)
        assert guest.fault() is None
    return results


def loop_rate(vmm: TinyVmm, seconds: float) -> float:
    """Guest loop iterations per second over ``seconds``."""
    vmm.wait_iterations(50)
    start_count, start = vmm.iterations(), time.perf_counter()
    time.sleep(seconds)
    count, end = vmm.iterations(), time.perf_counter()
    return (count - start_count) / (end - start)


def bench_mmio(seconds: float, rounds: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {"vmm": [], "attached": [], "trapped": [], "bank": []}
    with TinyVmm() as vmm:
        for _ in range(rounds):
            rates["vmm"].append(loop_rate(vmm, seconds))
            with KvmSession(vmm.pid, run=True) as session:
                rates["attached"].append(loop_rate(vmm, seconds))
                with session.trap_mmio(WINDOW_GPA, 0x1000) as trap:
                    trap.set(0, 0xCAFE_BABE)
                    rates["trapped"].append(loop_rate(vmm, seconds))
                    assert trap.reads > 0 and session.status().mmio_timeouts == 0
                with session.trap_mmio(WINDOW_GPA, 0x1000, reads_by_guardian=True) as trap:
                    trap.set(0, 0xCAFE_BABE)
                    rates["bank"].append(loop_rate(vmm, seconds))
                    assert trap.reads > 0 and trap.bank.reads == 0
    vmm_rate = statistics.median(rates["vmm"])
    attached_rate = statistics.median(rates["attached"])
    trapped_rate = statistics.median(rates["trapped"])
    bank_rate = statistics.median(rates["bank"])
    return {
        "iterations/s, VMM answers (baseline)": vmm_rate,
        "iterations/s, dvs attached, not trapping": attached_rate,
        "iterations/s, dvs C loop answers (trapped)": trapped_rate,
        "iterations/s, guardian answers from shared bank": bank_rate,
        "us per iteration, VMM answers": 1e6 / vmm_rate,
        "us per iteration, dvs C loop answers": 1e6 / trapped_rate,
        "us per iteration, guardian answers": 1e6 / bank_rate,
        "added us per trapped MMIO, dvs C loop": 1e6 / trapped_rate - 1e6 / vmm_rate,
        "added us per trapped MMIO, guardian bank": 1e6 / bank_rate - 1e6 / vmm_rate,
        "time per exit, dvs C loop / VMM": vmm_rate / trapped_rate,
        "time per exit, guardian bank / VMM": vmm_rate / bank_rate,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per MMIO rate sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    injection = bench_injection(args.rounds)
    mmio = bench_mmio(args.seconds, args.rounds)
    if args.json:
        print(json.dumps({"injection_us": injection, "mmio": mmio}, indent=2))
        return 0
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, kernel {platform.release()}")
    print("\nsyscall injection into QEMU -enable-kvm (µs per call, median of rounds)")
    native = injection["native getpid (Python loop)"]
    for name, value in injection.items():
        print(f"  {name:55s} {value:10.2f}   x{value / native:8.1f} native")
    print("\nMMIO round trips, tiny VMM (one MMIO read exit per guest loop iteration)")
    for name, value in mmio.items():
        print(f"  {name:55s} {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
