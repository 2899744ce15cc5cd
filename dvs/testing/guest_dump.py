"""A saved core of a running Debian guest, for offline introspection tests.

Built once per kit (a cache artefact, see ``dvs.testing.cache``): boot a small guest (256 MiB,
1 vCPU, KASLR on), let ``dvs vm coredump`` write its memory with the hypervisor paused, and
record what the guest itself said (``/proc/kallsyms`` lines for a few symbols, the KASLR
``_text``) next to it. The core is sparse (zero pages are holes), so it costs well under the
guest's RAM size on disk. Nothing of it goes into git.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dvs.testing import cache
from dvs.testing.guest import LinuxGuest, guest_kit

DUMP_FORMAT = 1
PROBE_SYMBOLS = ("_text", "init_top_pgt", "_printk", "init_task", "system_wq", "linux_banner")


@dataclass(frozen=True)
class SavedDump:
    core: Path
    symbols: dict[str, int]
    """What the guest's own /proc/kallsyms said for ``PROBE_SYMBOLS``."""
    release: str


def saved_guest_dump() -> SavedDump:
    kit = guest_kit()
    name = f"vm-guest-dump-v{DUMP_FORMAT}-{kit.root.name}"
    root = cache.artefact(name, _build)
    meta = json.loads((root / "dump.json").read_text())
    return SavedDump(
        root / "guest.core", {k: int(v, 16) for k, v in meta["symbols"].items()}, meta["release"]
    )


def _build(out: Path) -> None:
    from dvs.vm.coredump import write_core
    from dvs.vm.kernel import find_kernel

    with LinuxGuest(memory_mib=256, cpus=1) as guest:
        pattern = "|".join(PROBE_SYMBOLS)
        lines = guest.check(f"grep -E ' ({pattern})$' /proc/kallsyms")
        symbols = {line.split()[2]: line.split()[0] for line in lines.splitlines()}
        release = guest.check("uname -r").strip()
        kernel = find_kernel(guest.pid)
        write_core(kernel.ram, out / "guest.core", kernel=kernel, pause=True)
    (out / "dump.json").write_text(json.dumps({"symbols": symbols, "release": release}))
