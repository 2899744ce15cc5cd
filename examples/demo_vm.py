"""Demo section: look into a running VM from its hypervisor process alone, then make its kernel
run a payload of ours once.

Boots the kit's Debian guest under QEMU-TCG (KASLR on), runs ``dvs vm inspect PID`` (no QMP,
no KVM, no guest agent), then ``dvs vm inject-test PID`` and shows the marker the guest kernel
printed in its own log.
"""

from __future__ import annotations

import subprocess
import sys

from dvs.testing.guest import LinuxGuest


def run() -> None:
    with LinuxGuest(memory_mib=512, cpus=1) as guest:
        print(f"guest booted in {guest.boot_seconds:.1f} s, QEMU pid {guest.pid}")
        print(f"the guest says: {guest.check('grep -w _text /proc/kallsyms').strip()}")
        for argv in (["inspect"], ["inject-test", "--marker", "hello from dvs"]):
            command = [sys.executable, "-m", "dvs", "vm", argv[0], str(guest.pid), *argv[1:]]
            print(f"\n$ dvs vm {argv[0]} {guest.pid} {' '.join(argv[1:])}".rstrip())
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            print(done.stdout + done.stderr)
            done.check_returncode()
        print("guest dmesg:", guest.check("dmesg | grep 'hello from dvs'").strip())
