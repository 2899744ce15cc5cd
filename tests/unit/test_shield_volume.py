"""Sealed volumes on real files (io_uring and the thread pool) and on the memory disk:
data round trips, byte-granular access, truncation, keys and KDF, nonce freshness across
reopenings, the anchor against whole-file rollback, and what the format rejects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dvs.errors import IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, Key, parse_header
from dvs.shield.errors import NotAVolume, RollbackDetected, WrongKey
from dvs.shield.volume import Volume, read_anchor_file

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))


@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_blocks_round_trip_through_a_real_file(kind: u.EngineKind, tmp_path: Path) -> None:
    path = tmp_path / "vol"
    blocks = {b: os.urandom(BLOCK) for b in (0, 1, 2, 127, 128, 129, 5000, 9999)}
    with Volume.create(path, 10_000 * BLOCK, key=KEY, engine_kind=kind) as vol:
        assert vol.engine.kind == kind
        for b, data in blocks.items():
            vol.write_blocks(b, data)
        assert vol.read_blocks(128, 2) == blocks[128] + blocks[129]
        assert vol.read_blocks(3, 1) == bytes(BLOCK), "never-written blocks read as zeros"
    with Volume.open(path, key=KEY, engine_kind=kind) as vol:
        for b, data in blocks.items():
            assert vol.read_blocks(b, 1) == data
        assert vol.size == 10_000 * BLOCK
    raw = path.read_bytes()
    for data in blocks.values():
        assert data[:64] not in raw, "plaintext must never reach the file"


def test_a_large_sequential_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    payload = os.urandom(8 << 20)
    with Volume.create(path, 64 << 20, key=KEY, read_slots=64, write_slots=128) as vol:
        vol.write_blocks(100, payload)
        assert vol.read_blocks(100, len(payload) // BLOCK) == payload
        vol.flush()
        stats = vol.io_stats()
        # 8 MiB in contiguous runs, far fewer requests than blocks
        assert stats.submitted < 2048 // 4
    with Volume.open(path, key=KEY) as vol:
        assert vol.read_blocks(100, len(payload) // BLOCK) == payload


def test_scattered_blocks_in_one_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    blocks = rng.integers(0, 50_000, 300).astype(np.uint64)
    blocks[7] = blocks[3]  # the same block twice: the later data wins
    data = rng.integers(0, 256, 300 * BLOCK, dtype=np.uint8)
    with Volume.create(tmp_path / "vol", 50_000 * BLOCK, key=KEY, read_slots=32) as vol:
        vol.write_blocks_at(blocks, data)
        before = vol.io_stats()
        out = np.zeros_like(data)
        vol.read_blocks_at(blocks, out)
        reads = vol.io_stats().minus(before)
        expect = data.reshape(300, BLOCK).copy()
        expect[3] = expect[7]
        assert np.array_equal(out.reshape(300, BLOCK), expect)
        # gathered: ten batches of 32 -- a submit and at most a wait each -- not 300 reads
        assert reads.submitted <= 300 and reads.enters <= 25, reads


def test_bytes_at_any_offset(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "vol", 1 << 20, key=KEY) as vol:
        vol.write(4000, b"a" * 200)  # spans blocks 0 and 1
        vol.write(10, b"hello")
        assert vol.size == 4200
        assert vol.read(4000, 200) == b"a" * 200
        assert vol.read(0, 20) == bytes(10) + b"hello" + bytes(5)
        assert vol.read(4100, 1000) == b"a" * 100, "reads stop at the end of the data"
        assert vol.read(5000, 10) == b""
        vol.write(3 * BLOCK, os.urandom(3 * BLOCK + 17))
        assert vol.size == 6 * BLOCK + 17


def test_truncate_then_grow_shows_zeros(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    with Volume.create(path, 1 << 20, key=KEY) as vol:
        vol.write(0, b"x" * (5 * BLOCK))
        vol.flush()
        vol.truncate(BLOCK + 100)
        assert vol.size == BLOCK + 100
        vol.truncate(4 * BLOCK)
        assert vol.read(0, BLOCK) == b"x" * BLOCK
        assert vol.read(BLOCK, 100) == b"x" * 100
        assert vol.read(BLOCK + 100, 3 * BLOCK - 100) == bytes(3 * BLOCK - 100)
    with Volume.open(path, key=KEY) as vol:
        assert vol.size == 4 * BLOCK
        assert vol.read(BLOCK + 100, 200) == bytes(200)


def test_a_wrong_key_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    Volume.create(path, 1 << 20, key=KEY).close()
    with pytest.raises(WrongKey):
        Volume.open(path, key=bytes(32))
    with pytest.raises(WrongKey):
        Volume.open(path, passphrase="not a raw-key volume")


def test_a_passphrase_goes_through_scrypt(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    with Volume.create(path, 1 << 20, passphrase="correct horse", scrypt_log2_n=12) as vol:
        vol.write(0, b"secret")
    header = parse_header(path.read_bytes()[:BLOCK])
    assert header.kdf == 1 and header.scrypt_log2_n == 12 and header.scrypt_r == 8
    assert header.kdf_salt != bytes(32)
    with Volume.open(path, passphrase="correct horse") as vol:
        assert vol.read(0, 6) == b"secret"
    with pytest.raises(WrongKey):
        Volume.open(path, passphrase="correct horse!")


def test_a_file_that_is_no_volume(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(os.urandom(3 * BLOCK))
    with pytest.raises(NotAVolume):
        Volume.open(path, key=KEY)


def test_writes_beyond_the_capacity_are_refused(tmp_path: Path) -> None:
    with Volume.create(tmp_path / "vol", 10 * BLOCK, key=KEY) as vol:
        with pytest.raises(OSError) as info:
            vol.write(9 * BLOCK + 1, b"x" * BLOCK)
        assert info.value.errno == 27  # EFBIG
        vol.write_blocks(9, bytes(BLOCK))


def test_counters_only_grow_across_reopenings_and_crashes() -> None:
    """Nonce freshness: every open continues above everything any earlier session used."""
    key = Key.raw(KEY)
    with u.Engine("memdisk", files=[-1]) as eng:
        vol = Volume.create_on(eng, 1024, key)
        used_up_to = 0
        for session in range(6):
            for b in range(40):
                vol.write_blocks(b, os.urandom(BLOCK))
            if session % 2:
                vol.flush()
            used_up_to = vol.status().next_counter
            vol.close(discard=True)
            eng.crash(u.CRASH_REORDER, session)  # a power loss after each session
            vol = Volume.open_on(eng, key)
            assert vol.status().next_counter >= used_up_to, session
        vol.close()


def test_the_anchor_catches_a_whole_file_rollback(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    anchor_file = tmp_path / "anchor.json"
    with Volume.create(path, 1 << 20, key=KEY, anchor_file=anchor_file) as vol:
        vol.write(0, b"version 1")
    old_copy = path.read_bytes()
    with Volume.open(path, key=KEY, anchor_file=anchor_file) as vol:
        vol.write(0, b"version 2")
    anchor = read_anchor_file(anchor_file)
    assert anchor is not None
    path.write_bytes(old_copy)  # the storage host rolls the whole file back
    with pytest.raises(RollbackDetected):
        Volume.open(path, key=KEY, anchor_file=anchor_file)
    with pytest.raises(RollbackDetected):
        Volume.open(path, key=KEY, anchor=anchor)
    # without the anchor the old state is authentic: this is what the file alone cannot tell
    with Volume.open(path, key=KEY, readonly=True) as vol:
        assert vol.read(0, 9) == b"version 1"


def test_an_anchor_of_another_state_at_the_same_epoch_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Volume.create(a, 1 << 20, key=KEY) as vol:
        vol.write(0, b"one")
        anchor = vol.flush()
    b.write_bytes(a.read_bytes())
    with Volume.open(b, key=KEY) as vol:  # fork: b moves on, a moves on differently
        vol.write(0, b"two")
    with Volume.open(a, key=KEY) as vol:
        vol.write(0, b"three")
        fork_anchor = vol.flush()
    assert fork_anchor.epoch > anchor.epoch
    with pytest.raises(RollbackDetected, match="different state"):
        Volume.open(b, key=KEY, anchor=fork_anchor)


def test_a_second_writer_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    with Volume.create(path, 1 << 20, key=KEY):
        with pytest.raises(BlockingIOError):
            Volume.open(path, key=KEY)


def test_read_only_opens_refuse_writes(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    Volume.create(path, 1 << 20, key=KEY).close()
    with Volume.open(path, key=KEY, readonly=True) as vol:
        with pytest.raises(OSError):
            vol.write(0, b"x")


def test_o_direct_volumes_work(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    data = os.urandom(64 * BLOCK)
    with Volume.create(path, 1 << 22, key=KEY, direct=True) as vol:
        vol.write_blocks(3, data)
    with Volume.open(path, key=KEY, direct=True) as vol:
        assert vol.read_blocks(3, 64) == data


def test_integrity_failures_name_the_block_and_return_nothing(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    with Volume.create(path, 1 << 20, key=KEY) as vol:
        vol.write_blocks(7, b"\x11" * BLOCK)
        vol.write_blocks(8, b"\x22" * BLOCK)
    header = parse_header(path.read_bytes()[:BLOCK])
    raw = bytearray(path.read_bytes())
    # the first chunk: leaf slots 0 and 1, then data blocks 0..63 in slot 0
    page = header.data_base + 2 + 8
    raw[page * BLOCK + 5] ^= 1
    path.write_bytes(bytes(raw))
    with Volume.open(path, key=KEY) as vol:
        assert vol.read_blocks(7, 1) == b"\x11" * BLOCK
        out = bytearray(b"\xff" * (2 * BLOCK))
        with pytest.raises(IntegrityError) as info:
            vol.read_blocks_into(7, 2, out)
        assert info.value.block == 8 and "data block" in str(info.value)
        assert out == bytes(2 * BLOCK), "the destination is wiped, block 7 included"
