"""Demo: dvs serves a disk to a real Linux guest over vhost-user, and refuses a hostile driver.

1. A 64 MiB image is served with ``BlkServer`` (what ``dvs vm serve-blk`` runs); a Debian 6.1
   guest under QEMU-TCG gets it as /dev/vda through its unmodified virtio_blk driver, makes
   an ext4 filesystem and writes a file; the host reads that file back out of the image.
2. A mock driver builds a descriptor chain that loops back on itself; the C walker stops
   the queue with the rule it broke instead of spinning.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import VirtQueue, VirtqueueBroken
from dvs.testing.guest import LinuxGuest
from dvs.virtio.reference import DESC_F_NEXT, MockDriver
from dvs.virtio.server import BlkServer


def serve_a_disk() -> None:
    with tempfile.TemporaryDirectory(prefix="dvs-demo-virtio-") as tmp:
        image, sock = Path(tmp) / "disk.img", Path(tmp) / "disk.sock"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        with BlkServer(image, sock, device_id="dvs-demo") as server:
            qemu_args = [
                "-chardev", f"socket,id=disk,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=disk",
            ]  # fmt: skip
            with LinuxGuest(memfd_ram=True, qemu_args=qemu_args) as guest:
                print("guest sees:", guest.check("cat /sys/block/vda/serial; echo").strip())
                guest.check("mkfs.ext4 -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt")
                guest.check("echo 'hello from the guest' > /mnt/greeting && sync && umount /mnt")
            stats = server.stats()
        greeting = subprocess.run(
            ["debugfs", "-R", "cat /greeting", str(image)], capture_output=True, text=True
        ).stdout
        print(f"host reads the guest's file out of the image: {greeting.strip()!r}")
        print(
            f"dvs served {stats.blk.requests} virtio-blk requests "
            f"({stats.blk.bytes_written >> 10} KiB written, {stats.blk.flushes} flushes)"
        )


def refuse_a_loop() -> None:
    mem = GuestMemory.local(1 << 20)
    driver = MockDriver(mem, size=8)
    buf = driver.alloc(64)
    driver.write_desc(0, buf, 64, DESC_F_NEXT, 1)
    driver.write_desc(1, buf, 64, DESC_F_NEXT, 0)  # 0 -> 1 -> 0 -> ...
    driver.put_avail(0, 0)
    driver.set_avail_idx(1)
    queue = VirtQueue(mem, **driver.layout)
    try:
        queue.pop()
    except VirtqueueBroken as exc:
        print(f"hostile driver refused: {exc}; queue needs reset: {queue.needs_reset}")


def run() -> None:
    if os.geteuid() != 0:
        print("skipped: the virtio demo needs root (QEMU guest)")
        return
    serve_a_disk()
    refuse_a_loop()


if __name__ == "__main__":
    run()
