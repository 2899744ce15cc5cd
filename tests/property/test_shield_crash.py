"""Crash consistency of sealed volumes against a model, on the fault-injecting memory disk.

Model: the bytes of the volume as of the last acknowledged flush ("committed") and as
written since ("current"). The disk may lose power at any moment -- dropping, keeping,
reordering or tearing (at 512-byte sectors) any writes not yet covered by a completed
fdatasync -- and the writer may die in the middle of a flush (every request after the N-th
fails and changes nothing). After each such crash the volume must open, authenticate
everything, and hold exactly the committed bytes, or -- for a flush that was cut short --
either the committed or the new state, never a mixture, never an integrity error. A flush
has one fdatasync, after its data, nodes and superblock: the "torn flush" rule keeps the
superblock and decides the fate of each other write (tests/property/test_shield_torn_flush.py
enumerates them exhaustively for one flush).

A hypothesis state machine explores interleavings; a seeded loop adds thousands of crashes.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dvs.errors import IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, Key
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(600)

KEY = Key.raw(bytes(range(7, 39)))
CAPACITY = 400  # blocks: leaves and an inner level
CRASH_MODES = [u.CRASH_DROP_ALL, u.CRASH_KEEP_SOME, u.CRASH_REORDER, u.CRASH_TEAR]
FATES = [u.FATE_DROP, u.FATE_KEEP, u.FATE_TEAR]


def _contents(vol: Volume) -> bytes:
    return vol.read(0, vol.size)


class Model:
    def __init__(self) -> None:
        self.current = bytearray()
        self.committed = bytearray()

    def pwrite(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.current):
            self.current.extend(bytes(end - len(self.current)))
        self.current[offset:end] = data

    def truncate(self, size: int) -> None:
        if size < len(self.current):
            del self.current[size:]
        else:
            self.current.extend(bytes(size - len(self.current)))


class SealedVolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = u.Engine("memdisk", files=[-1], entries=16)
        # small arenas: write slots fill up and get written before a flush
        self.vol = Volume.create_on(self.engine, CAPACITY, KEY, read_slots=4, write_slots=8)
        self.model = Model()
        self.crashes = 0

    def _reopen(self) -> None:
        self.vol = Volume.open_on(self.engine, KEY, read_slots=4, write_slots=8)

    @rule(
        block=st.integers(0, CAPACITY - 8),
        count=st.integers(1, 8),
        fill=st.integers(0, 255),
        submit=st.booleans(),
    )
    def write_blocks(self, block: int, count: int, fill: int, submit: bool) -> None:
        data = bytes([fill]) * (count * BLOCK)
        self.vol.write_blocks(block, data, submit=submit)
        self.model.pwrite(block * BLOCK, data)

    @rule(
        offset=st.integers(0, CAPACITY * BLOCK - 10_000),
        data=st.binary(min_size=1, max_size=9000),
    )
    def write_bytes(self, offset: int, data: bytes) -> None:
        self.vol.write(offset, data)
        self.model.pwrite(offset, data)

    @rule(size=st.integers(0, CAPACITY * BLOCK))
    def truncate(self, size: int) -> None:
        self.vol.truncate(size)
        self.model.truncate(size)

    @rule()
    def flush(self) -> None:
        self.vol.flush()
        self.model.committed = bytearray(self.model.current)

    @rule(mode=st.sampled_from(CRASH_MODES), seed=st.integers(0, 2**32))
    def power_loss(self, mode: int, seed: int) -> None:
        self.vol.close(discard=True)
        self.engine.crash(mode, seed)
        self.crashes += 1
        self._reopen()
        assert _contents(self.vol) == bytes(self.model.committed)
        self.model.current = bytearray(self.model.committed)

    @rule(
        after=st.integers(0, 40),
        mode=st.sampled_from(CRASH_MODES),
        seed=st.integers(0, 2**32),
    )
    def die_during_flush(self, after: int, mode: int, seed: int) -> None:
        self.engine.fail_after(after)
        flushed = True
        try:
            self.vol.flush()
        except (OSError, IntegrityError):
            flushed = False
        self.vol.close(discard=True)
        self.engine.crash(mode, seed)
        self._check_after_crash(flushed)

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def torn_flush(self, data: st.DataObject, seed: int) -> None:
        """The flush's writes all reach the write cache, the writer dies at its one sync,
        and the power loss keeps the new superblock but loses, keeps or tears each of the
        flush's other writes."""
        self.engine.fail_at_sync()
        try:
            self.vol.flush()
            flushed = True  # nothing to flush: no sync was needed
        except (OSError, IntegrityError):
            flushed = False
        self.vol.close(discard=True)
        pages = self.engine.unflushed_pages()
        fates = [
            u.FATE_KEEP if page in (0, 1) else data.draw(st.sampled_from(FATES), label="fate")
            for _file, page in pages
        ]
        self.engine.crash_fates(fates, seed)
        self._check_after_crash(flushed)

    def _check_after_crash(self, flushed: bool) -> None:
        """Reopen after a crash: a flush that returned is durable whatever the power loss
        dropped afterwards; one that failed left the volume at either side of it."""
        self.crashes += 1
        self._reopen()
        found = _contents(self.vol)
        if flushed:
            assert found == bytes(self.model.current)
        else:
            assert found in (bytes(self.model.committed), bytes(self.model.current))
        self.model.committed = bytearray(found)
        self.model.current = bytearray(found)

    @rule()
    def clean_reopen(self) -> None:
        self.vol.close()
        self.model.committed = bytearray(self.model.current)
        self._reopen()

    @precondition(lambda self: len(self.model.current) > 0)
    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        size = len(self.model.current)
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(20_000, size - offset)))
        assert self.vol.read(offset, length) == bytes(self.model.current[offset : offset + length])

    @invariant()
    def size_matches(self) -> None:
        assert self.vol.size == len(self.model.current)

    def teardown(self) -> None:
        self.vol.close(discard=True)
        self.engine.close()


TestSealedVolumeMachine = SealedVolumeMachine.TestCase
TestSealedVolumeMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def test_thousands_of_injected_crashes() -> None:
    """2,000 seeded crash trials: random writes, a flush cut short at a random request,
    a random kind of power loss; the state is always one of the two flush boundaries."""
    rng = random.Random(20261126)
    engine = u.Engine("memdisk", files=[-1], entries=32)
    vol = Volume.create_on(engine, CAPACITY, KEY, read_slots=8, write_slots=16)
    committed = _contents(vol)
    outcomes = {"old": 0, "new": 0}
    try:
        for trial in range(2000):
            for _ in range(rng.randint(1, 12)):
                offset = rng.randrange(0, (CAPACITY - 4) * BLOCK)
                vol.write(offset, rng.randbytes(rng.randint(1, 3 * BLOCK)))
            if rng.random() < 0.2:
                vol.truncate(rng.randrange(0, CAPACITY * BLOCK))
            current = _contents(vol)
            engine.fail_after(rng.randint(0, 60))
            try:
                vol.flush()
                flushed = True
            except (OSError, IntegrityError):
                flushed = False
            vol.close(discard=True)
            engine.crash(rng.choice(CRASH_MODES), rng.getrandbits(64))
            vol = Volume.open_on(engine, KEY, read_slots=8, write_slots=16)
            found = _contents(vol)
            vol.verify()  # every block and node authenticates
            if flushed:
                assert found == current, trial
            assert found in (committed, current), trial
            outcomes["new" if found == current else "old"] += 1
            committed = found
    finally:
        vol.close(discard=True)
        engine.close()
    # both branches were exercised: flushes that made it and flushes that did not
    assert outcomes["old"] > 100 and outcomes["new"] > 100, outcomes
