"""Demo: reach into a running KVM hypervisor (QEMU -enable-kvm) from outside.

Boots the minimal KVM guest, shows its vCPU state (``dvs vm vcpus``), then attaches: adds a
page of guest memory that the guest reads, rings a doorbell, answers the guest's MMIO reads
from dvs, and detaches -- leaving QEMU's fd table and memory map exactly as they were.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from dvs.hypervisor import KvmSession
from dvs.testing.kvm_guest import Command, MinimalGuest

NEW_RAM = 0x1_0000_0000
DOORBELL = 0xD000_0000
DEVICE_WINDOW = 0xC000_0000


def snapshot(pid: int) -> tuple[list[str], str]:
    fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=int)
    with open(f"/proc/{pid}/maps") as maps:
        return fds, maps.read()


def run() -> None:
    with MinimalGuest(accel="kvm") as guest:
        print(f"minimal guest running in QEMU pid {guest.pid} (KVM)")
        subprocess.run([sys.executable, "-m", "dvs", "vm", "vcpus", str(guest.pid)], check=True)
        before = snapshot(guest.pid)
        with KvmSession(guest.pid, run=True) as session:
            print(f"\nattached: every QEMU thread traced by guardian {session.guardian_pid}")
            slot = session.add_memory(NEW_RAM, 4096)
            slot.write(0, struct.pack("<Q", 0x0DD5_0DD5_0DD5_0DD5))
            value = guest.mailbox(Command.READ, NEW_RAM, 8)
            print(f"memory slot {slot.slot} at GPA {NEW_RAM:#x}: the guest reads {value:#x}")
            doorbell = session.add_ioeventfd(DOORBELL, 4)
            guest.mailbox(Command.WRITE, DOORBELL, 1, 4)
            print(f"guest wrote the doorbell at {DOORBELL:#x}: eventfd count {doorbell.wait(5)}")
            with session.trap_mmio(DEVICE_WINDOW, 4096) as trap:
                trap.set(0, 0xD5D5_0001)
                value = guest.mailbox(Command.READ, DEVICE_WINDOW, 4)
                print(f"MMIO read of {DEVICE_WINDOW:#x} answered by dvs: {value:#x}")
        # closing the session waited for the guardian to restore QEMU and exit
        after = snapshot(guest.pid)
        print(
            "detached: QEMU's fd table "
            + ("unchanged" if after[0] == before[0] else "CHANGED")
            + ", memory map "
            + ("unchanged" if after[1] == before[1] else "CHANGED")
            + f", guest heartbeat {guest.mailbox(Command.PING)}"
        )


if __name__ == "__main__":
    run()
