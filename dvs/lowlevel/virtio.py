"""Virtio device core: split virtqueues, virtio-blk, virtio-console, the vhost-user back-end.

The C side (csrc/virtio/) does all the work on guest memory; these wrappers set it up and
carry results back as Python objects. Semantics the callers rely on:

- A ``VirtQueue`` is the device side of a split virtqueue over a ``GuestMemory`` (local or
  remote). The guest is untrusted: the first spec rule it breaks is recorded (``rule``, one
  ``DVS_VQ_ERR_*`` code per rule, named by the C table) and the queue stops for good; every
  later call raises ``VirtqueueBroken``. The transport then reports DEVICE_NEEDS_RESET.
- ``BlkDevice`` serves virtio-blk requests from a queue against a backing file through the
  block backend seam (``dvs_blk_backend``: the shared io_uring ring, synchronous
  preadv/pwritev, or a sealed volume of dvs.shield). A malformed
  *request* is answered with an error status and counted per rule (``request_rules``); it
  does not stop the queue.
- ``ConsoleDevice`` moves bytes between port 0's queues and two non-blocking fds.
- ``VhostUserBlk`` runs the vhost-user protocol for a ``BlkDevice`` on one connected socket
  until the front-end disconnects or the stop eventfd is signalled; the call blocks (in C,
  with the GIL released), so run it on a thread of its own.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dvs.errors import GuestProtocolError
from dvs.lowlevel import check, ffi, lib
from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.shield import VolumeHandle

VIRTIO_F_INDIRECT_DESC: int = lib.DVS_VIRTIO_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX: int = lib.DVS_VIRTIO_F_EVENT_IDX
VIRTIO_F_VERSION_1: int = lib.DVS_VIRTIO_F_VERSION_1
VQ_MAX_SEGS: int = lib.DVS_VQ_MAX_SEGS
VQ_MAX_SIZE: int = lib.DVS_VQ_MAX_SIZE

BlkEngine = Literal["sync", "io_uring", "deferred"]
BLK_ENGINES: tuple[BlkEngine, ...] = ("sync", "io_uring", "deferred")

RULE_NAMES: dict[int, str] = {
    code: ffi.string(lib.dvs_vq_rule_name(code)).decode()
    for code in range(1, lib.DVS_VQ_RULE_MAX)
    if ffi.string(lib.dvs_vq_rule_name(code)) != b"unknown rule"
}
"""Every queue rule the C walker enforces, by code."""

BLK_REQUEST_RULE_NAMES: dict[int, str] = {
    code: ffi.string(lib.dvs_blk_request_rule_name(code)).decode()
    for code in range(1, lib.DVS_BLK_REQ_RULE_MAX)
}

VHOST_USER_ERROR_NAMES: dict[int, str] = {
    code: ffi.string(lib.dvs_vu_error_name(code)).decode() for code in range(1, lib.DVS_VU_ERR_MAX)
}


class VirtqueueBroken(GuestProtocolError):
    """The driver broke a virtqueue rule; the queue is stopped until it is set up again."""

    def __init__(self, rule_id: int, detail: int) -> None:
        self.rule_id = rule_id
        self.detail = detail
        super().__init__(RULE_NAMES.get(rule_id, f"rule {rule_id}"), f"offending value {detail:#x}")


@dataclass(frozen=True)
class Segment:
    gpa: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    """A popped descriptor chain: readable segments first, then writable ones."""

    head: int
    segments: tuple[Segment, ...]
    indirect: bool

    @property
    def readable_bytes(self) -> int:
        return sum(s.length for s in self.segments if not s.writable)

    @property
    def writable_bytes(self) -> int:
        return sum(s.length for s in self.segments if s.writable)


VIRTIO_STATUS_NEEDS_RESET: int = lib.DVS_VIRTIO_STATUS_NEEDS_RESET


def device_status(status: int, queues: Sequence[VirtQueue]) -> int:
    """``status`` with DEVICE_NEEDS_RESET set once any of ``queues`` broke a rule (what a
    virtio-mmio/pci transport reports in its status register)."""
    table = ffi.new("struct dvs_vq *[]", [q.c_handle for q in queues] or [ffi.NULL])
    return int(lib.dvs_vq_device_status(status, table, len(queues)))


class VirtQueue:
    """The device side of one split virtqueue (see the module note)."""

    def __init__(
        self,
        mem: GuestMemory,
        *,
        size: int,
        desc: int,
        avail: int,
        used: int,
        features: int,
        max_segs: int = VQ_MAX_SEGS,
        last_avail_idx: int = 0,
        used_idx: int = 0,
    ) -> None:
        self.mem = mem
        self._vq = ffi.new("struct dvs_vq *")
        self._chain = ffi.new("struct dvs_vq_chain *")
        cfg = ffi.new("struct dvs_vq_config *")
        cfg.size = size if 0 <= size <= 0xFFFF else 0
        cfg.last_avail_idx = last_avail_idx
        cfg.used_idx = used_idx
        cfg.max_segs = max_segs
        cfg.features = features
        cfg.desc_gpa, cfg.avail_gpa, cfg.used_gpa = desc, avail, used
        self._check(lib.dvs_vq_init(self._vq, mem.c_handle, cfg), "virtqueue set-up")

    def _check(self, ret: int, what: str) -> int:
        if ret == -errno.EPROTO and self._vq.rule:
            raise VirtqueueBroken(int(self._vq.rule), int(self._vq.rule_detail))
        return check(ret, what)

    @property
    def c_handle(self) -> object:
        """The ``struct dvs_vq *`` for the device wrappers."""
        return self._vq

    @property
    def rule(self) -> int:
        """The rule the driver broke (``DVS_VQ_ERR_*``), 0 while healthy."""
        return int(self._vq.rule)

    @property
    def needs_reset(self) -> bool:
        return self.rule != 0

    @property
    def last_avail_idx(self) -> int:
        return int(self._vq.last_avail_idx)

    @property
    def used_idx(self) -> int:
        return int(self._vq.used_idx)

    @property
    def in_flight(self) -> int:
        return int(self._vq.in_flight)

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty."""
        if self._check(lib.dvs_vq_pop(self._vq, self.mem.c_handle, self._chain), "pop") == 0:
            return None
        c = self._chain
        segments = tuple(
            Segment(int(c.segs[i].gpa), int(c.segs[i].len), bool(c.segs[i].writable))
            for i in range(c.n_segs)
        )
        return Chain(int(c.head), segments, bool(c.indirect))

    def pop_all(self) -> list[Chain]:
        chains = []
        while (chain := self.pop()) is not None:
            chains.append(chain)
        return chains

    def push(self, used: Sequence[tuple[int, int]]) -> None:
        """Return chains ``(head, bytes written)`` to the driver, one used->idx update."""
        elems = ffi.new("struct dvs_vq_used_elem[]", max(1, len(used)))
        for i, (head, length) in enumerate(used):
            elems[i].id, elems[i].len = head, length
        self._check(lib.dvs_vq_push(self._vq, self.mem.c_handle, elems, len(used)), "push")

    def should_notify(self) -> bool:
        return bool(self._check(lib.dvs_vq_should_notify(self._vq, self.mem.c_handle), "notify"))

    def enable_kicks(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (process them now)."""
        return bool(self._check(lib.dvs_vq_enable_kicks(self._vq, self.mem.c_handle), "kicks"))

    def disable_kicks(self) -> None:
        self._check(lib.dvs_vq_disable_kicks(self._vq, self.mem.c_handle), "kicks")


# --- virtio-blk -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlkResult:
    handled: int
    completed: int
    notify: bool
    more: bool
    """Stopped at the per-call budget: call ``process`` again."""
    stalled: bool
    """The backend is full: call ``process`` again after ``poll`` completed something."""


@dataclass(frozen=True)
class BlkStats:
    requests: int
    reads: int
    writes: int
    flushes: int
    get_ids: int
    discards: int
    write_zeroes: int
    bytes_read: int
    bytes_written: int
    errors: int
    deferred: int
    in_flight: int
    request_rules: dict[str, int]
    """Requests answered with an error, counted by the request rule they broke."""


class BlkDevice:
    """A virtio-blk device model over a backing file descriptor (which stays the caller's),
    or over a sealed volume (``BlkDevice.on_sealed_volume``)."""

    def __init__(
        self,
        fd: int,
        *,
        sealed_volume: VolumeHandle | None = None,
        read_only: bool = False,
        device_id: bytes = b"dvs",
        capacity_sectors: int = 0,
        num_queues: int = 1,
        seg_max: int = 0,
        direct: bool = False,
        engine: BlkEngine = "sync",
        depth: int = 0,
        ring_writes: bool = False,
    ) -> None:
        """``engine`` moves the data: ``sync`` (preadv/pwritev in the calling thread),
        ``io_uring`` (the shared ring of dvs.lowlevel.uring, ``depth`` entries; the first
        thread to submit becomes its only issuer) or ``deferred`` (synchronous I/O with
        asynchronous completion from ``poll()``, at most ``depth`` in flight). With
        io_uring, buffered writes are done inline unless ``ring_writes`` (see blk_ring.c)."""
        if len(device_id) > lib.DVS_VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"device id {device_id!r} is longer than 20 bytes")
        backend = ffi.new("struct dvs_blk_backend **")
        if sealed_volume is not None:
            # the volume's C handle; the volume must outlive this device
            ret = lib.dvs_blk_backend_shield(sealed_volume._h, backend)
            engine = "sync"
        elif engine == "io_uring":
            options = lib.DVS_BLK_RING_WRITES_ON_RING if ring_writes else 0
            ret = lib.dvs_blk_backend_ring(fd, depth or 256, options, backend)
        elif engine == "deferred":
            ret = lib.dvs_blk_backend_file_deferred(fd, depth or 16, backend)
        elif engine == "sync":
            ret = lib.dvs_blk_backend_file(fd, lib.DVS_BLK_FILE_DIRECT if direct else 0, backend)
        else:
            raise ValueError(f"unknown block engine {engine!r}")
        check(ret, f"{engine} block backend")
        cfg = ffi.new("struct dvs_blk_config *")
        cfg.capacity = capacity_sectors
        cfg.read_only = int(read_only)
        cfg.num_queues = num_queues
        cfg.seg_max = seg_max
        ffi.memmove(cfg.id, device_id, len(device_id))
        out = ffi.new("struct dvs_blk **")
        check(lib.dvs_blk_create(cfg, backend[0], out), "virtio-blk device")
        self._blk = ffi.gc(out[0], lib.dvs_blk_destroy)
        self._result = ffi.new("struct dvs_blk_result *")
        self.read_only = read_only
        self.engine = engine
        self.is_sealed = sealed_volume is not None
        self._volume = sealed_volume  # keeps the volume alive as long as the device

    @classmethod
    def on_sealed_volume(
        cls,
        volume: VolumeHandle,
        *,
        read_only: bool = False,
        device_id: bytes = b"dvs",
        num_queues: int = 1,
    ) -> BlkDevice:
        """A device whose storage is a sealed volume (authenticated encryption, atomic
        flush): a block failing authentication reaches the guest as an I/O error. The
        volume's engine belongs to the thread that opened it: serve the device from there."""
        return cls(
            -1,
            sealed_volume=volume,
            read_only=read_only,
            device_id=device_id,
            num_queues=num_queues,
        )

    @property
    def c_handle(self) -> object:
        return self._blk

    @property
    def features(self) -> int:
        return int(lib.dvs_blk_features(self._blk))

    @property
    def capacity_sectors(self) -> int:
        return int(lib.dvs_blk_capacity(self._blk))

    @property
    def max_segs(self) -> int:
        return int(lib.dvs_blk_max_segs(self._blk))

    def config_space(self) -> bytes:
        buf = ffi.new("uint8_t[]", lib.DVS_VIRTIO_BLK_CONFIG_BYTES)
        n = lib.dvs_blk_config_space(self._blk, buf, len(buf))
        return bytes(ffi.buffer(buf, n))

    def process(self, queue: VirtQueue) -> BlkResult:
        """Serve every available request of ``queue`` (raises ``VirtqueueBroken``)."""
        r = self._result
        ret = lib.dvs_blk_process(self._blk, queue.c_handle, queue.mem.c_handle, r)
        queue._check(ret, "virtio-blk process")
        return BlkResult(
            int(r.handled), int(r.completed), bool(r.notify), bool(r.more), bool(r.stalled)
        )

    @property
    def event_fd(self) -> int:
        """Readable when ``poll`` has completions to collect (the io_uring ring fd, the
        deferred backend's eventfd); -1 for the synchronous engine."""
        return int(lib.dvs_blk_event_fd(self._blk))

    def poll(self, wait: bool = False) -> int:
        """Complete finished asynchronous I/O (pushing used buffers); returns how many."""
        return check(lib.dvs_blk_poll(self._blk, int(wait)), "virtio-blk poll")

    def stats(self) -> BlkStats:
        s = ffi.new("struct dvs_blk_stats *")
        lib.dvs_blk_get_stats(self._blk, s)
        rules = {
            name: int(s.rule_counts[code])
            for code, name in BLK_REQUEST_RULE_NAMES.items()
            if s.rule_counts[code]
        }
        return BlkStats(
            int(s.requests), int(s.reads), int(s.writes), int(s.flushes), int(s.get_ids),
            int(s.discards), int(s.write_zeroes), int(s.bytes_read), int(s.bytes_written),
            int(s.errors), int(s.deferred), int(s.in_flight), rules,
        )  # fmt: skip

    def close(self) -> None:
        """Free the device now (the backing fd stays open: it is the caller's)."""
        if self._blk is not None:
            blk, self._blk = self._blk, None
            ffi.release(blk)  # runs dvs_blk_destroy


# --- virtio-console -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsoleResult:
    completed: int
    notify: bool
    blocked: bool
    more: bool


@dataclass(frozen=True)
class ConsoleStats:
    rx_bytes: int
    tx_bytes: int
    rx_chains: int
    tx_chains: int
    tx_dropped: int
    in_eof: bool
    out_closed: bool


class ConsoleDevice:
    """virtio-console port 0 between a receive/transmit queue pair and two non-blocking fds."""

    RECEIVEQ: int = lib.DVS_CONSOLE_RECEIVEQ
    TRANSMITQ: int = lib.DVS_CONSOLE_TRANSMITQ

    def __init__(self, in_fd: int, out_fd: int, cols: int = 80, rows: int = 25) -> None:
        for fd in (in_fd, out_fd):
            if fd >= 0 and os.get_blocking(fd):
                raise ValueError(f"fd {fd} must be non-blocking (os.set_blocking(fd, False))")
        cfg = ffi.new("struct dvs_console_config *")
        cfg.in_fd, cfg.out_fd, cfg.cols, cfg.rows = in_fd, out_fd, cols, rows
        out = ffi.new("struct dvs_console **")
        check(lib.dvs_console_create(cfg, out), "virtio-console device")
        self._con = ffi.gc(out[0], lib.dvs_console_destroy)
        self._result = ffi.new("struct dvs_console_result *")

    @property
    def features(self) -> int:
        return int(lib.dvs_console_features(self._con))

    @property
    def max_segs(self) -> int:
        return int(lib.dvs_console_max_segs(self._con))

    def config_space(self) -> bytes:
        buf = ffi.new("uint8_t[]", lib.DVS_VIRTIO_CONSOLE_CONFIG_BYTES)
        n = lib.dvs_console_config_space(self._con, buf, len(buf))
        return bytes(ffi.buffer(buf, n))

    def _result_of(self, queue: VirtQueue, ret: int, what: str) -> ConsoleResult:
        queue._check(ret, what)
        r = self._result
        return ConsoleResult(int(r.completed), bool(r.notify), bool(r.blocked), bool(r.more))

    def transmit(self, queue: VirtQueue) -> ConsoleResult:
        """Guest output (transmitq) -> out_fd."""
        ret = lib.dvs_console_tx(self._con, queue.c_handle, queue.mem.c_handle, self._result)
        return self._result_of(queue, ret, "virtio-console transmit")

    def receive(self, queue: VirtQueue) -> ConsoleResult:
        """in_fd -> guest input buffers (receiveq)."""
        ret = lib.dvs_console_rx(self._con, queue.c_handle, queue.mem.c_handle, self._result)
        return self._result_of(queue, ret, "virtio-console receive")

    def stats(self) -> ConsoleStats:
        s = ffi.new("struct dvs_console_stats *")
        lib.dvs_console_get_stats(self._con, s)
        return ConsoleStats(
            int(s.rx_bytes), int(s.tx_bytes), int(s.rx_chains), int(s.tx_chains),
            int(s.tx_dropped), bool(s.in_eof), bool(s.out_closed),
        )  # fmt: skip


# --- vhost-user --------------------------------------------------------------------------------


class VhostUserProtocolError(GuestProtocolError):
    """The vhost-user front-end broke the protocol; the connection was dropped."""


@dataclass(frozen=True)
class VhostUserStats:
    messages: int
    kicks: int
    calls: int
    requests: int
    polled: int
    """Requests found by polling, for which the guest did not kick."""
    connected: bool
    queues_started: int
    protocol_error: str | None
    last_request: int
    broken_queue: int | None
    queue_rule: str | None
    features: int
    protocol_features: int


class VhostUserBlk:
    """The vhost-user back-end for one ``BlkDevice`` (which must outlive it)."""

    def __init__(self, device: BlkDevice, poll_us: int = 0) -> None:
        """``poll_us`` > 0: after a queue runs empty, poll it that long before waiting for a
        kick (fewer guest exits for more host CPU)."""
        out = ffi.new("struct dvs_vu **")
        check(lib.dvs_vu_blk_create(device.c_handle, out), "vhost-user back-end")
        self._vu = ffi.gc(out[0], lib.dvs_vu_destroy)
        lib.dvs_vu_set_poll(self._vu, poll_us * 1000)
        self.device = device

    def serve(self, conn_fd: int, stop_fd: int) -> bool:
        """Serve one connection; True if stopped through ``stop_fd``, False if the front-end
        disconnected. Raises ``VhostUserProtocolError`` if it broke the protocol."""
        ret = lib.dvs_vu_serve(self._vu, conn_fd, stop_fd)
        if ret == -errno.EPROTO:
            stats = self.stats()
            raise VhostUserProtocolError(stats.protocol_error or "vhost-user protocol")
        return check(ret, "vhost-user serve") == 1

    def stats(self) -> VhostUserStats:
        s = ffi.new("struct dvs_vu_stats *")
        lib.dvs_vu_get_stats(self._vu, s)
        return VhostUserStats(
            messages=int(s.messages),
            kicks=int(s.kicks),
            calls=int(s.calls),
            requests=int(s.requests),
            polled=int(s.polled),
            connected=bool(s.connected),
            queues_started=int(s.queues_started),
            protocol_error=VHOST_USER_ERROR_NAMES.get(int(s.protocol_error)),
            last_request=int(s.last_request),
            broken_queue=int(s.broken_queue) - 1 if s.broken_queue else None,
            queue_rule=RULE_NAMES.get(int(s.queue_rule)) if s.broken_queue else None,
            features=int(s.features),
            protocol_features=int(s.protocol_features),
        )
