"""Tampering with a sealed volume is detected, every time.

The storage host is the attacker: it may flip any bit of any block the current state uses
(superblock, tree node, data), swap blocks, replay an older version of a block or of the
superblocks, or roll the whole file back. Each must end in ``IntegrityError`` naming what
failed (or, for a damaged superblock copy next to an intact one, a reported damage while
the newest state is still served); whole-file rollback is caught by the anchor, and the
test states that without one it is not.
The volume lives on the memory disk, so each attack is a page poke between two opens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.errors import IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, Key, VolumeHandle, parse_header
from dvs.shield.errors import RollbackDetected
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(300)

KEY = Key.raw(bytes(range(100, 132)))
CAPACITY = 40_000  # blocks: a 3-level tree


@dataclass
class Sealed:
    engine: u.Engine
    contents: dict[int, bytes]  # block -> the newest data
    live: list[int]  # pages the newest state uses
    size_blocks: int
    history: dict[int, dict[int, bytes]]  # epoch -> {page: bytes} snapshots of live pages
    anchor_epoch: int


def _build() -> Sealed:
    engine = u.Engine("memdisk", files=[-1, -1], entries=64)
    vol = Volume.create_on(engine, CAPACITY, KEY)
    contents: dict[int, bytes] = {}
    history: dict[int, dict[int, bytes]] = {}
    rng = __import__("random").Random(4)
    blocks = [0, 1, 2, 127, 128, 300, 16_383, 16_384, 39_999]
    for epoch_round in range(3):  # several epochs: blocks move between slots
        for b in blocks + rng.sample(range(CAPACITY), 20):
            data = os.urandom(BLOCK)
            vol.write_blocks(b, data)
            contents[b] = data
        vol.flush()
        live = vol.live_blocks()
        history[vol.epoch] = {p: engine.peek(0, p) for p in live}
        del epoch_round
    anchor_epoch = vol.epoch
    vol.close()
    check = Volume.open_on(engine, KEY, readonly=True)
    live = check.live_blocks()
    size_blocks = check.size // BLOCK
    check.close()
    return Sealed(engine, contents, live, size_blocks, history, anchor_epoch)


@pytest.fixture(scope="module")
def sealed() -> Iterator[Sealed]:
    s = _build()
    yield s
    s.engine.close()


def _read_everything(vol: Volume, contents: dict[int, bytes]) -> None:
    for b, data in contents.items():
        assert vol.read_blocks(b, 1) == data


def _outcome(s: Sealed, **open_args: object) -> str:
    """'refused' (open raised), 'read failed' (a read raised), 'damage reported' (open
    flagged a superblock copy, data still the newest) or 'undetected'."""
    try:
        vol = Volume.open_on(s.engine, KEY, readonly=True, **open_args)  # type: ignore[arg-type]
    except IntegrityError:
        return "refused"
    try:
        damage = vol.open_status.superblock_damage
        try:
            vol.verify()
            _read_everything(vol, s.contents)
        except IntegrityError:
            return "read failed"
        return "damage reported" if damage else "undetected"
    finally:
        vol.close(discard=True)


@contextmanager
def _with_page(s: Sealed, page: int, data: bytes) -> Iterator[None]:
    original = s.engine.peek(0, page)
    s.engine.poke(0, page, data)
    try:
        yield
    finally:
        s.engine.poke(0, page, original)


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_the_untampered_volume_reads_back(sealed: Sealed) -> None:
    assert _outcome(sealed) == "undetected"
    assert len(sealed.live) > len(sealed.contents)  # superblocks + nodes + data


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_bit_of_any_live_block_is_detected(sealed: Sealed, data: st.DataObject) -> None:
    page = data.draw(st.sampled_from(sealed.live), label="page")
    bit = data.draw(st.integers(0, BLOCK * 8 - 1), label="bit")
    original = sealed.engine.peek(0, page)
    sealed.engine.poke(0, page, _flip(original, bit))
    try:
        outcome = _outcome(sealed)
        strict = _outcome(sealed, strict=True)
    finally:
        sealed.engine.poke(0, page, original)
    if page in (0, 1):
        # one superblock copy damaged, the other intact: the damage is reported and the
        # newest state still served; a strict open refuses
        assert outcome in ("damage reported", "refused")
        assert strict == "refused"
    else:
        assert outcome in ("refused", "read failed"), (page, bit)


def test_every_bit_of_the_superblock_is_covered(sealed: Sealed) -> None:
    """All 32768 bits of superblock slot 0, exhaustively: none goes unnoticed."""
    original = sealed.engine.peek(0, 0)
    arena = u.Buffer(VolumeHandle.arena_bytes(32, 64))
    missed = []
    try:
        for bit in range(BLOCK * 8):
            sealed.engine.poke(0, 0, _flip(original, bit))
            try:
                vol = Volume.open_on(sealed.engine, KEY, readonly=True, arena=arena)
            except IntegrityError:
                continue
            if not vol.open_status.superblock_damage & 1 or vol.epoch != sealed.anchor_epoch:
                missed.append(bit)
            vol.close(discard=True)
    finally:
        sealed.engine.poke(0, 0, original)
    assert missed == []


def test_every_bit_of_a_data_block_is_covered(sealed: Sealed) -> None:
    vol = Volume.open_on(sealed.engine, KEY, readonly=True)
    try:
        block = 300
        page = _page_of(sealed, vol, block)
        original = sealed.engine.peek(0, page)
        for bit in range(BLOCK * 8):
            sealed.engine.poke(0, page, _flip(original, bit))
            with pytest.raises(IntegrityError) as info:
                vol.read_blocks(block, 1)
            assert info.value.block == block
        sealed.engine.poke(0, page, original)
        assert vol.read_blocks(block, 1) == sealed.contents[block]
    finally:
        vol.close(discard=True)


def _is_block(vol: Volume, page: int, block: int) -> bool:
    """Does physical `page` hold logical data `block` in the current state?"""
    engine = vol.engine
    original = engine.peek(0, page)
    engine.poke(0, page, bytes(BLOCK))
    try:
        vol.read_blocks(block, 1)
        return False
    except IntegrityError as exc:
        return exc.block == block
    finally:
        engine.poke(0, page, original)


def _data_base(s: Sealed) -> int:
    return parse_header(s.engine.peek(0, 0)).data_base


def _page_of(s: Sealed, vol: Volume, block: int) -> int:
    base = _data_base(s)
    return next(p for p in s.live if p >= base and _is_block(vol, p, block))


def test_swapped_blocks_are_detected(sealed: Sealed) -> None:
    vol = Volume.open_on(sealed.engine, KEY, readonly=True)
    try:
        a, b = _page_of(sealed, vol, 127), _page_of(sealed, vol, 128)
        pa, pb = sealed.engine.peek(0, a), sealed.engine.peek(0, b)
        sealed.engine.poke(0, a, pb)
        sealed.engine.poke(0, b, pa)
        try:
            for block in (127, 128):
                with pytest.raises(IntegrityError) as info:
                    vol.read_blocks(block, 1)
                assert info.value.block == block
        finally:
            sealed.engine.poke(0, a, pa)
            sealed.engine.poke(0, b, pb)
    finally:
        vol.close(discard=True)


def test_a_replayed_old_version_of_a_block_is_detected() -> None:
    with u.Engine("memdisk", files=[-1]) as engine:
        vol = Volume.create_on(engine, 1000, KEY)
        vol.write_blocks(5, b"old!" * 1024)
        vol.flush()
        before = {p: engine.peek(0, p) for p in vol.live_blocks()}
        vol.write_blocks(5, b"mid!" * 1024)  # goes to the other slot
        vol.flush()
        vol.write_blocks(5, b"new!" * 1024)  # back to the first slot
        vol.flush()
        after = vol.live_blocks()
        vol.close()
        # the page that held "old!" holds "new!" now: put the old ciphertext back
        replayed = [p for p in after if p in before and p > 2 and engine.peek(0, p) != before[p]]
        assert replayed
        for p in replayed:
            engine.poke(0, p, before[p])
        with pytest.raises(IntegrityError):
            v2 = Volume.open_on(engine, KEY)
            try:
                v2.read_blocks(5, 1)
            finally:
                v2.close(discard=True)


def test_a_replayed_old_tree_node_is_detected(sealed: Sealed) -> None:
    oldest = min(sealed.history)
    stale_nodes = [
        p
        for p, data in sealed.history[oldest].items()
        if 2 <= p < _data_base(sealed) and p in sealed.live and sealed.engine.peek(0, p) != data
    ]
    assert stale_nodes, "some tree node moved back into a slot it used two epochs ago"
    page = stale_nodes[0]
    with _with_page(sealed, page, sealed.history[oldest][page]):
        assert _outcome(sealed) in ("refused", "read failed")


def test_replayed_superblocks_are_caught_by_the_anchor(sealed: Sealed) -> None:
    oldest = min(sealed.history)
    anchor_vol = Volume.open_on(sealed.engine, KEY, readonly=True)
    anchor = anchor_vol.anchor
    anchor_vol.close(discard=True)
    old0, old1 = sealed.history[oldest][0], sealed.history[oldest][1]
    with _with_page(sealed, 0, old0), _with_page(sealed, 1, old1):
        # without an anchor the old superblocks point at tree nodes that were since
        # overwritten, or at an older authentic state; with it, always refused
        with pytest.raises(RollbackDetected):
            Volume.open_on(sealed.engine, KEY, readonly=True, anchor=anchor)


def test_superblock_copies_moved_between_slots_are_detected(sealed: Sealed) -> None:
    s0, s1 = sealed.engine.peek(0, 0), sealed.engine.peek(0, 1)
    with _with_page(sealed, 1, s0):
        assert _outcome(sealed) == "damage reported"
    with _with_page(sealed, 0, s1), _with_page(sealed, 1, s0):
        assert _outcome(sealed) == "refused"


def test_whole_file_rollback_needs_the_anchor() -> None:
    with u.Engine("memdisk", files=[-1, -1]) as engine:
        vol = Volume.create_on(engine, 1000, KEY)
        vol.write_blocks(0, b"v1" * 2048)
        vol.flush()
        vol.close()
        engine.snapshot(0, 1)  # the host keeps a copy of the whole file
        vol = Volume.open_on(engine, KEY)
        vol.write_blocks(0, b"v2" * 2048)
        anchor = vol.flush()
        vol.close()
        engine.snapshot(1, 0)  # ... and later puts it back
        with pytest.raises(RollbackDetected):
            Volume.open_on(engine, KEY, anchor=anchor)
        # stated plainly: without trusted state the old file is a valid, older volume
        old = Volume.open_on(engine, KEY, readonly=True)
        assert old.read_blocks(0, 1) == b"v1" * 2048
        old.close(discard=True)


def test_a_truncated_file_is_detected(sealed: Sealed) -> None:
    vol = Volume.open_on(sealed.engine, KEY, readonly=True)
    try:
        page = _page_of(sealed, vol, 39_999)
        with _with_page(sealed, page, bytes(BLOCK)):  # a hole reads as zeros
            with pytest.raises(IntegrityError) as info:
                vol.read_blocks(39_999, 1)
            assert info.value.block == 39_999
    finally:
        vol.close(discard=True)
