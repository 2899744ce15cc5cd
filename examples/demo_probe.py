"""Demo section: what this machine offers, and a slim container to work on.

Starts a busybox container under runc from the cached slim rootfs (no registry, no image
build), shows what it is from the host's side, then prints ``dvs probe``.
"""

from __future__ import annotations

import os
from pathlib import Path

from dvs import probe
from dvs.testing.containers import run_container


def run() -> None:
    with run_container("runc") as box:
        root = f"/proc/{box.pid}/root"
        print(f"slim container {box.id}: init pid {box.pid} (runtime {box.runtime})")
        print(f"  its root: {sorted(os.listdir(root))}")
        print(
            f"  /bin/sh -> {os.readlink(root + '/bin/sh')}; hostname "
            f"{Path(root, 'etc/hostname').read_text().strip()!r}"
        )
        print(f"  inside: {box.exec(['ps', '-o', 'pid,args']).stdout.decode().strip()}")
    print()
    print(probe.format_table(probe.probe()))
