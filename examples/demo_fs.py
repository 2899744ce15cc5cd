"""Demo: CntrFS, the FUSE proxy filesystem.

1. ``dvs fs mount`` serves a directory (as a daemon), a user works in it, ``dvs fs umount``.
2. Kernel passthrough: a file read through the mount never reaches the daemon -- its
   counters show zero bytes served -- unless passthrough is switched off.
3. Container attach with both backends: the host's tools in a user-namespaced busybox
   container, once through the mount API (an id-mapped clone of the host's tree) and once
   through CntrFS (``--backend fuse``, CNTR 1.x's way) -- the same view, ids shifted the
   same way (host root's files belong to the container's root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dvs.container import PIPE, AttachOptions, Session
from dvs.fs import CntrFs, MountOptions
from dvs.testing.containers import run_container

ATTACH_SCRIPT = (
    "echo \"  / is $(grep ' / / ' /proc/self/mountinfo | sed 's/.* - //; s/ .*//')\"; "
    'echo "  owner of /usr/bin/env as seen inside: uid $(stat -c %u /usr/bin/env)"; '
    'echo "  id: $(id -u), hostname: $(cat /etc/hostname), container root: '
    "$(ls /var/lib/cntr | tr '\\n' ' ')\""
)


def sh(*cmd: str) -> str:
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = (out.stdout + out.stderr).rstrip()
    if text:
        print(text)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {out.returncode}")
    return out.stdout


def run() -> None:
    top = Path(tempfile.mkdtemp(prefix="dvs-demo-fs-"))
    src, mnt = top / "tools", top / "view"
    src.mkdir()
    mnt.mkdir()
    (src / "README").write_text("served by CntrFS\n")
    (src / "bin").mkdir()
    shutil.copy("/bin/busybox" if os.path.exists("/bin/busybox") else "/bin/true", src / "bin")
    dvs = [sys.executable, "-m", "dvs"]
    try:
        print("-- dvs fs mount (a daemon until unmounted)")
        sh(*dvs, "fs", "mount", str(src), str(mnt))
        sh("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", str(mnt))
        sh("ls", "-l", str(mnt), str(mnt / "bin"))
        sh("cat", str(mnt / "README"))
        (mnt / "notes").write_text("written through the mount\n")
        print(f"backing file now holds: {(src / 'notes').read_text().strip()!r}")
        sh(*dvs, "fs", "umount", str(mnt))

        print("\n-- kernel passthrough: reads never reach the daemon")
        (src / "data").write_bytes(os.urandom(8 << 20))
        for options in ("", "nopassthrough"):
            with CntrFs(src, MountOptions.parse(options)) as fs:
                fs.mount(mnt)
                (mnt / "data").read_bytes()
                st = fs.stats()
                mode = "passthrough" if fs.negotiated and fs.negotiated.passthrough else "daemon"
                print(
                    f"{mode:>11}: read 8 MiB, daemon served {st.bytes_read >> 20} MiB in "
                    f"{st.by_opcode.get('READ', 0)} READ requests, "
                    f"{st.passthrough_opens} passthrough opens"
                )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)

    print("\n-- container attach, both backends (user-namespaced busybox container)")
    with run_container("runc", userns=True) as box:
        for backend in ("mount", "fuse"):
            print(f"$ dvs container attach --backend {backend} {box.id} -- sh -c '...'")
            options = AttachOptions(backend=backend)
            with Session(box.id, ["sh", "-c", ATTACH_SCRIPT], options=options, stdout=PIPE) as s:
                out, _ = s.communicate(timeout=120)
            sys.stdout.write(out.decode(errors="replace"))


if __name__ == "__main__":
    run()
