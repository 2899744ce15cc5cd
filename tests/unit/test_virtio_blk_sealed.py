"""virtio-blk on a sealed volume (dvs.shield): what the guest writes is sealed in the file,
a FLUSH commits it, and a block tampered with in the file is an I/O error in the guest,
never plaintext of the attacker's choosing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import BlkDevice, VirtQueue
from dvs.shield.volume import Volume
from dvs.virtio.reference import (
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_T_FLUSH,
    BLK_T_IN,
    BLK_T_OUT,
    BLK_T_WRITE_ZEROES,
    MockDriver,
    blk_header,
    blk_range,
)

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))
MARKER = b"guest plaintext that must never reach the file " * 85  # 4080 bytes


class SealedRig:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.volume = Volume.open(path, key=KEY, readonly=read_only)
        self.device = BlkDevice.on_sealed_volume(self.volume._live(), read_only=read_only)
        self.mem = GuestMemory.local(8 << 20)
        self.driver = MockDriver(self.mem, size=64, span=6 << 20)
        self.queue = VirtQueue(self.mem, **self.driver.layout, max_segs=self.device.max_segs)

    def request(
        self, rtype: int, sector: int = 0, data: bytes = b"", read: int = 0
    ) -> tuple[int, bytes]:
        sub = self.driver.add(
            [blk_header(rtype, sector), *([data] if data else [])], [*([read] if read else []), 1]
        )
        self.device.process(self.queue)
        (used,) = self.driver.reap()
        out = self.driver.read_writable(sub)
        assert used.id == sub.head
        return out[-1], out[:-1]

    def close(self) -> None:
        self.device.close()
        self.volume.close()


@pytest.fixture
def volume_path(tmp_path: Path) -> Path:
    path = tmp_path / "sealed.vol"
    Volume.create(path, 4 << 20, key=KEY).close()
    return path


def test_guest_data_is_sealed_committed_and_read_back(volume_path: Path) -> None:
    rig = SealedRig(volume_path)
    try:
        assert rig.device.capacity_sectors == (4 << 20) // 512 and rig.device.is_sealed
        block = MARKER.ljust(4096, b"!")
        assert rig.request(BLK_T_OUT, 16, data=block)[0] == BLK_S_OK
        assert rig.request(BLK_T_FLUSH)[0] == BLK_S_OK  # the volume's atomic commit
        status, data = rig.request(BLK_T_IN, 16, read=4096)
        assert status == BLK_S_OK and data == block
        status, data = rig.request(BLK_T_IN, 4096, read=8192)  # never written: zeroes
        assert status == BLK_S_OK and data == bytes(8192)
        assert rig.request(BLK_T_WRITE_ZEROES, data=blk_range(16, 8))[0] == BLK_S_OK
        assert rig.request(BLK_T_IN, 16, read=4096)[1] == bytes(4096)
        assert rig.request(BLK_T_OUT, 16, data=block)[0] == BLK_S_OK
    finally:
        rig.close()  # closing commits the last write too
    assert MARKER[:64] not in volume_path.read_bytes()  # only ciphertext in the file
    reopened = Volume.open(volume_path, key=KEY, readonly=True)
    try:
        assert reopened.read(16 * 512, 4096) == block
    finally:
        reopened.close()


def test_a_tampered_block_is_an_io_error_for_the_guest(volume_path: Path) -> None:
    rig = SealedRig(volume_path)
    try:
        rig.request(BLK_T_OUT, 0, data=os.urandom(4096))
        rig.request(BLK_T_OUT, 8, data=os.urandom(4096))
        physical = rig.volume.locate(0)
        assert physical is not None
    finally:
        rig.close()
    with open(volume_path, "r+b") as f:  # an attacker with the file flips one byte
        f.seek(physical * 4096 + 100)
        byte = f.read(1)
        f.seek(physical * 4096 + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    rig = SealedRig(volume_path, read_only=True)
    try:
        status, data = rig.request(BLK_T_IN, 0, read=4096)
        assert status == BLK_S_IOERR and data == bytes(4096)  # nothing unauthenticated
        assert rig.request(BLK_T_IN, 8, read=4096)[0] == BLK_S_OK  # the other block is fine
        assert rig.request(BLK_T_OUT, 8, data=bytes(4096))[0] == BLK_S_IOERR  # read-only
    finally:
        rig.close()
