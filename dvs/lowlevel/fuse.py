"""CntrFS, the C FUSE server (csrc/fuse/): typed wrappers around its few coarse entry points.

Kernel/protocol semantics relied on (details in csrc/fuse/cntrfs.h):
- The server owns a ``/dev/fuse`` descriptor (``dev_fd``) that a mount names with
  ``fd=N``. Workers can only start after that mount: ``FUSE_DEV_IOC_CLONE`` and reads need
  a descriptor bound to a mounted connection.
- The kernel sends ``FUSE_INIT`` at mount time; ``wait_init`` returns what was negotiated.
- ``stop`` wakes and joins the workers, then closes every device descriptor: the kernel
  aborts the connection, so callers get ``ENOTCONN`` instead of hanging.
- With FUSE over io_uring (Linux 6.14, the ``fuse`` parameter ``enable_uring``), most
  requests arrive in ring entries served by ring threads; INIT, FORGET and INTERRUPT still
  come through the device, so both kinds of threads run.
- Requests never touch Python: these calls only start, stop and observe the server.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dvs.lowlevel import check, ffi, lib

WANT_PASSTHROUGH: int = lib.DVS_FUSE_WANT_PASSTHROUGH
WANT_WRITEBACK: int = lib.DVS_FUSE_WANT_WRITEBACK
NO_DEVICE: int = lib.DVS_FUSE_NO_DEVICE
DEBUG: int = lib.DVS_FUSE_DEBUG
WANT_URING: int = lib.DVS_FUSE_WANT_URING
TEST_URING_BAD_QID: int = lib.DVS_FUSE_TEST_URING_BAD_QID
URING_NO_PIN: int = lib.DVS_FUSE_URING_NO_PIN
TRANSPORT_DEV: int = lib.DVS_FUSE_TRANSPORT_DEV
TRANSPORT_URING: int = lib.DVS_FUSE_TRANSPORT_URING

# fuse_opcode numbers (include/uapi/linux/fuse.h) -> names, for statistics
OPCODES = {
    1: "LOOKUP",
    2: "FORGET",
    3: "GETATTR",
    4: "SETATTR",
    5: "READLINK",
    6: "SYMLINK",
    8: "MKNOD",
    9: "MKDIR",
    10: "UNLINK",
    11: "RMDIR",
    12: "RENAME",
    13: "LINK",
    14: "OPEN",
    15: "READ",
    16: "WRITE",
    17: "STATFS",
    18: "RELEASE",
    20: "FSYNC",
    21: "SETXATTR",
    22: "GETXATTR",
    23: "LISTXATTR",
    24: "REMOVEXATTR",
    25: "FLUSH",
    26: "INIT",
    27: "OPENDIR",
    28: "READDIR",
    29: "RELEASEDIR",
    30: "FSYNCDIR",
    31: "GETLK",
    32: "SETLK",
    33: "SETLKW",
    34: "ACCESS",
    35: "CREATE",
    36: "INTERRUPT",
    37: "BMAP",
    38: "DESTROY",
    39: "IOCTL",
    40: "POLL",
    41: "NOTIFY_REPLY",
    42: "BATCH_FORGET",
    43: "FALLOCATE",
    44: "READDIRPLUS",
    45: "RENAME2",
    46: "LSEEK",
    47: "COPY_FILE_RANGE",
    48: "SETUPMAPPING",
    49: "REMOVEMAPPING",
    50: "SYNCFS",
    51: "TMPFILE",
    52: "STATX",
    53: "COPY_FILE_RANGE_64",
}


@dataclass(frozen=True)
class IdRange:
    """One line of a user-namespace id map: ``inside outside count``."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class Negotiated:
    """What FUSE_INIT settled."""

    kernel_major: int
    kernel_minor: int
    proto_minor: int
    kernel_flags: int
    granted_flags: int
    max_write: int
    max_pages: int
    passthrough: bool
    writeback: bool
    max_stack_depth: int
    transport: str = "dev"  # "dev": /dev/fuse read/write; "uring": FUSE over io_uring
    ring_queues: int = 0
    ring_entries: int = 0
    ring_threads: int = 0


@dataclass
class Stats:
    requests: int
    errors: int
    by_opcode: dict[str, int]
    bytes_read: int
    bytes_written: int
    inodes: int
    open_files: int
    path_fds: int
    fd_evictions: int
    handle_opens: int
    passthrough_opens: int
    backing_files: int
    interrupts: int
    blocked_locks: int
    workers: int
    ring_requests: int = 0  # requests that arrived through io_uring entries
    ring_commit_errors: int = 0
    ring_threads: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _ranges(ranges: Sequence[IdRange]) -> tuple[object, int]:
    if not ranges:
        return ffi.NULL, 0
    arr = ffi.new("struct dvs_fuse_id_range[]", len(ranges))
    for i, r in enumerate(ranges):
        arr[i].inside = r.inside
        arr[i].outside = r.outside
        arr[i].count = r.count
    return arr, len(ranges)


class RawServer:
    """One C server instance (see the module note for the life cycle)."""

    def __init__(
        self,
        source: str,
        *,
        flags: int,
        workers: int = 0,
        max_pages: int = 0,
        fd_budget: int = 0,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        ring_depth: int = 0,
        ring_threads: int = 0,
        uid_map: Sequence[IdRange] = (),
        gid_map: Sequence[IdRange] = (),
    ) -> None:
        cfg = ffi.new("struct dvs_fuse_config *")
        c_source = ffi.new("char[]", os.fsencode(source))
        uid_arr, n_uid = _ranges(uid_map)
        gid_arr, n_gid = _ranges(gid_map)
        cfg.source = c_source
        cfg.flags = flags
        cfg.n_workers = workers
        cfg.max_pages = max_pages
        cfg.fd_budget = fd_budget
        cfg.entry_timeout_ns = int(entry_timeout * 1e9)
        cfg.attr_timeout_ns = int(attr_timeout * 1e9)
        cfg.ring_depth = ring_depth
        cfg.ring_threads = ring_threads
        cfg.uid_map = uid_arr
        cfg.n_uid_map = n_uid
        cfg.gid_map = gid_arr
        cfg.n_gid_map = n_gid
        out = ffi.new("struct dvs_fuse_server **")
        check(lib.dvs_fuse_new(cfg, out), "starting the FUSE server", source)
        self._ptr: object | None = out[0]

    def _server(self) -> object:
        if self._ptr is None:
            raise ValueError("the FUSE server was freed")
        return self._ptr

    @property
    def dev_fd(self) -> int:
        return int(lib.dvs_fuse_dev_fd(self._server()))

    def start(self) -> None:
        check(lib.dvs_fuse_start(self._server()), "starting the FUSE workers")

    def wait_init(self, timeout: float) -> Negotiated:
        info = ffi.new("struct dvs_fuse_negotiated *")
        ret = lib.dvs_fuse_wait_init(self._server(), int(timeout * 1000), info)
        check(ret, "waiting for FUSE_INIT")
        return Negotiated(
            kernel_major=info.kernel_major,
            kernel_minor=info.kernel_minor,
            proto_minor=info.proto_minor,
            kernel_flags=info.kernel_flags,
            granted_flags=info.granted_flags,
            max_write=info.max_write,
            max_pages=info.max_pages,
            passthrough=bool(info.passthrough),
            writeback=bool(info.writeback),
            max_stack_depth=info.max_stack_depth,
            transport="uring" if info.transport == TRANSPORT_URING else "dev",
            ring_queues=info.ring_queues,
            ring_entries=info.ring_entries,
            ring_threads=info.ring_threads,
        )

    def wait_exit(self, timeout: float) -> bool:
        """True once every worker has ended (after unmount or stop)."""
        return int(lib.dvs_fuse_wait_exit(self._server(), int(timeout * 1000))) == 0

    def stats(self) -> Stats:
        st = ffi.new("struct dvs_fuse_stats *")
        check(lib.dvs_fuse_stats(self._server(), st), "reading FUSE statistics")
        by_opcode = {
            OPCODES.get(op, f"op{op}"): int(st.by_opcode[op])
            for op in range(lib.DVS_FUSE_MAX_OPCODE)
            if st.by_opcode[op]
        }
        return Stats(
            requests=st.requests,
            errors=st.errors,
            by_opcode=by_opcode,
            bytes_read=st.bytes_read,
            bytes_written=st.bytes_written,
            inodes=st.inodes,
            open_files=st.open_files,
            path_fds=st.path_fds,
            fd_evictions=st.fd_evictions,
            handle_opens=st.handle_opens,
            passthrough_opens=st.passthrough_opens,
            backing_files=st.backing_files,
            interrupts=st.interrupts,
            blocked_locks=st.blocked_locks,
            workers=st.workers,
            ring_requests=st.ring_requests,
            ring_commit_errors=st.ring_commit_errors,
            ring_threads=st.ring_threads,
        )

    def drain_log(self) -> list[str]:
        lines: list[str] = []
        buf = ffi.new("char[]", 16384)
        while True:
            n = lib.dvs_fuse_log_drain(self._server(), buf, 16384)
            if n <= 0:
                return lines
            lines.extend(ffi.string(buf, n).decode(errors="replace").splitlines())

    def stop(self) -> None:
        if self._ptr is not None:
            check(lib.dvs_fuse_stop(self._ptr), "stopping the FUSE server")

    def free(self) -> None:
        if self._ptr is not None:
            lib.dvs_fuse_free(self._ptr)
            self._ptr = None

    def fuzz_request(self, request: bytes, reply_cap: int = 1 << 21) -> bytes | None:
        """Serve one raw request on a ``NO_DEVICE`` server; the reply bytes, or None when
        the request has no reply. Raises OSError only when no reply could be addressed."""
        reply = ffi.new("uint8_t[]", reply_cap)
        reply_len = ffi.new("uint32_t *")
        check(
            lib.dvs_fuse_fuzz_request(
                self._server(), request, len(request), reply, reply_cap, reply_len
            ),
            "serving a raw FUSE request",
        )
        if reply_len[0] == 0:
            return None
        return bytes(ffi.buffer(reply, reply_len[0]))
