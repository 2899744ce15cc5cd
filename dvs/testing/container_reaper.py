"""A minimal container monitor: start a detached OCI container and reap its init when it dies.

Run as a script (``python3 container_reaper.py LOG -- runc run -d ...``), never imported.

``runc run -d``/``crun run -d`` exit once the container runs, so its init is orphaned and
reparented to the nearest *child subreaper* ancestor, or else to PID 1. On this machine PID 1
(a VM agent) reaps orphans only every second or two, so a killed container's pid would linger
as a zombie in /proc for up to ~2 s. This script makes itself a subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), runs the runtime with the container's stdio on LOG, prints
the runtime's exit status on stdout and closes it (the caller's "started" signal), then reaps
every orphan until it has no children left and exits. The caller therefore knows that the
container's init has been reaped as soon as this process has exited. It is conmon's role for
podman, reduced to what tests need.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: container_reaper.py LOG -- RUNTIME ARGS...", file=sys.stderr)
        return 2
    log_path, command = argv[0], argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    with open(log_path, "ab", buffering=0) as log:
        runtime = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        status = runtime.wait()
    sys.stdout.write(f"{status}\n")
    sys.stdout.flush()
    # Replace (and so close) our end of the status pipe: the caller reads until EOF.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
