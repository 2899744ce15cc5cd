"""A spec-literal Python model of a split virtqueue (device side) and a mock driver.

Virtio 1.2 §2.7 in plain Python, for differential tests against the C walker
(``dvs.lowlevel.virtio.VirtQueue``) -- never for production. Each rule a driver must follow
is a ``Rule`` member whose number matches the C code (``DVS_VQ_ERR_*``); the model checks
them in the same order as the C walker, so both must agree on every input: the same chains,
or the same first broken rule with the same offending value.

``MockDriver`` plays the guest's part: it lays out a descriptor table, available ring and
used ring in guest memory the way a driver does (§2.7.13: place buffers, publish heads,
then the index), submits buffers with direct or indirect descriptors, reads the used ring
back, and can also write any raw value a hostile driver might. It works on any ``Memory``:
``GuestMemory.local(...)`` for tests, or a remote ``GuestMemory`` of another process.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from dvs.errors import GuestProtocolError

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DEVICE_MAX_SEGS = 1024


class Rule(IntEnum):
    """Driver rules of §2.7 (and the console's §5.3.6.1), numbered as in the C walker."""

    QUEUE_SIZE = 1
    """§2.7: Queue Size is a power of 2, at most 32768."""
    RING_ALIGNMENT = 2
    """§2.7.1: descriptor table 16-, available ring 2-, used ring 4-byte aligned."""
    RING_OUTSIDE_MEMORY = 3
    """Each ring area is physically contiguous guest memory."""
    AVAIL_IDX_AHEAD = 4
    """§2.7.13: at most Queue Size buffers can be outstanding."""
    HEAD_OUT_OF_RANGE = 5
    """An available ring entry names a descriptor of the table."""
    HEAD_IN_FLIGHT = 6
    """A chain the device owns (not yet used) is not made available again."""
    NEXT_OUT_OF_RANGE = 7
    """``next`` names a descriptor of the same table."""
    CHAIN_TOO_LONG = 8
    """§2.7.5.3.1: no chain longer than the Queue Size (so no loops)."""
    CHAIN_OVER_DEVICE_LIMIT = 9
    """§2.7.4.1: the device MAY limit the descriptors it allows in a chain."""
    CHAIN_BYTES = 10
    """§2.7.5.1: no chain longer than 2^32 bytes in total."""
    BUFFER_OUTSIDE_MEMORY = 11
    """A buffer is guest memory."""
    READABLE_AFTER_WRITABLE = 12
    """§2.7.4.2: device-writable elements follow all device-readable ones."""
    INDIRECT_NOT_NEGOTIATED = 13
    """§2.7.5.3.1: INDIRECT only with VIRTIO_F_INDIRECT_DESC."""
    INDIRECT_WITH_NEXT = 14
    """§2.7.5.3.1: not both INDIRECT and NEXT."""
    INDIRECT_NESTED = 15
    """§2.7.5.3.1: no INDIRECT within an indirect table."""
    INDIRECT_LENGTH = 16
    """The indirect table holds whole 16-byte descriptors, at least one."""
    INDIRECT_OUTSIDE_MEMORY = 17
    """The indirect table is guest memory."""
    CONSOLE_RX_READABLE = 32
    """§5.3.6.1: no device-readable buffer in a receiveq."""
    CONSOLE_TX_WRITABLE = 33
    """§5.3.6.1: no device-writable buffer in a transmitq."""


class Memory(Protocol):
    """What the model needs of guest memory (``GuestMemory`` provides it)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def contains(self, gpa: int, length: int) -> bool: ...


class QueueBroken(GuestProtocolError):
    """The driver broke ``rule``; ``detail`` is the offending value (as in the C walker)."""

    def __init__(self, rule: Rule, detail: int) -> None:
        self.rule_id = int(rule)
        self.detail = detail
        super().__init__(rule.name.lower().replace("_", " "), f"offending value {detail:#x}")


@dataclass(frozen=True)
class Segment:
    gpa: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    head: int
    segments: tuple[Segment, ...]
    indirect: bool


@dataclass(frozen=True)
class Descriptor:
    addr: int
    length: int
    flags: int
    next: int

    @classmethod
    def unpack(cls, raw: bytes) -> Descriptor:
        return cls(*struct.unpack("<QIHH", raw))

    def pack(self) -> bytes:
        return struct.pack("<QIHH", self.addr, self.length, self.flags, self.next)


def need_event(event: int, new: int, old: int) -> bool:
    """§2.7.10: notify iff ``event`` lies in [old, new) modulo 2^16."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class ReferenceQueue:
    """The device side of a split virtqueue, rule by rule (see the module note)."""

    def __init__(
        self,
        mem: Memory,
        *,
        size: int,
        desc: int,
        avail: int,
        used: int,
        features: int,
        max_segs: int = DEVICE_MAX_SEGS,
        last_avail_idx: int = 0,
        used_idx: int = 0,
    ) -> None:
        self.mem = mem
        self.rule: Rule | None = None
        self.detail = 0
        self.max_segs = max_segs
        if not (0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            self._fail(Rule.QUEUE_SIZE, size if size <= 0xFFFF else 0)
        for address, alignment in ((desc, 16), (avail, 2), (used, 4)):
            if address % alignment:
                self._fail(Rule.RING_ALIGNMENT, address)
        for address, length in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            if not mem.contains(address, length):
                self._fail(Rule.RING_OUTSIDE_MEMORY, address)
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        self.last_avail_idx = last_avail_idx
        self.used_idx = used_idx
        self.signalled_used = 0
        self.signalled_valid = False
        self.owned: set[int] = set()

    def _fail(self, rule: Rule, detail: int) -> None:
        if self.rule is None:
            self.rule, self.detail = rule, detail
        raise QueueBroken(self.rule, self.detail)

    def _u16(self, gpa: int) -> int:
        value: int = struct.unpack("<H", self.mem.read(gpa, 2))[0]
        return value

    # --- popping -----------------------------------------------------------------------------

    def pop(self) -> Chain | None:
        if self.rule is not None:
            raise QueueBroken(self.rule, self.detail)
        avail_idx = self._u16(self.avail + 2)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            self._fail(Rule.AVAIL_IDX_AHEAD, avail_idx)
        if pending == 0:
            return None
        head = self._u16(self.avail + 4 + 2 * (self.last_avail_idx % self.size))
        if head >= self.size:
            self._fail(Rule.HEAD_OUT_OF_RANGE, head)
        if head in self.owned:
            self._fail(Rule.HEAD_IN_FLIGHT, head)
        chain = self._walk(head)
        self.owned.add(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> Chain:
        table, entries, index = self.desc, self.size, head
        in_indirect = seen_writable = False
        buffers = total = 0
        segments: list[Segment] = []
        while True:
            d = Descriptor.unpack(self.mem.read(table + 16 * index, 16))
            if d.flags & DESC_F_INDIRECT:
                if in_indirect:
                    self._fail(Rule.INDIRECT_NESTED, index)
                if not self.indirect:
                    self._fail(Rule.INDIRECT_NOT_NEGOTIATED, index)
                if d.flags & DESC_F_NEXT:
                    self._fail(Rule.INDIRECT_WITH_NEXT, index)
                if d.length == 0 or d.length % 16:
                    self._fail(Rule.INDIRECT_LENGTH, d.length)
                if not self.mem.contains(d.addr, d.length):
                    self._fail(Rule.INDIRECT_OUTSIDE_MEMORY, d.addr)
                in_indirect = True
                table, entries, index = d.addr, d.length // 16, 0
                continue
            buffers += 1
            if buffers > self.size:
                self._fail(Rule.CHAIN_TOO_LONG, buffers)
            if len(segments) == self.max_segs:
                self._fail(Rule.CHAIN_OVER_DEVICE_LIMIT, self.max_segs)
            writable = bool(d.flags & DESC_F_WRITE)
            if not writable and seen_writable:
                self._fail(Rule.READABLE_AFTER_WRITABLE, index)
            total += d.length
            if total > 1 << 32:
                self._fail(Rule.CHAIN_BYTES, total)
            if not self.mem.contains(d.addr, d.length):
                self._fail(Rule.BUFFER_OUTSIDE_MEMORY, d.addr)
            segments.append(Segment(d.addr, d.length, writable))
            seen_writable |= writable
            if not d.flags & DESC_F_NEXT:
                return Chain(head, tuple(segments), in_indirect)
            if d.next >= entries:
                self._fail(Rule.NEXT_OUT_OF_RANGE, d.next)
            index = d.next

    # --- returning ----------------------------------------------------------------------------

    def push(self, used: Sequence[tuple[int, int]]) -> None:
        heads = [head for head, _ in used]
        if len(set(heads)) != len(heads) or not set(heads) <= self.owned:
            raise ValueError(f"push of chains the device does not own: {heads}")
        for i, (head, length) in enumerate(used):
            slot = (self.used_idx + i) % self.size
            self.mem.write(self.used + 4 + 8 * slot, struct.pack("<II", head, length))
            self.owned.discard(head)
        self.used_idx = (self.used_idx + len(used)) & 0xFFFF
        self.mem.write(self.used + 2, struct.pack("<H", self.used_idx))

    # --- notifications ------------------------------------------------------------------------

    def should_notify(self) -> bool:
        if self.event_idx:
            old, valid = self.signalled_used, self.signalled_valid
            self.signalled_used, self.signalled_valid = self.used_idx, True
            if not valid:
                return True
            used_event = self._u16(self.avail + 4 + 2 * self.size)
            return need_event(used_event, self.used_idx, old)
        return not self._u16(self.avail) & AVAIL_F_NO_INTERRUPT

    def enable_kicks(self) -> bool:
        if self.rule is not None:
            raise QueueBroken(self.rule, self.detail)
        if self.event_idx:
            self.mem.write(self.used + 4 + 8 * self.size, struct.pack("<H", self.last_avail_idx))
        else:
            self.mem.write(self.used, struct.pack("<H", 0))
        return self._u16(self.avail + 2) != self.last_avail_idx

    def disable_kicks(self) -> None:
        if not self.event_idx:
            self.mem.write(self.used, struct.pack("<H", USED_F_NO_NOTIFY))


# --- the mock driver ------------------------------------------------------------------------


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Submitted:
    """A chain the driver made available: its head and where its writable buffers are."""

    head: int
    writable: tuple[tuple[int, int], ...]
    readable: tuple[tuple[int, int], ...]


@dataclass
class UsedElem:
    id: int
    length: int


@dataclass
class MockDriver:
    """Plays a virtio driver on guest memory ``mem`` (see the module note).

    Layout from ``base``: descriptor table, available ring, used ring, then a data arena
    up to ``base + span`` from which buffers and indirect tables are carved.
    """

    mem: Memory
    size: int = 256
    base: int = 0x1000
    span: int = 1 << 20
    features: int = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
    desc: int = field(init=False)
    avail: int = field(init=False)
    used: int = field(init=False)
    avail_idx: int = field(init=False, default=0)
    last_used: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.desc = _align(self.base, 16)
        self.avail = self.desc + 16 * self.size
        self.used = _align(self.avail + 6 + 2 * self.size, 4)
        self.arena = _align(self.used + 6 + 8 * self.size, 4096)
        if self.arena >= self.base + self.span:
            raise ValueError("span too small for the rings")
        self._next = self.arena
        self._free = list(range(self.size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        self.mem.write(self.desc, bytes(self.arena - self.desc))

    @property
    def layout(self) -> dict[str, int]:
        """Keyword arguments for ``VirtQueue`` / ``ReferenceQueue``."""
        return {
            "size": self.size,
            "desc": self.desc,
            "avail": self.avail,
            "used": self.used,
            "features": self.features,
        }

    # --- memory -----------------------------------------------------------------------------------

    def alloc(self, length: int, alignment: int = 16) -> int:
        """Carve ``length`` bytes from the arena, wrapping to its start when it runs out."""
        start = _align(self._next, alignment)
        if start + length > self.base + self.span:
            start = self.arena
            if start + length > self.base + self.span:
                raise ValueError(f"{length} bytes do not fit the arena")
        self._next = start + length
        return start

    def free_descriptors(self) -> int:
        return len(self._free)

    # --- raw writes (what any driver, hostile or not, can do) ---------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int = 0) -> None:
        self.mem.write(self.desc + 16 * index, Descriptor(addr, length, flags, next).pack())

    def put_avail(self, slot: int, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (slot % self.size), struct.pack("<H", head))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, value: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", value))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def used_flags(self) -> int:
        value: int = struct.unpack("<H", self.mem.read(self.used, 2))[0]
        return value

    def avail_event(self) -> int:
        value: int = struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]
        return value

    def used_idx(self) -> int:
        value: int = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
        return value

    # --- submitting like a well-behaved driver ----------------------------------------------------

    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
        scatter: bool = False,
    ) -> Submitted:
        """Make one chain available: ``readable`` buffers (contents), then ``writable`` ones
        (lengths, zero-filled). With ``indirect`` the chain is one descriptor naming an
        indirect table; with ``scatter`` no two buffers are adjacent in guest memory. The
        available index is published unless ``publish`` is false."""
        elements: list[tuple[int, int, bool]] = []
        gap = 64 if scatter else 0
        for data in readable:
            gpa = self.alloc(max(1, len(data)) + gap)
            self.mem.write(gpa, data)
            elements.append((gpa, len(data), False))
        for length in writable:
            gpa = self.alloc(max(1, length) + gap)
            self.mem.write(gpa, bytes(length))
            elements.append((gpa, length, True))
        if not elements:
            raise ValueError("a chain needs at least one buffer")
        if len(elements) > self.size:
            raise ValueError("a chain may not be longer than the queue size (§2.7.5.3.1)")
        if indirect:
            table = self.alloc(16 * len(elements))
            for i, (gpa, length, is_writable) in enumerate(elements):
                flags = (DESC_F_WRITE if is_writable else 0) | (
                    DESC_F_NEXT if i + 1 < len(elements) else 0
                )
                self.mem.write(table + 16 * i, Descriptor(gpa, length, flags, i + 1).pack())
            head = self._take(1)[0]
            self.write_desc(head, table, 16 * len(elements), DESC_F_INDIRECT)
            self._chains[head] = [head]
        else:
            indices = self._take(len(elements))
            for i, (gpa, length, is_writable) in enumerate(elements):
                last = i + 1 == len(elements)
                flags = (DESC_F_WRITE if is_writable else 0) | (0 if last else DESC_F_NEXT)
                nxt = 0 if last else indices[i + 1]
                self.write_desc(indices[i], gpa, length, flags, nxt)
            head = indices[0]
            self._chains[head] = indices
        # §2.7.13: place the head in the next ring slot; the index update publishes it.
        self.put_avail(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return Submitted(
            head,
            tuple((g, n) for g, n, w in elements if w),
            tuple((g, n) for g, n, w in elements if not w),
        )

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"{count} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def publish(self) -> None:
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def needs_kick(self, old_avail_idx: int) -> bool:
        """Driver-side notification suppression (§2.7.10) after publishing up to avail_idx."""
        if self.features >> VIRTIO_F_EVENT_IDX & 1:
            return need_event(self.avail_event(), self.avail_idx, old_avail_idx)
        return not self.used_flags() & USED_F_NO_NOTIFY

    def reap(self, rearm: bool = True) -> list[UsedElem]:
        """Read the used ring from where the driver left off; free those descriptors. With
        ``rearm`` (and EVENT_IDX) ask for an interrupt at the next used buffer afterwards,
        as Linux's virtqueue_enable_cb does (used_event := the next index to read)."""
        now = self.used_idx()
        out = []
        while self.last_used != now:
            slot = self.last_used % self.size
            used_id, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append(UsedElem(used_id, length))
            for index in self._chains.pop(used_id, []):
                self._free.append(index)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if rearm and self.features >> VIRTIO_F_EVENT_IDX & 1:
            self.set_used_event(self.last_used)
        return out

    def read_writable(self, submitted: Submitted) -> bytes:
        return b"".join(self.mem.read(gpa, length) for gpa, length in submitted.writable)


# --- virtio-blk request helpers for the mock driver ----------------------------------------

BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2


def blk_header(request_type: int, sector: int = 0) -> bytes:
    """struct virtio_blk_req's header: le32 type, le32 reserved, le64 sector (§5.2.6)."""
    return struct.pack("<IIQ", request_type, 0, sector)


def blk_range(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes (§5.2.6)."""
    return struct.pack("<QII", sector, num_sectors, flags)
