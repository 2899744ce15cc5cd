"""Differential tests: the C virtqueue walker against the spec-literal Python model.

Hypothesis writes arbitrary (mostly hostile) descriptor tables, indirect tables and rings
into guest memory; both implementations walk the same bytes and must agree on everything
observable: the chains popped, the first broken rule and its offending value, the bytes they
write into the used ring, and every notification decision. A stateful test then drives
both in lockstep the way a (well-behaved) driver and device interleave.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import VirtQueue, VirtqueueBroken
from dvs.virtio.reference import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    MockDriver,
    QueueBroken,
    ReferenceQueue,
)

pytestmark = pytest.mark.timeout(600)

MEM = 0x10000
TWIN = 0x20000
DESC, AVAIL, USED, ARENA = 0x1000, 0x2000, 0x3000, 0x4000


def _key(chain: Any) -> tuple[Any, ...] | None:
    if chain is None:
        return None
    return chain.head, tuple((s.gpa, s.length, s.writable) for s in chain.segments), chain.indirect


addresses = st.one_of(
    st.integers(ARENA, MEM - 1),
    st.integers(MEM - 64, MEM + 64),
    st.integers(0, 2**64 - 1),
    st.sampled_from([DESC, AVAIL, USED, 0]),
)
lengths = st.one_of(
    st.integers(0, 64), st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 48, 0xFFFFFFFF])
)
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))


@st.composite
def descriptor(draw: st.DrawFn, size: int) -> bytes:
    nxt = draw(st.one_of(st.integers(0, max(0, size - 1)), st.integers(0, 0xFFFF)))
    return struct.pack("<QIHH", draw(addresses), draw(lengths), draw(flags), nxt)


@st.composite
def guest_image(draw: st.DrawFn) -> tuple[bytes, dict[str, int], int]:
    """A 64 KiB guest memory image holding a (possibly broken) queue, its layout, max_segs."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    image = bytearray(draw(st.binary(min_size=0, max_size=64)).ljust(MEM, b"\0"))
    for i in range(size):
        image[DESC + 16 * i : DESC + 16 * i + 16] = draw(descriptor(size))
    for _ in range(draw(st.integers(0, 3))):  # indirect tables somewhere in the arena
        base = draw(st.integers(ARENA // 16, (MEM - 256) // 16)) * 16
        for i in range(draw(st.integers(1, 8))):
            image[base + 16 * i : base + 16 * i + 16] = draw(descriptor(8))
    avail_idx = draw(st.one_of(st.integers(0, size + 2), st.integers(0, 0xFFFF)))
    struct.pack_into("<HH", image, AVAIL, draw(st.integers(0, 3)), avail_idx)
    for i in range(size):
        head = draw(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)))
        struct.pack_into("<H", image, AVAIL + 4 + 2 * i, head)
    struct.pack_into("<H", image, AVAIL + 4 + 2 * size, draw(st.integers(0, 0xFFFF)))
    features = 1 << VIRTIO_F_VERSION_1
    if draw(st.booleans()):
        features |= 1 << VIRTIO_F_INDIRECT_DESC
    if draw(st.booleans()):
        features |= 1 << VIRTIO_F_EVENT_IDX
    layout = {"size": size, "desc": DESC, "avail": AVAIL, "used": USED, "features": features}
    if draw(st.integers(0, 9)) == 0:  # now and then a broken layout
        layout[draw(st.sampled_from(["size", "desc", "avail", "used"]))] = draw(
            st.integers(0, MEM + 16)
        )
    max_segs = draw(st.sampled_from([1, 2, 3, 8, 1024]))
    return bytes(image), layout, max_segs


def _run(model: Any, image: bytes, layout: dict[str, int], max_segs: int, lens: list[int]) -> Any:
    """Everything observable of one implementation on one image."""
    mem = GuestMemory.local(MEM)
    mem.write(0, image)
    observed: list[Any] = []
    try:
        queue = model(mem, **layout, max_segs=max_segs)
    except (VirtqueueBroken, QueueBroken) as exc:
        return [("broken at set-up", exc.rule_id, exc.detail)]
    chains = []
    try:
        for _ in range(layout["size"] + 2):
            chain = queue.pop()
            observed.append(_key(chain))
            if chain is None:
                break
            chains.append(chain)
    except (VirtqueueBroken, QueueBroken) as exc:
        observed.append(("broken", exc.rule_id, exc.detail))
    # give the chains back in two batches, deciding on notifications after each
    half = len(chains) // 2
    for batch in (chains[half:], chains[:half]):
        if batch:
            queue.push([(c.head, lens[i % len(lens)]) for i, c in enumerate(batch)])
            observed.append(("notify", queue.should_notify()))
    try:
        observed.append(("kicks", queue.enable_kicks()))
    except (VirtqueueBroken, QueueBroken) as exc:
        observed.append(("kicks broken", exc.rule_id))
    observed.append(("used ring", mem.read(USED, 6 + 8 * layout["size"])))
    return observed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=guest_image(), lens=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4))
def test_c_and_reference_agree_on_arbitrary_guest_memory(
    case: tuple[bytes, dict[str, int], int], lens: list[int]
) -> None:
    image, layout, max_segs = case
    assert _run(VirtQueue, image, layout, max_segs, lens) == _run(
        ReferenceQueue, image, layout, max_segs, lens
    )


class DriverAndDevice(RuleBasedStateMachine):
    """A well-behaved driver and the device interleaving freely; C and model in lockstep."""

    @initialize(
        size=st.sampled_from([2, 4, 8, 16]),
        event_idx=st.booleans(),
        start=st.integers(0, 0xFFFF),
    )
    def setup(self, size: int, event_idx: bool, start: int) -> None:
        features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
        if event_idx:
            features |= 1 << VIRTIO_F_EVENT_IDX
        self.mem = GuestMemory.local(TWIN)
        self.driver = MockDriver(self.mem, size=size, features=features, span=TWIN - 0x1000)
        self.driver.set_avail_idx(start)  # a driver and device resuming at index `start`
        self.driver.last_used = start
        self.mem.write(self.driver.used + 2, start.to_bytes(2, "little"))
        self.twin = GuestMemory.local(TWIN)  # the reference's own copy of guest memory
        layout = self.driver.layout
        self.c = VirtQueue(self.mem, **layout, last_avail_idx=start, used_idx=start)
        self.ref = ReferenceQueue(self.twin, **layout, last_avail_idx=start, used_idx=start)
        self.popped: list[int] = []

    def _sync_twin(self) -> None:
        self.twin.write(0, self.mem.read(0, TWIN))

    @rule(
        readable=st.lists(st.binary(min_size=0, max_size=16), max_size=2),
        writable=st.lists(st.integers(0, 16), min_size=1, max_size=2),
        indirect=st.booleans(),
    )
    def driver_adds(self, readable: list[bytes], writable: list[int], indirect: bool) -> None:
        needed = 1 if indirect else len(readable) + len(writable)
        if len(readable) + len(writable) > self.driver.size:
            return  # a driver may not make such a chain (the rule tests cover that)
        if self.driver.free_descriptors() >= needed:  # else a real driver waits, too
            self.driver.add(readable, writable, indirect=indirect)

    @rule()
    def device_pops(self) -> None:
        self._sync_twin()
        a, b = self.c.pop(), self.ref.pop()
        assert _key(a) == _key(b)
        if a is not None:
            self.popped.append(a.head)

    @precondition(lambda self: self.popped)
    @rule(count=st.integers(1, 4), length=st.integers(0, 100), data=st.data())
    def device_pushes(self, count: int, length: int, data: st.DataObject) -> None:
        self._sync_twin()  # what the driver wrote since (suppression flags, used_event)
        order = data.draw(st.permutations(self.popped))
        batch = [(h, length) for h in order[:count]]
        self.c.push(batch)
        self.ref.push(batch)
        self.popped = [h for h in self.popped if h not in {h for h, _ in batch}]
        assert self.c.should_notify() == self.ref.should_notify()
        assert self.mem.read(self.driver.used, 4) == self.twin.read(self.driver.used, 4)

    @rule(event=st.integers(0, 0xFFFF), no_interrupt=st.booleans())
    def driver_changes_suppression(self, event: int, no_interrupt: bool) -> None:
        self.driver.set_used_event(event)
        self.driver.set_avail_flags(int(no_interrupt))

    @rule()
    def driver_reaps(self) -> None:
        self.driver.reap()

    @rule()
    def device_reenables_kicks(self) -> None:
        self._sync_twin()
        assert self.c.enable_kicks() == self.ref.enable_kicks()

    @invariant()
    def indices_agree(self) -> None:
        if hasattr(self, "c"):
            assert self.c.last_avail_idx == self.ref.last_avail_idx
            assert self.c.used_idx == self.ref.used_idx


TestDriverAndDevice = DriverAndDevice.TestCase
TestDriverAndDevice.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
