"""VM introspection: time to inspect a running guest, and time to a side-loaded marker.

For each guest size (512 MiB and 2 GiB, QEMU-TCG, Debian 6.1, KASLR on) it boots a guest and
measures, several times:

* ``inspect``: ``dvs.vm.inspect.inspect_vm(pid)``, i.e. everything ``dvs vm inspect`` does
  (find RAM, find and validate the kernel, kallsyms, ksymtab, BTF, summary);
* the baseline in the same run: one plain ``process_vm_readv`` pass over all guest RAM in
  64 MiB chunks (what any scan-everything approach costs at least), and the ratio;
* ``side-load``: from the start of ``dvs vm inject-test`` work (find the kernel, build or load
  the cached payload, prove pages, map, arm) to the payload's ``state == DONE`` (the marker
  has been printed), and the part of it spent waiting for the kernel's next call (the
  vmstat shepherd runs once a second, so that part is 0-1 s by design).

Run: ``python3 benchmarks/bench_vm_introspect.py [--runs N] [--sizes 512,2048]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from dvs.lowlevel.guestmem import GuestMemory, Region
from dvs.testing.guest import LinuxGuest
from dvs.vm.inspect import inspect_vm
from dvs.vm.kernel import find_kernel
from dvs.vm.memory import ram_candidates, read_maps
from dvs.vm.sideload import Sideloader, build_payload


def full_read_seconds(pid: int, size: int) -> float:
    mapping = next(m for m in ram_candidates(read_maps(pid)) if m.size == size)
    mem = GuestMemory([Region(0, mapping.size, mapping.start)], pid)
    buf = bytearray(64 << 20)
    started = time.monotonic()
    for offset in range(0, mapping.size, len(buf)):
        view = memoryview(buf)[: min(len(buf), mapping.size - offset)]
        mem.readinto(offset, view)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="512,2048", help="guest RAM sizes in MiB")
    args = parser.parse_args()
    build_payload()  # compile once, outside the timings
    print("machine: 2-vCPU shared VM; guests: QEMU 7.2 TCG, qemu64, Debian 6.1, KASLR on")
    for size_mib in (int(s) for s in args.sizes.split(",")):
        with LinuxGuest(memory_mib=size_mib, cpus=1) as guest:
            guest.check("dmesg -n 1")
            inspect_times, baseline_times = [], []
            for _ in range(args.runs):
                inspection, _ = inspect_vm(guest.pid)
                inspect_times.append(inspection.seconds)
                baseline_times.append(full_read_seconds(guest.pid, size_mib << 20))
            ins, base = statistics.median(inspect_times), statistics.median(baseline_times)
            print(
                f"{size_mib:5d} MiB  inspect median {ins:.2f} s (min {min(inspect_times):.2f}, "
                f"n={args.runs})  baseline full RAM read median {base:.2f} s  "
                f"ratio inspect/read {ins / base:.2f}"
            )
            to_marker, waiting = [], []
            for run in range(args.runs):
                started = time.monotonic()
                kernel = find_kernel(guest.pid)
                loader = Sideloader(kernel)
                result = loader.inject(f"dvs bench {run}")
                to_marker.append(result.done_at - started)
                waiting.append(result.seconds_to_marker)
            print(
                f"{size_mib:5d} MiB  side-load start->marker median "
                f"{statistics.median(to_marker):.2f} s (min {min(to_marker):.2f}, max "
                f"{max(to_marker):.2f}), of which waiting for the kernel's call median "
                f"{statistics.median(waiting):.2f} s"
            )


if __name__ == "__main__":
    main()
