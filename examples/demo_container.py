"""Demo section: attach the host's tools to a slim busybox container, CNTR-style.

The container runs busybox only -- no procps ``ps``, no python, nothing to debug with. The
attach brings the host's tools in without touching the container: the host is at ``/``,
the container's root at ``/var/lib/cntr``, and the container's /proc, /dev, /sys and
/etc/{hosts,hostname,resolv.conf,...} lie over the host's, so ``ps`` (the host's procps)
shows the container's processes only. The same, from a shell: ``dvs container attach ID``.
"""

from __future__ import annotations

import os
import sys

from dvs.container import PIPE, Session
from dvs.testing.containers import run_container

COMMANDS = (
    ("ps -e -o pid,user,comm", "the host's procps, the container's pid namespace"),
    ("ls -x /var/lib/cntr", "the container's root"),
    ("hostname; cat /etc/resolv.conf", "the container's, over the host's"),
    ("for t in python3 gdb strace; do command -v $t; done", "the host's tools"),
)


def run() -> None:
    with run_container("runc", readonly=True) as box:
        print(f"slim container {box.id} (runc, read-only root), init pid {box.pid} on the host")
        mounts_before = _mounts(box.pid)
        base_dir_before = os.path.lexists("/var/lib/cntr")
        for command, what in COMMANDS:
            print(f"\n$ dvs container attach {box.id} -- sh -c '{command}'   # {what}")
            with Session(box.id, ["sh", "-c", command], stdout=PIPE) as session:
                out, _ = session.communicate(timeout=60)
            sys.stdout.write(out.decode(errors="replace"))
            for warning in session.warnings:
                print(f"  (warning: {warning})")
        same = _mounts(box.pid) == mounts_before
        same = same and os.path.lexists("/var/lib/cntr") == base_dir_before
        print(
            "\nthe container's mount table and the host's /var/lib are as before: "
            + ("yes" if same else "NO")
        )


def _mounts(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return sorted(f.read().splitlines())


if __name__ == "__main__":
    run()
