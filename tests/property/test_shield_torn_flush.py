"""Torn flushes: the superblock of a flush reaches the disk, some of its other writes do not.

A flush writes its data, its tree nodes and the new superblock, then issues ONE fdatasync.
Before that sync completes, the disk may persist any subset of those writes, in any order --
in particular the new superblock without some block or node it names. These tests stop a
flush right before its sync (the memory disk's "writer dies at the next sync"), then decide
the fate of every unflushed write one by one (lost, kept, torn at 512-byte sectors) and
reopen. The volume must open as of the previous flush unless every write of the new one is
there whole, report the discarded superblock as damage, never raise an integrity error, and
never reuse a nonce afterwards.
"""

from __future__ import annotations

import itertools
import random

import pytest

from dvs.errors import IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, VERIFY_LIMIT, Key
from dvs.shield.errors import NotAVolume
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(300)

KEY = Key.raw(bytes(range(200, 232)))
CAPACITY = 400  # blocks: four leaves under a root
SUPERBLOCK_PAGES = (0, 1)
FATES = (u.FATE_DROP, u.FATE_KEEP, u.FATE_TEAR)


def _block(tag: int) -> bytes:
    return bytes([tag]) * BLOCK


def _base(engine: u.Engine) -> dict[int, bytes]:
    """A volume with some flushed history on file 0, copied to file 1 as the pristine image."""
    vol = Volume.create_on(engine, CAPACITY, KEY)
    contents = {}
    for b in (3, 4, 130, 390):
        vol.write_blocks(b, _block(b % 251 + 1))
        contents[b] = _block(b % 251 + 1)
    vol.flush()
    vol.write_blocks(4, _block(77))  # a second epoch: both slots of block 4 in use
    contents[4] = _block(77)
    vol.flush()
    vol.close()
    engine.snapshot(0, 1)
    return contents


def _torn_flush(engine: u.Engine, writes: dict[int, bytes]) -> tuple[int, list[tuple[int, int]]]:
    """Reopen the pristine image, write, and flush with the writer dying at the sync.
    Returns the epoch the flush was committing and the unflushed (file, page) writes."""
    engine.snapshot(1, 0)
    vol = Volume.open_on(engine, KEY)
    for b, data in writes.items():
        vol.write_blocks(b, data)
    epoch = vol.epoch + 1
    engine.fail_at_sync()
    with pytest.raises(OSError):
        vol.flush()
    vol.close(discard=True)
    return epoch, engine.unflushed_pages()


def _state(vol: Volume, blocks: set[int]) -> dict[int, bytes]:
    return {b: vol.read_blocks(b, 1) for b in sorted(blocks)}


def test_every_fate_of_every_write_of_a_flush() -> None:
    """Exhaustive over {lost, kept, torn} for each non-superblock write of a small flush,
    with the superblock kept, lost or torn: the new state appears only when the
    superblock and every other write arrived whole."""
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        base = _base(engine)
        new_writes = {4: _block(201), 5: _block(202), 131: _block(203)}
        blocks = set(base) | set(new_writes)
        old = {b: base.get(b, bytes(BLOCK)) for b in blocks}
        new = {**old, **new_writes}
        epoch, pages = _torn_flush(engine, new_writes)
        sb_at = [i for i, (_f, p) in enumerate(pages) if p in SUPERBLOCK_PAGES]
        others = [i for i in range(len(pages)) if i not in sb_at]
        # 3 data blocks, 2 leaves, the root; one superblock
        assert len(sb_at) == 1 and len(others) == 6, pages
        engine.crash(u.CRASH_DROP_ALL, 0)
        outcomes = {"old": 0, "new": 0}
        for sb_fate in FATES:
            for combo in itertools.product(FATES, repeat=len(others)):
                fates = [0] * len(pages)
                fates[sb_at[0]] = sb_fate
                for i, fate in zip(others, combo, strict=True):
                    fates[i] = fate
                got_epoch, got_pages = _torn_flush(engine, new_writes)
                assert (got_epoch, got_pages) == (epoch, pages)  # the same flush each time
                engine.crash_fates(fates, seed=sum(f << (2 * i) for i, f in enumerate(fates)))
                vol = Volume.open_on(engine, KEY, readonly=True)
                try:
                    found = _state(vol, blocks)
                    vol.verify()
                    whole = all(f == u.FATE_KEEP for f in combo)
                    if found == new:
                        assert whole and sb_fate != u.FATE_DROP, fates
                        assert vol.epoch == epoch
                        outcomes["new"] += 1
                    else:
                        assert found == old, fates
                        assert not (whole and sb_fate == u.FATE_KEEP), fates
                        assert vol.epoch == epoch - 1
                        if sb_fate == u.FATE_KEEP:
                            # the new superblock authenticated but its flush was torn:
                            # discarded, and said so
                            assert vol.open_status.torn_epoch == epoch, fates
                            assert vol.open_status.superblock_damage, fates
                        outcomes["old"] += 1
                finally:
                    vol.close(discard=True)
        assert outcomes["new"] >= 1 and outcomes["old"] > 2000, outcomes


def test_a_strict_open_refuses_a_torn_flush() -> None:
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        _base(engine)
        _epoch, pages = _torn_flush(engine, {5: _block(9)})
        fates = [u.FATE_KEEP if p in SUPERBLOCK_PAGES else u.FATE_DROP for _f, p in pages]
        engine.crash_fates(fates)
        with pytest.raises(IntegrityError):
            Volume.open_on(engine, KEY, strict=True)
        Volume.open_on(engine, KEY).close()


def test_after_a_torn_flush_no_counter_is_used_twice() -> None:
    """The counters the torn flush sealed with lie below the durable reservation; the
    reopened volume continues above every reservation, also the discarded superblock's."""
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        _base(engine)
        engine.snapshot(1, 0)
        vol = Volume.open_on(engine, KEY)
        vol.write_blocks(5, _block(1))
        used_up_to = vol.status().next_counter
        engine.fail_at_sync()
        with pytest.raises(OSError):
            vol.flush()
        vol.close(discard=True)
        pages = engine.unflushed_pages()
        engine.crash_fates(
            [u.FATE_KEEP if p in SUPERBLOCK_PAGES else u.FATE_DROP for _f, p in pages]
        )
        vol = Volume.open_on(engine, KEY)
        assert vol.open_status.torn_epoch
        assert vol.status().next_counter >= used_up_to
        vol.write_blocks(5, _block(2))
        vol.flush()
        assert vol.read_blocks(5, 1) == _block(2)
        vol.close()


def test_the_torn_flush_slot_is_reused_and_both_states_stay_readable() -> None:
    """After falling back, the next flush goes into the damaged slot, never over the state
    the open chose; crashing that flush the same way falls back to the same state."""
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        old = _base(engine)
        for _round in range(3):
            _epoch, pages = _torn_flush(engine, {5: _block(3), 6: _block(4)})
            engine.crash_fates(
                [u.FATE_KEEP if p in SUPERBLOCK_PAGES else u.FATE_TEAR for _f, p in pages],
                seed=_round,
            )
            engine.snapshot(0, 1)  # the next round starts from the crashed image
            vol = Volume.open_on(engine, KEY, readonly=True)
            assert _state(vol, set(old) | {5, 6}) == {**old, 5: bytes(BLOCK), 6: bytes(BLOCK)}
            vol.close(discard=True)


def test_a_lazily_formatted_volume_whose_first_flush_tears() -> None:
    """A journal-like volume (no sync at format): if its first flush is torn, it opens
    empty when the format's other superblock copy survived, else it is no volume yet --
    never an integrity error."""
    rng = random.Random(11)
    seen = set()
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        for trial in range(300):
            engine.snapshot(1, 0)  # a new, empty file (file 1 stays empty)
            vol = Volume.create_on(engine, CAPACITY, KEY, lazy=True)
            vol.write_blocks(7, _block(trial % 250 + 1))
            engine.fail_at_sync()
            with pytest.raises(OSError):
                vol.flush()
            vol.close(discard=True)
            pages = engine.unflushed_pages()
            engine.crash_fates([rng.choice(FATES) for _ in pages], seed=trial)
            try:
                vol = Volume.open_on(engine, KEY, readonly=True)
            except NotAVolume:
                seen.add("no volume")
                continue
            try:
                data = vol.read_blocks(7, 1) if vol.size else b""
                assert data in (b"", _block(trial % 250 + 1)), trial
                seen.add("new" if data else "empty")
                vol.verify()
            finally:
                vol.close(discard=True)
    assert seen == {"no volume", "empty", "new"}, seen


@pytest.mark.parametrize("blocks", [8, VERIFY_LIMIT + 64])
def test_a_flush_costs_one_fdatasync_unless_it_is_too_large_to_check(blocks: int) -> None:
    with u.Engine("memdisk", files=[-1], entries=64) as engine:
        vol = Volume.create_on(engine, 8192, KEY, write_slots=256)
        vol.write_blocks(0, bytes(BLOCK))
        vol.flush()
        before = vol.status().syncs
        for first in range(0, blocks, 256):
            n = min(256, blocks - first)
            vol.write_blocks(first, bytes([5]) * (n * BLOCK))
        vol.flush()
        syncs = vol.status().syncs - before
        vol.close()
        assert syncs == (1 if blocks <= VERIFY_LIMIT else 2)
        # either way the next open authenticates at most VERIFY_LIMIT blocks
        vol = Volume.open_on(engine, KEY, readonly=True)
        assert vol.open_status.open_verified <= VERIFY_LIMIT + 64
        vol.close()
