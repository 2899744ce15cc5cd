"""The dvs I/O engines: an io_uring ring, a pread/pwrite thread pool, a fault-injecting
memory disk -- one small class, ``Engine``, over csrc/uring/.

Semantics relied on (details in csrc/uring/uring.h):
- A ring is created disabled (IORING_SETUP_R_DISABLED), gets its files and buffers
  registered, is restricted to the opcodes the engine produces (NOP, READ(_FIXED),
  WRITE(_FIXED), FSYNC) with IOSQE_FIXED_FILE *required*, and is then enabled. With
  SINGLE_ISSUER (the default) only the thread that created the engine may use it.
- Requests and completions travel as whole arrays (``IoArray``, ``DoneArray``) whose
  numpy views let callers fill thousands of requests without a Python loop; one cffi call
  submits a batch and one reaps a batch.
- ``submit`` returns how many requests it took; the rest were handed back because the queue
  was full (never dropped) and go in again after a ``reap``.
- Short reads/writes are continued by the engine; a completion carries the total (short
  only at end of file) or ``-errno``.
- ``stats().syscalls`` counts the syscalls the engine's I/O threads made on the data path
  (io_uring_enter for the ring; pread/pwrite/fsync plus futex waits and wakes for the thread
  pool). Benchmarks check it against ``perf stat -e raw_syscalls:sys_enter``.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from dvs.lowlevel import check, ffi, lib

EngineKind = Literal["io_uring", "threads", "memdisk"]

OP_NOP: int = lib.DVS_OP_NOP
OP_READ: int = lib.DVS_OP_READ
OP_WRITE: int = lib.DVS_OP_WRITE
OP_FSYNC: int = lib.DVS_OP_FSYNC
OP_FDATASYNC: int = lib.DVS_OP_FDATASYNC
IO_LINK: int = lib.DVS_IO_LINK
IO_DRAIN: int = lib.DVS_IO_DRAIN
NO_BUF: int = lib.DVS_IO_NO_BUF

CRASH_DROP_ALL: int = lib.DVS_CRASH_DROP_ALL
CRASH_KEEP_SOME: int = lib.DVS_CRASH_KEEP_SOME
CRASH_REORDER: int = lib.DVS_CRASH_REORDER
CRASH_TEAR: int = lib.DVS_CRASH_TEAR

_KINDS: dict[str, int] = {
    "io_uring": lib.DVS_ENGINE_RING,
    "threads": lib.DVS_ENGINE_THREADS,
    "memdisk": lib.DVS_ENGINE_MEMDISK,
}

IO_DTYPE = np.dtype(
    [
        ("user_data", "<u8"),
        ("addr", "<u8"),
        ("offset", "<u8"),
        ("len", "<u4"),
        ("file", "<i4"),
        ("buf", "<u2"),
        ("opcode", "u1"),
        ("flags", "u1"),
        ("reserved", "<u4"),
    ]
)
DONE_DTYPE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
assert IO_DTYPE.itemsize == ffi.sizeof("struct dvs_io")
assert DONE_DTYPE.itemsize == ffi.sizeof("struct dvs_io_done")


class IoArray:
    """A C array of requests; ``.np`` is a numpy structured view of the same memory."""

    def __init__(self, n: int) -> None:
        self._c: Any = ffi.new("struct dvs_io[]", n)
        self.n = n
        self.np: npt.NDArray[Any] = np.frombuffer(ffi.buffer(self._c), dtype=IO_DTYPE)
        self.np["buf"] = NO_BUF

    def __len__(self) -> int:
        return self.n

    def set(
        self,
        index: int,
        opcode: int,
        *,
        file: int = 0,
        addr: int = 0,
        length: int = 0,
        offset: int = 0,
        buf: int = NO_BUF,
        flags: int = 0,
        user_data: int = 0,
    ) -> None:
        """Fill one request (for small batches; big ones are filled through ``.np``)."""
        self.np[index] = (user_data, addr, offset, length, file, buf, opcode, flags, 0)


class DoneArray:
    """A C array of completions; ``.np`` is a numpy structured view."""

    def __init__(self, n: int) -> None:
        self._c: Any = ffi.new("struct dvs_io_done[]", n)
        self.n = n
        self.np: npt.NDArray[Any] = np.frombuffer(ffi.buffer(self._c), dtype=DONE_DTYPE)

    def __len__(self) -> int:
        return self.n


class Buffer:
    """Page-aligned anonymous memory, suitable for registration and O_DIRECT."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self.size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map = mmap.mmap(-1, self.size)
        self._ptr: Any = ffi.from_buffer(self._map)
        self.addr: int = int(ffi.cast("uintptr_t", self._ptr))
        self.np: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        end = self.size if length is None else offset + length
        if not 0 <= offset <= end <= self.size:
            raise ValueError(f"range {offset}..{end} outside the {self.size}-byte buffer")
        return memoryview(self._map)[offset:end]

    def close(self) -> None:
        del self.np
        self._ptr = None
        self._map.close()


@dataclass
class IoStats:
    """Counters of one engine (see the module note for what counts as a syscall)."""

    submitted: int
    completed: int
    queue_full: int
    requeued: int
    syscalls: int
    enters: int
    wakeups: int
    waits: int
    worker_syscalls: int
    submitter_syscalls: int
    bogus_completions: int
    bytes_read: int
    bytes_written: int
    in_flight: int

    @property
    def syscalls_per_op(self) -> float:
        return self.syscalls / self.completed if self.completed else 0.0

    def minus(self, earlier: IoStats) -> IoStats:
        """The counters accumulated since ``earlier`` (gauges keep their current value)."""
        values = {
            f.name: getattr(self, f.name)
            - (0 if f.name == "in_flight" else getattr(earlier, f.name))
            for f in fields(self)
        }
        return IoStats(**values)


@dataclass
class RingInfo:
    sq_entries: int
    cq_entries: int
    max_in_flight: int
    features: int
    setup_flags: int
    restricted: bool
    n_files: int
    n_bufs: int


def _stats_from(c: Any) -> IoStats:
    return IoStats(**{f.name: int(getattr(c, f.name)) for f in fields(IoStats)})


class Engine:
    """One I/O engine over registered files (and, for the ring, registered buffers).

    ``kind`` is "io_uring", "threads" (pread/pwrite workers) or "memdisk" (in-memory,
    fault-injecting; ``files`` are then ignored placeholders, one empty disk file each).
    """

    def __init__(
        self,
        kind: EngineKind = "io_uring",
        *,
        files: Sequence[int] = (),
        buffers: Sequence[Buffer] = (),
        entries: int = 64,
        sqpoll: bool = False,
        sq_idle_ms: int = 50,
        sq_cpu: int = -1,
        single_issuer: bool = True,
        coop_taskrun: bool = True,
        restrictions: bool = True,
        allow_file_update: bool = False,
        threads: int = 2,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown engine kind {kind!r}; expected one of {sorted(_KINDS)}")
        if not files:
            raise ValueError("an engine needs at least one file")
        flags = 0
        if sqpoll:
            flags |= lib.DVS_RING_SQPOLL
        if single_issuer:
            flags |= lib.DVS_RING_SINGLE_ISSUER
        if coop_taskrun:
            flags |= lib.DVS_RING_COOP_TASKRUN
        if not restrictions:
            flags |= lib.DVS_RING_NO_RESTRICTIONS
        if allow_file_update:
            flags |= lib.DVS_RING_ALLOW_FILE_UPDATE
        params = ffi.new(
            "struct dvs_engine_params *",
            {
                "kind": _KINDS[kind],
                "entries": entries,
                "ring_flags": flags,
                "threads": threads,
                "sq_idle_ms": sq_idle_ms,
                "sq_cpu": sq_cpu,
            },
        )
        handle = ffi.new("struct dvs_engine **")
        check(lib.dvs_engine_create(params, handle), f"create {kind} engine")
        self._handle: Any = handle[0]
        self.kind: EngineKind = kind
        self._buffers = list(buffers)  # registered memory must outlive the engine
        try:
            fds = ffi.new("int32_t[]", list(files))
            check(lib.dvs_engine_register_files(self._handle, fds, len(files)), "register files")
            if buffers:
                bufs = ffi.new("struct dvs_buf[]", [(b.addr, b.size) for b in buffers])
                check(
                    lib.dvs_engine_register_buffers(self._handle, bufs, len(buffers)),
                    "register buffers",
                )
            check(lib.dvs_engine_enable(self._handle), f"enable {kind} engine")
        except BaseException:
            lib.dvs_engine_destroy(self._handle)
            self._handle = None
            raise
        self.n_files = len(files)
        self.max_in_flight: int = lib.dvs_engine_max_in_flight(self._handle)
        self._accepted: Any = ffi.new("uint32_t *")

    # ---- the data path -----------------------------------------------------------------

    def _live(self) -> Any:
        if self._handle is None:
            raise ValueError("the engine is closed")
        return self._handle

    @staticmethod
    def _check_issuer(ret: int, what: str) -> int:
        if ret == -errno.EEXIST:
            raise OSError(
                errno.EEXIST,
                f"{what}: the ring belongs to the thread that created it (SINGLE_ISSUER)",
            )
        return check(ret, what)

    # The three calls below are the hot path: one cffi crossing each, no allocation.

    def submit(self, ios: IoArray, start: int = 0, count: int | None = None) -> int:
        """Submit ``ios[start:start+count]``; returns how many were taken (queue full: fewer)."""
        if count is None:
            count = ios.n - start
        if start < 0 or count < 0 or start + count > ios.n:
            raise ValueError("request range outside the array")
        handle = self._handle
        if handle is None:
            raise ValueError("the engine is closed")
        ret: int = lib.dvs_engine_submit(handle, ios._c + start, count)
        return ret if ret >= 0 else self._check_issuer(ret, "submit")

    def reap(self, done: DoneArray, min_wait: int = 0, max_count: int | None = None) -> int:
        """Move completions into ``done[0:n]``, waiting for at least ``min_wait``."""
        max_count = done.n if max_count is None else min(max_count, done.n)
        handle = self._handle
        if handle is None:
            raise ValueError("the engine is closed")
        ret: int = lib.dvs_engine_reap(handle, done._c, max_count, min_wait)
        return ret if ret >= 0 else self._check_issuer(ret, "reap")

    def submit_and_reap(
        self,
        ios: IoArray,
        start: int,
        count: int,
        done: DoneArray,
        min_wait: int = 0,
    ) -> tuple[int, int]:
        """Both in one crossing: returns (requests taken, completions written)."""
        if start < 0 or count < 0 or start + count > ios.n:
            raise ValueError("request range outside the array")
        handle = self._handle
        if handle is None:
            raise ValueError("the engine is closed")
        accepted = self._accepted
        ret: int = lib.dvs_engine_submit_and_reap(
            handle, ios._c + start, count, accepted, done._c, done.n, min_wait
        )
        if ret < 0:
            self._check_issuer(ret, "submit and reap")
        return accepted[0], ret

    def run(self, ios: IoArray, done: DoneArray | None = None) -> DoneArray:
        """Submit every request and wait for all completions (a convenience for small jobs)."""
        done = done if done is not None else DoneArray(len(ios))
        if len(done) < len(ios):
            raise ValueError("the completion array is smaller than the request array")
        sent = got = 0
        while got < len(ios):
            accepted, n = self.submit_and_reap(
                ios, sent, len(ios) - sent, _Window(done, got), min_wait=1
            )
            sent += accepted
            got += n
        return done

    def stats(self) -> IoStats:
        out = ffi.new("struct dvs_io_stats *")
        check(lib.dvs_engine_stats(self._live(), out), "engine stats")
        return _stats_from(out)

    def ring_info(self) -> RingInfo | None:
        ring = lib.dvs_engine_ring(self._live())
        if ring == ffi.NULL:
            return None
        out = ffi.new("struct dvs_ring_info *")
        check(lib.dvs_ring_info(ring, out), "ring info")
        return RingInfo(
            sq_entries=out.sq_entries,
            cq_entries=out.cq_entries,
            max_in_flight=out.max_in_flight,
            features=out.features,
            setup_flags=out.setup_flags,
            restricted=bool(out.restricted),
            n_files=out.n_files,
            n_bufs=out.n_bufs,
        )

    def ring_fd(self) -> int:
        ring = lib.dvs_engine_ring(self._live())
        if ring == ffi.NULL:
            raise ValueError(f"a {self.kind} engine has no ring")
        return int(lib.dvs_ring_fd(ring))

    def inject_raw(
        self, opcode: int, sqe_flags: int, fd: int, user_data: int, *, wait: bool
    ) -> int | None:
        """Test hook: push one raw SQE past the engine's checks (see uring.h).

        ``wait``: wait for its completion and return its result; otherwise leave it for
        ``reap`` (which drops CQEs that name no request in flight).
        """
        ring = lib.dvs_engine_ring(self._live())
        if ring == ffi.NULL:
            raise ValueError(f"a {self.kind} engine has no ring")
        res = ffi.new("int32_t *")
        check(
            lib.dvs_ring_inject_raw(ring, opcode, sqe_flags, fd, user_data, int(wait), res),
            "inject raw SQE",
        )
        return int(res[0]) if wait else None

    def update_files(self, first: int, fds: Sequence[int]) -> None:
        ring = lib.dvs_engine_ring(self._live())
        if ring == ffi.NULL:
            raise ValueError(f"a {self.kind} engine cannot update files")
        c_fds = ffi.new("int32_t[]", list(fds))
        check(lib.dvs_ring_update_files(ring, first, c_fds, len(fds)), "update files")

    # ---- the memory disk's fault injection ------------------------------------------------

    def fail_after(self, ops: int) -> None:
        """memdisk: requests after the next ``ops`` fail with EIO and change nothing."""
        check(lib.dvs_memdisk_fail_after(self._live(), ops), "memdisk fail_after")

    def crash(self, mode: int, seed: int) -> int:
        """memdisk: power loss; returns how many unflushed pages survived."""
        return check(lib.dvs_memdisk_crash(self._live(), mode, seed), "memdisk crash")

    def peek(self, file: int, page: int) -> bytes:
        out = ffi.new("uint8_t[4096]")
        check(lib.dvs_memdisk_peek(self._live(), file, page, out), "memdisk peek")
        return bytes(ffi.buffer(out))

    def poke(self, file: int, page: int, data: bytes) -> None:
        if len(data) != 4096:
            raise ValueError("memdisk pages are 4096 bytes")
        check(lib.dvs_memdisk_poke(self._live(), file, page, data), "memdisk poke")

    def pages(self, file: int) -> list[int]:
        n = check(lib.dvs_memdisk_pages(self._live(), file, ffi.NULL, 0), "memdisk pages")
        out = ffi.new("uint64_t[]", max(n, 1))
        n = check(lib.dvs_memdisk_pages(self._live(), file, out, n), "memdisk pages")
        return sorted(int(out[i]) for i in range(n))

    def unflushed(self) -> int:
        return check(lib.dvs_memdisk_unflushed(self._live()), "memdisk unflushed")

    def snapshot(self, file: int, into_file: int) -> None:
        check(lib.dvs_memdisk_snapshot(self._live(), file, into_file), "memdisk snapshot")

    # ---- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for requests in flight, then release the ring/threads/memory."""
        if self._handle is not None:
            lib.dvs_engine_destroy(self._handle)
            self._handle = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class _Window(DoneArray):
    """A view of ``done`` from index ``start`` on (no copy)."""

    def __init__(self, done: DoneArray, start: int) -> None:
        self._c = done._c + start
        self.n = done.n - start
        self.np = done.np[start:]
