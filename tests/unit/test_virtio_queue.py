"""The C split-virtqueue walker, driven the way a guest drives it (the mock driver), against
plain memory of this process and of another process, with the spec-literal Python model
as the second opinion on every rule a hostile driver can break."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import (
    RULE_NAMES,
    VIRTIO_STATUS_NEEDS_RESET,
    VirtQueue,
    VirtqueueBroken,
    device_status,
)
from dvs.testing.remote_memory import forked_guest_memory
from dvs.virtio.reference import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    MockDriver,
    QueueBroken,
    ReferenceQueue,
    Rule,
)

pytestmark = pytest.mark.timeout(120)

MEM_SIZE = 1 << 21


def _key(chain: Any) -> tuple[int, tuple[tuple[int, int, bool], ...], bool]:
    return chain.head, tuple((s.gpa, s.length, s.writable) for s in chain.segments), chain.indirect


def test_a_driver_submits_direct_and_indirect_chains_and_gets_them_back() -> None:
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8)
    first = driver.add([b"header", b"payload"], [16])
    second = driver.add([b"x"], [4, 4], indirect=True)
    queue = VirtQueue(mem, **driver.layout)

    chains = queue.pop_all()
    assert [c.head for c in chains] == [first.head, second.head]
    assert [(s.length, s.writable) for s in chains[0].segments] == [
        (6, False),
        (7, False),
        (16, True),
    ]
    assert chains[1].indirect and chains[1].readable_bytes == 1 and chains[1].writable_bytes == 8
    assert mem.read(chains[0].segments[1].gpa, 7) == b"payload"
    assert queue.in_flight == 2 and queue.last_avail_idx == 2

    mem.write(chains[0].segments[2].gpa, b"A" * 16)
    queue.push([(second.head, 8), (first.head, 16)])
    used = driver.reap()
    assert [(u.id, u.length) for u in used] == [(second.head, 8), (first.head, 16)]
    assert driver.read_writable(first) == b"A" * 16
    assert queue.in_flight == 0 and queue.used_idx == 2
    assert queue.pop() is None


def test_pushing_a_chain_the_device_does_not_own_is_refused_and_writes_nothing() -> None:
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8)
    driver.add([b"a"], [1])
    queue = VirtQueue(mem, **driver.layout)
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(OSError):
        queue.push([(chain.head, 1), (chain.head, 1)])  # twice in one batch
    with pytest.raises(OSError):
        queue.push([(5, 1)])  # never popped
    assert driver.used_idx() == 0 and queue.in_flight == 1
    queue.push([(chain.head, 1)])
    assert driver.used_idx() == 1


def test_indices_wrap_at_65536() -> None:
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8)
    driver.set_avail_idx(65534)
    driver.last_used = 65534
    queue = VirtQueue(mem, **driver.layout, last_avail_idx=65534, used_idx=65534)
    heads = [driver.add([bytes([i])], [1]).head for i in range(4)]
    assert driver.avail_idx == 2
    chains = queue.pop_all()
    assert [c.head for c in chains] == heads
    queue.push([(c.head, 1) for c in chains])
    assert driver.used_idx() == 2
    assert [u.id for u in driver.reap()] == heads


def test_event_idx_notifies_exactly_when_the_driver_asked() -> None:
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=16)
    queue = VirtQueue(mem, **driver.layout)
    for _ in range(6):
        driver.add([b"r"], [1])
    chains = queue.pop_all()
    driver.set_used_event(2)  # "interrupt me once used idx passes 2"
    queue.push([(chains[0].head, 1)])
    assert queue.should_notify()  # the first notification is always sent
    queue.push([(chains[1].head, 1)])  # used idx 1 -> 2: entry 1 written, event 2 not reached
    assert not queue.should_notify()
    queue.push([(chains[2].head, 1), (chains[3].head, 1)])  # wrote entry 2 == used_event
    assert queue.should_notify()
    queue.push([(chains[4].head, 1)])
    assert not queue.should_notify()


def test_without_event_idx_the_no_interrupt_flag_is_honoured() -> None:
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8, features=1 << VIRTIO_F_VERSION_1)
    queue = VirtQueue(mem, **driver.layout)
    driver.add([b"r"], [1])
    driver.add([b"r"], [1])
    first, second = queue.pop_all()
    queue.push([(first.head, 1)])
    assert queue.should_notify()
    driver.set_avail_flags(1)
    queue.push([(second.head, 1)])
    assert not queue.should_notify()
    queue.disable_kicks()
    assert driver.used_flags() == 1
    assert not queue.enable_kicks()
    assert driver.used_flags() == 0


def test_enable_kicks_reports_buffers_published_meanwhile() -> None:
    """The lost-wake-up race: the driver publishes while the device is busy, sees no need
    to kick (the device asked for no kicks), so the device must notice when it re-enables."""
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8)
    queue = VirtQueue(mem, **driver.layout)
    driver.add([b"a"], [1])
    assert queue.pop() is not None
    assert not queue.enable_kicks()
    assert driver.avail_event() == 1  # kick me when you publish slot 1
    old = driver.avail_idx
    driver.add([b"b"], [1])
    assert driver.needs_kick(old)  # the driver would kick now ...
    assert queue.enable_kicks()  # ... and a device re-enabling late still sees the buffer


# --- every rule, broken on purpose --------------------------------------------------------

Scenario = Callable[[MockDriver, GuestMemory], dict[str, int]]


def _loop(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    buf = d.alloc(8)
    d.write_desc(0, buf, 8, DESC_F_NEXT, 1)
    d.write_desc(1, buf, 8, DESC_F_NEXT, 0)
    d.put_avail(0, 0)
    d.set_avail_idx(1)
    return {}


def _single(flags: int, addr: int | None = None, length: int = 8, nxt: int = 0) -> Scenario:
    def build(d: MockDriver, m: GuestMemory) -> dict[str, int]:
        d.write_desc(0, d.alloc(64) if addr is None else addr, length, flags, nxt)
        d.put_avail(0, 0)
        d.set_avail_idx(1)
        return {}

    return build


def _pair(first_flags: int, second_flags: int, second_len: int = 8, first_len: int = 8) -> Scenario:
    def build(d: MockDriver, m: GuestMemory) -> dict[str, int]:
        d.write_desc(0, d.alloc(16), first_len, first_flags | DESC_F_NEXT, 1)
        d.write_desc(1, d.alloc(16), second_len, second_flags, 0)
        d.put_avail(0, 0)
        d.set_avail_idx(1)
        return {}

    return build


def _indirect(entries: list[tuple[int, int, int]], table_len: int | None = None) -> Scenario:
    """One descriptor naming an indirect table of (length, flags, next) entries."""

    def build(d: MockDriver, m: GuestMemory) -> dict[str, int]:
        table = d.alloc(16 * max(1, len(entries)))
        for i, (length, flags, nxt) in enumerate(entries):
            m.write(table + 16 * i, d.alloc(16).to_bytes(8, "little"))
            m.write(table + 16 * i + 8, length.to_bytes(4, "little"))
            m.write(table + 16 * i + 12, flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))
        d.write_desc(
            0, table, 16 * len(entries) if table_len is None else table_len, DESC_F_INDIRECT
        )
        d.put_avail(0, 0)
        d.set_avail_idx(1)
        return {}

    return build


def _in_flight(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    head = d.add([b"a"], [1]).head
    d.put_avail(1, head)
    d.set_avail_idx(2)
    return {}


def _head_out_of_range(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    d.put_avail(0, d.size)
    d.set_avail_idx(1)
    return {}


def _ahead(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    d.set_avail_idx(d.size + 1)
    return {}


def _three(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    d.add([b"a", b"b"], [1])
    return {"max_segs": 2}


def _no_indirect(d: MockDriver, m: GuestMemory) -> dict[str, int]:
    d.add([b"a"], [1], indirect=True)
    return {"features": 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX}


SCENARIOS: dict[Rule, Scenario] = {
    Rule.QUEUE_SIZE: lambda d, m: {"size": 6},
    Rule.RING_ALIGNMENT: lambda d, m: {"avail": d.avail + 1},
    Rule.RING_OUTSIDE_MEMORY: lambda d, m: {"used": MEM_SIZE - 16},
    Rule.AVAIL_IDX_AHEAD: _ahead,
    Rule.HEAD_OUT_OF_RANGE: _head_out_of_range,
    Rule.HEAD_IN_FLIGHT: _in_flight,
    Rule.NEXT_OUT_OF_RANGE: _single(DESC_F_NEXT, nxt=8),
    Rule.CHAIN_TOO_LONG: _loop,
    Rule.CHAIN_OVER_DEVICE_LIMIT: _three,
    Rule.CHAIN_BYTES: _pair(0, 0, second_len=0xFFFFFFFF, first_len=2),
    Rule.BUFFER_OUTSIDE_MEMORY: _single(0, addr=MEM_SIZE - 4),
    Rule.READABLE_AFTER_WRITABLE: _pair(DESC_F_WRITE, 0),
    Rule.INDIRECT_NOT_NEGOTIATED: _no_indirect,
    Rule.INDIRECT_WITH_NEXT: _single(DESC_F_INDIRECT | DESC_F_NEXT, length=16, nxt=1),
    Rule.INDIRECT_NESTED: _indirect([(16, DESC_F_INDIRECT, 0)]),
    Rule.INDIRECT_LENGTH: _indirect([(8, 0, 0)], table_len=24),
    Rule.INDIRECT_OUTSIDE_MEMORY: _single(DESC_F_INDIRECT, addr=MEM_SIZE - 16, length=32),
}


def test_every_queue_rule_has_a_scenario_and_matching_names() -> None:
    queue_rules = {r for r in Rule if not r.name.startswith("CONSOLE")}
    assert set(SCENARIOS) == queue_rules
    assert set(RULE_NAMES) == {int(r) for r in Rule}


@pytest.mark.parametrize("rule", list(SCENARIOS), ids=lambda r: r.name.lower())
def test_a_broken_rule_stops_the_queue_for_good(rule: Rule) -> None:
    results = []
    for model in (VirtQueue, ReferenceQueue):
        mem = GuestMemory.local(MEM_SIZE)
        driver = MockDriver(mem, size=8)
        layout = driver.layout | SCENARIOS[rule](driver, mem)
        with pytest.raises((VirtqueueBroken, QueueBroken)) as info:
            queue: Any = model(mem, **layout)
            for _ in range(3):
                queue.pop()
        results.append((info.value.rule_id, info.value.detail))
        if model is VirtQueue and rule not in (Rule.QUEUE_SIZE, Rule.RING_ALIGNMENT,
                                               Rule.RING_OUTSIDE_MEMORY):  # fmt: skip
            assert queue.needs_reset and queue.rule == rule
            with pytest.raises(VirtqueueBroken):
                queue.pop()  # stays broken, even though nothing changed
            with pytest.raises(VirtqueueBroken):
                queue.enable_kicks()
            fresh = GuestMemory.local(MEM_SIZE)
            healthy = VirtQueue(fresh, **MockDriver(fresh, size=8).layout)
            assert device_status(0x0F, [healthy]) == 0x0F  # DRIVER_OK etc. untouched
            assert device_status(0x0F, [healthy, queue]) == 0x0F | VIRTIO_STATUS_NEEDS_RESET
        assert driver.used_idx() == 0  # nothing was handed back
    assert results[0] == results[1]
    assert results[0][0] == rule


def test_chain_through_the_main_table_then_an_indirect_table() -> None:
    """§2.7.5.3.2: zero or more chained descriptors followed by one indirect one."""
    mem = GuestMemory.local(MEM_SIZE)
    driver = MockDriver(mem, size=8)
    table = driver.alloc(32)
    a, b = driver.alloc(8), driver.alloc(8)
    mem.write(table, a.to_bytes(8, "little") + (8).to_bytes(4, "little") + b"\x01\x00\x01\x00")
    mem.write(table + 16, b.to_bytes(8, "little") + (8).to_bytes(4, "little") + b"\x02\x00\x00\x00")
    driver.write_desc(3, driver.alloc(16), 16, DESC_F_NEXT, 5)
    driver.write_desc(5, table, 32, DESC_F_INDIRECT | DESC_F_WRITE)  # WRITE ignored
    driver.put_avail(0, 3)
    driver.set_avail_idx(1)
    for model in (VirtQueue, ReferenceQueue):
        chain: Any = model(mem, **driver.layout).pop()
        assert chain.head == 3 and chain.indirect
        assert [(s.length, s.writable) for s in chain.segments] == [
            (16, False),
            (8, False),
            (8, True),
        ]


# --- the remote backend: the queue in another process's memory -----------------------------


def test_the_queue_works_on_another_process_memory() -> None:
    with forked_guest_memory(MEM_SIZE) as remote:
        driver = MockDriver(remote, size=16)
        subs = [driver.add([b"req%d" % i], [8], indirect=i % 2 == 1) for i in range(5)]
        queue = VirtQueue(remote, **driver.layout)
        reference = ReferenceQueue(remote, **driver.layout)
        chains = queue.pop_all()
        assert [_key(c) for c in chains] == [_key(reference.pop()) for _ in chains]
        for chain, sub in zip(chains, subs, strict=True):
            remote.write(chain.segments[-1].gpa, b"response")
            queue.push([(chain.head, 8)])
            assert driver.read_writable(sub) == b"response"
        assert [u.id for u in driver.reap()] == [s.head for s in subs]
        assert queue.should_notify()
        driver.add([b"x"], [1])
        assert queue.enable_kicks()
