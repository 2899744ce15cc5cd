"""The dvs vhost-user-blk back-end under an unmodified Linux driver.

A Debian 6.1 kernel under QEMU-TCG (the kit's guest) gets a disk served by dvs: QEMU shares
guest RAM as a memfd and hands it to our server, and the guest's own virtio_blk driver
talks to the C device model through shared memory. The guest makes an ext4 filesystem with
its own mkfs.ext4 (the kit's initramfs carries e2fsprogs), writes files and syncs; the host
checks the image with e2fsck and reads the files back with debugfs; then the host writes a
file into the image and the guest reads it. A second guest gets the same kind of disk
read-only through the ``dvs vm serve-blk`` command, and a third one a sealed volume
(``--sealed``): encrypted and authenticated on the host, plain ext4 for the guest.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.lowlevel.virtio import BlkEngine
from dvs.shield.volume import Volume
from dvs.testing.guest import LinuxGuest
from dvs.virtio.server import BlkServer

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(900)]

DISK_MIB = 96


def _qemu_disk_args(socket_path: Path) -> list[str]:
    return [
        "-chardev", f"socket,id=dvsdisk,path={socket_path}",
        "-device", "vhost-user-blk-pci,chardev=dvsdisk,num-queues=1",
    ]  # fmt: skip


def _host(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _disk_named(guest: LinuxGuest, serial: str) -> str:
    out = guest.check("for d in /sys/block/vd*; do echo $(basename $d)=$(cat $d/serial); done")
    names = dict(line.split("=", 1) for line in out.split())
    matches = [dev for dev, s in names.items() if s == serial]
    assert matches, f"no disk with serial {serial!r} in the guest: {names}"
    return f"/dev/{matches[0]}"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)
    return path


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    path = Path(f"/tmp/dvs-vu-{os.getpid()}-{tmp_path.name[-8:]}.sock")
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize(("engine", "depth"), [("io_uring", 32), ("sync", 0), ("deferred", 4)])
def test_guest_makes_ext4_on_the_dvs_disk_and_both_sides_see_the_same_files(
    image: Path, sock: Path, tmp_path: Path, engine: BlkEngine, depth: int
) -> None:
    """With the shared io_uring ring (32 entries, so a busy guest fills it), the synchronous
    backend, and completions arriving later with at most 4 operations in flight."""
    server_cm = BlkServer(image, sock, device_id="dvs-it-disk", engine=engine, depth=depth)
    with server_cm as server:
        with LinuxGuest(memfd_ram=True, qemu_args=_qemu_disk_args(sock)) as guest:
            dev = _disk_named(guest, "dvs-it-disk")
            assert guest.check(f"cat /sys/block/{dev[5:]}/size").strip() == str(DISK_MIB * 2048)

            guest.check(f"mkfs.ext4 -q -F -L dvsdisk {dev}", timeout=300)
            guest.check(f"mkdir -p /mnt && mount -t ext4 {dev} /mnt")
            guest.check(
                "dd if=/dev/urandom of=/mnt/random.bin bs=64k count=48 2>/dev/null && "
                "mkdir -p /mnt/dir/sub && echo 'written by the guest' > /mnt/dir/sub/note.txt",
                timeout=120,
            )
            guest_sum = guest.check("sha256sum /mnt/random.bin").split()[0]
            guest.check("sync && umount /mnt", timeout=120)

            # The host's view of the same bytes: a clean filesystem holding the same files.
            fsck = _host("e2fsck", "-f", "-n", str(image))
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            copied = tmp_path / "random.bin"
            dump = _host("debugfs", "-R", f"dump /random.bin {copied}", str(image))
            assert copied.exists(), dump.stderr
            assert hashlib.sha256(copied.read_bytes()).hexdigest() == guest_sum
            note = _host("debugfs", "-R", "cat /dir/sub/note.txt", str(image))
            assert note.stdout == "written by the guest\n"

            # The host writes a file into the (unmounted) image; the guest reads it.
            host_file = tmp_path / "from-host.bin"
            host_file.write_bytes(os.urandom(300_000))
            wrote = _host("debugfs", "-w", "-R", f"write {host_file} from-host.bin", str(image))
            assert wrote.returncode == 0, wrote.stderr
            assert _host("e2fsck", "-f", "-n", str(image)).returncode == 0
            guest.check(f"echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs {dev}")
            guest.check(f"mount -t ext4 {dev} /mnt")
            assert (
                guest.check("sha256sum /mnt/from-host.bin").split()[0]
                == hashlib.sha256(host_file.read_bytes()).hexdigest()
            )
            guest.check("rm /mnt/random.bin && fstrim /mnt && umount /mnt", timeout=120)

        stats = server.stats()
    assert stats.vhost.queue_rule is None and not stats.protocol_errors
    blk = stats.blk
    assert blk.errors == 0, blk.request_rules
    assert blk.flushes > 0  # ext4's journal commits ask for them
    assert blk.discards > 0  # fstrim
    assert blk.bytes_written >= 48 * 65536 and blk.bytes_read >= 300_000
    if engine == "deferred":
        assert blk.deferred > 0  # the guest had more in flight than the backend took
    assert _host("e2fsck", "-f", "-n", str(image)).returncode == 0


def test_the_cli_serves_a_read_only_disk(image: Path, sock: Path) -> None:
    pattern = os.urandom(1 << 20)
    with open(image, "r+b") as f:
        f.seek(4 << 20)
        f.write(pattern)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    server = subprocess.Popen(
        [sys.executable, "-m", "dvs", "vm", "serve-blk", "--read-only", "--id", "dvs-ro",
         str(image), str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert f"on {sock}" in line and "read-only" in line, line + server.stderr.read()
        with LinuxGuest(memfd_ram=True, qemu_args=_qemu_disk_args(sock)) as guest:
            dev = _disk_named(guest, "dvs-ro")
            assert guest.check(f"cat /sys/block/{dev[5:]}/ro").strip() == "1"
            got = guest.check(
                f"dd if={dev} bs=1M skip=4 count=1 iflag=direct 2>/dev/null | sha256sum"
            )
            assert got.split()[0] == hashlib.sha256(pattern).hexdigest()
            status, _ = guest.run(f"dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct")
            assert status != 0  # the kernel refuses: the device said VIRTIO_BLK_F_RO
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    served = re.search(r"served (\d+) connection\(s\), (\d+) requests", out)
    assert served and int(served.group(1)) == 1 and int(served.group(2)) > 0, out
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert not sock.exists()


def test_a_guest_writes_ext4_onto_a_sealed_volume(tmp_path: Path, sock: Path) -> None:
    """``dvs vm serve-blk --sealed``: the guest formats and fills a disk whose only copy on
    the host is a sealed volume; the host then opens the volume, checks the filesystem it
    holds and finds the guest's file -- and the volume file itself holds no plaintext."""
    volume_path, key_file = tmp_path / "disk.vol", tmp_path / "disk.key"
    key_file.write_bytes(os.urandom(32))
    Volume.create(volume_path, DISK_MIB << 20, key=key_file.read_bytes()).close()
    marker = "sealed-disk-marker-" + os.urandom(8).hex()
    server = subprocess.Popen(
        [sys.executable, "-m", "dvs", "vm", "serve-blk", "--sealed", "--key-file", str(key_file),
         "--id", "dvs-sealed", str(volume_path), str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "sealed volume" in line, line + server.stderr.read()
        with LinuxGuest(memfd_ram=True, qemu_args=_qemu_disk_args(sock)) as guest:
            dev = _disk_named(guest, "dvs-sealed")
            guest.check(f"mkfs.ext4 -q -F {dev} && mkdir -p /mnt && mount -t ext4 {dev} /mnt",
                        timeout=300)  # fmt: skip
            guest.check(f"for i in $(seq 200); do echo {marker} $i; done > /mnt/note.txt")
            note_sum = guest.check("sha256sum /mnt/note.txt").split()[0]
            guest.check("sync && umount /mnt", timeout=120)
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert "served 1 connection(s)" in out and "0 errors" in out, out
    assert marker.encode() not in volume_path.read_bytes()  # ciphertext only
    plain = tmp_path / "plain.img"
    volume = Volume.open(volume_path, key=key_file.read_bytes(), readonly=True)
    try:
        with open(plain, "wb") as f:
            for offset in range(0, DISK_MIB << 20, 1 << 20):
                f.write(volume.read(offset, 1 << 20).ljust(1 << 20, b"\0"))
    finally:
        volume.close()
    fsck = _host("e2fsck", "-f", "-n", str(plain))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copied = tmp_path / "note.txt"
    _host("debugfs", "-R", f"dump /note.txt {copied}", str(plain))
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == note_sum


def test_sealed_without_a_key_is_a_clear_error(image: Path, sock: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "serve-blk", "--sealed", str(image), str(sock)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if k != "DVS_SHIELD_PASSPHRASE"},
             "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert run.returncode == 1
    assert "no key" in run.stderr
    assert not sock.exists()
