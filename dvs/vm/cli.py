"""``dvs vm ...``: inspect a running VM, dump its memory, prove side-loading.

Each command takes the hypervisor's process id and needs nothing else: no QMP, no KVM ioctls,
no guest cooperation (see ``dvs.vm.kernel`` for how the guest kernel is found).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvs.cli import Cli


def _inspect(args: argparse.Namespace) -> int:
    from dvs.vm.inspect import inspect_vm

    inspection, _ = inspect_vm(args.pid)
    print(inspection.to_json() if args.json else inspection.format_text())
    return 0


def _coredump(args: argparse.Namespace) -> int:
    from dvs.vm.coredump import write_core
    from dvs.vm.kernel import find_kernel

    started = time.monotonic()
    kernel = find_kernel(args.pid)
    segments = write_core(kernel.ram, args.file, kernel=kernel, pause=args.pause)
    size = sum(r.size for r in kernel.ram.regions)
    print(
        f"wrote {args.file}: {len(segments)} PT_LOAD segments, {size >> 20} MiB of guest RAM "
        f"({kernel.ram.layout} layout, kernel {kernel.release}) in "
        f"{time.monotonic() - started:.2f} s"
    )
    return 0


def _inject_test(args: argparse.Namespace) -> int:
    from dvs.vm.kernel import find_kernel
    from dvs.vm.sideload import Sideloader

    kernel = find_kernel(args.pid)
    loader = Sideloader(kernel, log_level=args.level)
    results = []
    for run in range(args.count):
        marker = f"{args.marker} {run + 1}/{args.count}" if args.count > 1 else args.marker
        result = loader.inject(marker, timeout=args.timeout)
        results.append(result)
        if not args.json:
            notes = "".join(f"; {note}" for note in result.notes)
            print(
                f"run {run + 1}: marker {result.marker!r} printed after "
                f"{result.seconds_to_marker:.3f} s (entry {result.entry_va:#x}, "
                f"{result.calls} call, slot restored by the payload: "
                f"{result.restored_by_payload}){notes}"
            )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        proof = results[-1].proof
        print(f"payload pages (proved unused): {', '.join(hex(p.pa) for p in proof.pages)}")
        for reason in proof.pages[0].reasons:
            print(f"  {reason}")
    return 0


def register(cli: Cli) -> None:
    cli.group("vm", "running VMs: inspect the guest kernel, side-load, vCPUs, serve disks")
    cmd = cli.command("inspect", "find the guest kernel in a hypervisor's memory", _inspect, "vm")
    cmd.add_argument("pid", type=int, help="hypervisor process id (QEMU, Firecracker...)")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")

    cmd = cli.command(
        "coredump", "write guest physical memory as an ELF core file", _coredump, "vm"
    )
    cmd.add_argument("pid", type=int)
    cmd.add_argument("file")
    cmd.add_argument(
        "--pause", action="store_true", help="stop the hypervisor while copying (consistent)"
    )

    cmd = cli.command(
        "inject-test",
        "make the guest kernel run a printk payload once (side-loading proof)",
        _inject_test,
        "vm",
    )
    cmd.add_argument("pid", type=int)
    cmd.add_argument("--count", type=int, default=1, help="runs in a row (default 1)")
    cmd.add_argument("--marker", default="dvs-sideload marker", help="text the guest prints")
    cmd.add_argument("--level", type=int, default=6, help="printk log level (default 6, info)")
    cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per run")
    cmd.add_argument("--json", action="store_true")
