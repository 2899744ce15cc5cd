"""The sealed volume's two speed paths keep its guarantees: AES-GCM shared with a helper
thread on requests of 32 blocks or more (crypto_threads=2), and the sequential readahead
that reads the next range's ciphertext into staging between two calls. Both must return
exactly what one thread without readahead returns, detect tampering inside the shared or
read-ahead range (the whole output wiped), and never serve a read-ahead block that a write
has replaced since. Memory disk for the attacks (page pokes), a real file on io_uring for
the plain equality check."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from dvs.errors import IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, Key
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(120)

KEY = Key.raw(bytes(range(7, 39)))
RUN = 256  # blocks per call: four pipeline stages of 64, each shared with the helper
SLOTS = {"read_slots": 256, "write_slots": 1024, "crypto_threads": 2}


@pytest.fixture
def memdisk() -> Iterator[u.Engine]:
    engine = u.Engine("memdisk", files=[-1, -1], entries=64)
    try:
        yield engine
    finally:
        engine.close()


def _data(blocks: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, blocks * BLOCK, dtype=np.uint8).tobytes()


def _filled(engine: u.Engine, blocks: int) -> bytes:
    vol = Volume.create_on(engine, 8 * RUN, KEY, **SLOTS)
    data = _data(blocks, 1)
    for first in range(0, blocks, RUN):  # shared seals: 256 blocks per call
        vol.write_blocks(first, data[first * BLOCK : (first + RUN) * BLOCK])
    assert vol.status().blocks_sealed >= blocks
    vol.close()
    return data


def test_shared_and_readahead_reads_match_the_written_data(memdisk: u.Engine) -> None:
    data = _filled(memdisk, 4 * RUN)
    vol = Volume.open_on(memdisk, KEY, **SLOTS)
    try:
        out = bytearray(RUN * BLOCK)
        for rep in range(2):  # the second sweep starts where readahead went past the end
            for first in range(0, 4 * RUN, RUN):
                vol.read_blocks_into(first, RUN, out)
                assert out == data[first * BLOCK : (first + RUN) * BLOCK], (rep, first)
        # beyond the written data: zeros, whether read ahead or not
        vol.read_blocks_into(4 * RUN, RUN, out)
        assert not any(out)
    finally:
        vol.close()


def test_tampering_inside_a_read_ahead_range_is_detected_and_wiped(memdisk: u.Engine) -> None:
    _filled(memdisk, 4 * RUN)
    vol = Volume.open_on(memdisk, KEY, **SLOTS)
    victim = 2 * RUN + 77
    page = vol.locate(victim)
    assert page is not None
    original = memdisk.peek(0, page)
    vol.close()
    memdisk.poke(0, page, bytes([original[0] ^ 0x40]) + original[1:])
    vol = Volume.open_on(memdisk, KEY, **SLOTS)
    out = bytearray(RUN * BLOCK)
    try:
        vol.read_blocks_into(0, RUN, out)
        vol.read_blocks_into(RUN, RUN, out)
        # the tampered range's ciphertext was read ahead by the call before
        assert vol.io_stats().bytes_read >= 3 * RUN * BLOCK
        out[:] = b"\xaa" * len(out)
        with pytest.raises(IntegrityError) as err:
            vol.read_blocks_into(2 * RUN, RUN, out)
        assert err.value.block == victim
        assert not any(out), "a failing read returned bytes"
        # the other ranges still read, and the same range fails again without readahead
        vol.read_blocks_into(3 * RUN, RUN, out)
        with pytest.raises(IntegrityError):
            vol.read_blocks_into(2 * RUN, RUN, out)
    finally:
        vol.close()
        memdisk.poke(0, page, original)


def test_a_write_replaces_what_was_read_ahead(memdisk: u.Engine) -> None:
    data = bytearray(_filled(memdisk, 4 * RUN))
    vol = Volume.open_on(memdisk, KEY, **SLOTS)
    out = bytearray(RUN * BLOCK)
    try:
        vol.read_blocks_into(0, RUN, out)
        vol.read_blocks_into(RUN, RUN, out)  # [2*RUN, 3*RUN) in flight
        assert vol.io_stats().bytes_read >= 3 * RUN * BLOCK
        new = _data(40, 9)
        first = 2 * RUN + 100
        vol.write_blocks(first, new)  # 40 blocks: a shared seal too
        data[first * BLOCK : (first + 40) * BLOCK] = new
        vol.read_blocks_into(2 * RUN, RUN, out)
        assert out == data[2 * RUN * BLOCK : 3 * RUN * BLOCK]
        vol.flush()
    finally:
        vol.close()
    vol = Volume.open_on(memdisk, KEY, **SLOTS)
    try:
        vol.read_blocks_into(2 * RUN, RUN, out)
        assert out == data[2 * RUN * BLOCK : 3 * RUN * BLOCK]
    finally:
        vol.close()


def test_shared_seal_with_repeated_blocks_keeps_the_last(memdisk: u.Engine) -> None:
    vol = Volume.create_on(memdisk, 8 * RUN, KEY, **SLOTS)
    try:
        blocks = np.array([5, 6, 7] * 20 + list(range(100, 140)), dtype=np.uint64)
        data = _data(len(blocks), 3)
        vol.write_blocks_at(blocks, data)
        expect = {int(b): data[i * BLOCK : (i + 1) * BLOCK] for i, b in enumerate(blocks)}
        vol.flush()
        for b, want in expect.items():
            assert vol.read_blocks(b, 1) == want, b
    finally:
        vol.close()


def _helper_threads() -> int:
    """Live dvs-gcm threads of this process (a helper joined by an earlier close may still
    be listed for a moment, as an exiting task: state Z or X)."""
    live = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        live += name == "dvs-gcm" and state not in "ZX"
    return live


@pytest.mark.parametrize("direct", [False, True])
def test_file_volume_same_bytes_with_and_without_the_speed_paths(tmp_path, direct: bool) -> None:
    path = tmp_path / "v"
    data = _data(4 * RUN, 5)
    slots = {"read_slots": 256, "write_slots": 1024}
    with Volume.create(path, 8 * RUN * BLOCK, key=bytes(32), direct=direct, **slots) as vol:
        for first in range(0, 4 * RUN, RUN):
            vol.write_blocks(first, data[first * BLOCK : (first + RUN) * BLOCK])
    got = {}
    for threads, readahead in ((1, False), (2, True)):
        out = bytearray(4 * RUN * BLOCK)
        view = memoryview(out)
        with Volume.open(
            path,
            key=bytes(32),
            direct=direct,
            crypto_threads=threads,
            readahead=readahead,
            **slots,
        ) as vol:
            for first in range(0, 4 * RUN, RUN):
                vol.read_blocks_into(first, RUN, view[first * BLOCK : (first + RUN) * BLOCK])
            # the helper thread exists exactly when asked for (2 vCPUs here)
            helpers = _helper_threads()
            assert helpers == (1 if threads == 2 and (os.cpu_count() or 1) > 1 else 0)
        got[threads] = bytes(out)
    assert got[1] == got[2] == data


def test_tampered_file_block_read_ahead_per_stage_is_detected(tmp_path) -> None:
    """O_DIRECT volumes queue the readahead stage by stage, inside the current call."""
    path = tmp_path / "v"
    slots = {"read_slots": 256, "write_slots": 1024}
    with Volume.create(path, 8 * RUN * BLOCK, key=bytes(32), direct=True, **slots) as vol:
        for first in range(0, 4 * RUN, RUN):
            vol.write_blocks(first, _data(RUN, first))
        victim = 2 * RUN + 200
        vol.flush()
        page = vol.locate(victim)
    assert page is not None
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff", page * BLOCK + 99)
    finally:
        os.close(fd)
    out = bytearray(RUN * BLOCK)
    with Volume.open(path, key=bytes(32), direct=True, **slots) as vol:
        vol.read_blocks_into(0, RUN, out)
        vol.read_blocks_into(RUN, RUN, out)
        stats = vol.io_stats()  # read ahead: landed or in flight
        assert stats.bytes_read >= 3 * RUN * BLOCK or stats.in_flight > 0
        with pytest.raises(IntegrityError) as err:
            vol.read_blocks_into(2 * RUN, RUN, out)
        assert err.value.block == victim
        assert not any(out)
        vol.read_blocks_into(3 * RUN, RUN, out)
        assert out == _data(RUN, 3 * RUN)
