"""Starting, mounting, observing and stopping a CntrFS server.

Kernel semantics relied on:
- A FUSE filesystem is created with the new mount API: ``fsopen("fuse")``, ``fsconfig`` of
  ``fd`` (our /dev/fuse descriptor), ``rootmode``, ``user_id``/``group_id``,
  ``allow_other`` and ``default_permissions``, then ``FSCONFIG_CMD_CREATE`` (the kernel
  queues FUSE_INIT right there) and ``fsmount`` -- a *detached* mount, attached with
  ``move_mount`` at a path, or handed to another mount namespace (container attach). The
  fsopen descriptor references the device, so it is closed at once: otherwise killing the
  server would not abort the connection.
- ``default_permissions``: the kernel checks permissions against the attributes we report
  (which are mapped through the target's id maps) before a request reaches us; the server
  then acts with the caller's (mapped) credentials, so the backing filesystem checks again.
  ``allow_other``: callers in other user namespaces (a container's) may use the mount.
- Unmounting makes the workers' reads fail with ENODEV: they end by themselves. A lazy
  unmount (MNT_DETACH) of a busy mount keeps serving the open files until they are closed.
- Transport (``uring=auto|on|off``): FUSE over io_uring (Linux 6.14) is offered by the
  kernel at INIT only while the host-global parameter
  ``/sys/module/fuse/parameters/enable_uring`` is Y; the kernel reads it when it sends
  INIT, when it processes the reply and when ring entries register, never afterwards for
  a connection that has it. dvs leaves that knob alone unless the mount asks for
  ``enable_uring``: then it is set to Y around this mount's INIT and registration only
  and restored at once (under a lock, so concurrent dvs mounts restore the right value).
  ``auto`` uses the ring when offered and logs why not otherwise; ``on`` fails the mount
  with KernelLacksFeature when the ring cannot be used.
- Stopping aborts the connection explicitly (``abort`` in its fusectl directory, through a
  private detached fusectl mount) before the server's descriptors close. Closing them alone
  aborts it too, but with the ring the io_uring instances hold /dev/fuse references that
  the kernel drops asynchronously (ring exit work): callers in that window got
  ECONNABORTED instead of ENOTCONN. The abort is synchronous: once ``stop`` returns, every
  new request fails with ENOTCONN and requests in flight ended with ECONNABORTED.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import TracebackType

from dvs.errors import DvsError, KernelLacksFeature, NotPermitted
from dvs.lowlevel import fuse as llfuse
from dvs.lowlevel import sys as llsys
from dvs.lowlevel.fuse import IdRange, Negotiated, Stats

log = logging.getLogger("dvs.fs")

FSTYPE_SUBTYPE = "dvs"  # shows as fuse.dvs in /proc/self/mountinfo
URING_KNOB = "/sys/module/fuse/parameters/enable_uring"
URING_KNOB_LOCK = "/run/dvs-fuse-enable-uring.lock"
URING_MODES = ("auto", "on", "off")


_FLAG_OPTIONS: dict[str, tuple[str, bool]] = {
    "ro": ("read_only", True),
    "rw": ("read_only", False),
    "nosuid": ("nosuid", True),
    "suid": ("nosuid", False),
    "nodev": ("nodev", True),
    "dev": ("nodev", False),
    "noexec": ("noexec", True),
    "exec": ("noexec", False),
    "passthrough": ("passthrough", True),
    "nopassthrough": ("passthrough", False),
    "writeback": ("writeback", True),
    "nowriteback": ("writeback", False),
    "allow_other": ("allow_other", True),
    "noallow_other": ("allow_other", False),
    "default_permissions": ("default_permissions", True),
    "nodefault_permissions": ("default_permissions", False),
    "debug": ("debug", True),
    "enable_uring": ("enable_uring", True),
    "uring_nopin": ("uring_pin", False),
}


@dataclass(frozen=True)
class MountOptions:
    """Everything a CntrFS mount can be asked for (``dvs fs mount -o``)."""

    passthrough: bool = True  # kernel passthrough for regular files (Linux 6.9+)
    writeback: bool = True  # writeback cache, used only when passthrough is off
    workers: int = 0  # 0: two per CPU
    max_pages: int = 256  # largest request: 256 pages = 1 MiB
    fd_budget: int = 0  # O_PATH descriptors kept for inodes; 0: half of RLIMIT_NOFILE
    entry_timeout: float = 1.0  # seconds the kernel may cache names (and negative names)
    attr_timeout: float = 1.0  # seconds it may cache attributes
    read_only: bool = False
    nosuid: bool = False
    nodev: bool = False
    noexec: bool = False
    allow_other: bool = True
    default_permissions: bool = True
    debug: bool = False  # log every request (slow)
    uring: str = "auto"  # FUSE over io_uring: auto (when offered), on (required), off
    enable_uring: bool = False  # set the host's enable_uring knob to Y around this INIT
    ring_depth: int = 0  # ring entries per ring thread and queue; 0: 1
    ring_threads: int = 0  # threads serving ring entries; 0: as many as workers
    uring_pin: bool = True  # pin ring threads to their queue's CPU
    uid_map: tuple[IdRange, ...] = ()
    gid_map: tuple[IdRange, ...] = ()

    @classmethod
    def parse(cls, text: str, base: MountOptions | None = None) -> MountOptions:
        """Parse ``-o`` syntax: ``ro,nopassthrough,timeout=5,workers=4,uid_map=0:100000:65536``."""
        opts = base or cls()
        changes: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if not value and key in _FLAG_OPTIONS:
                name, flag = _FLAG_OPTIONS[key]
                changes[name] = flag
            elif key in ("workers", "max_pages", "fd_budget", "ring_depth", "ring_threads"):
                changes[key] = _int_option(key, value)
            elif key == "uring":
                if value not in URING_MODES:
                    raise DvsError(f"mount option uring is one of {URING_MODES}, not {value!r}")
                changes["uring"] = value
            elif key == "timeout":
                changes["entry_timeout"] = changes["attr_timeout"] = _float_option(key, value)
            elif key in ("entry_timeout", "attr_timeout"):
                changes[key] = _float_option(key, value)
            elif key in ("uid_map", "gid_map"):
                changes[key] = parse_id_map(value)
            else:
                raise DvsError(f"unknown mount option {item!r}")
        return replace(opts, **changes)  # type: ignore[arg-type]

    def server_flags(self) -> int:
        flags = 0
        if self.passthrough:
            flags |= llfuse.WANT_PASSTHROUGH
        if self.writeback:
            flags |= llfuse.WANT_WRITEBACK
        if self.debug:
            flags |= llfuse.DEBUG
        if self.uring != "off":
            flags |= llfuse.WANT_URING
        if not self.uring_pin:
            flags |= llfuse.URING_NO_PIN
        return flags

    def mount_attrs(self) -> int:
        attrs = 0
        if self.read_only:
            attrs |= llsys.MOUNT_ATTR_RDONLY
        if self.nosuid:
            attrs |= llsys.MOUNT_ATTR_NOSUID
        if self.nodev:
            attrs |= llsys.MOUNT_ATTR_NODEV
        if self.noexec:
            attrs |= llsys.MOUNT_ATTR_NOEXEC
        return attrs


def _int_option(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DvsError(f"mount option {key} needs an integer, got {value!r}") from None
    if number < 0:
        raise DvsError(f"mount option {key} must not be negative")
    return number


def _float_option(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DvsError(f"mount option {key} needs a number of seconds, got {value!r}") from None
    if number < 0:
        raise DvsError(f"mount option {key} must not be negative")
    return number


def parse_id_map(text: str) -> tuple[IdRange, ...]:
    """``inside:outside:count[/inside:outside:count...]`` (the uid_map columns)."""
    ranges = []
    for part in filter(None, text.replace("/", " ").split()):
        fields = part.split(":")
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise DvsError(f"id map entries are inside:outside:count, got {part!r}")
        inside, outside, count = (int(f) for f in fields)
        if count == 0 or inside + count > 1 << 32 or outside + count > 1 << 32:
            raise DvsError(f"id map entry {part!r} is out of range")
        ranges.append(IdRange(inside, outside, count))
    return tuple(ranges)


def read_id_map(pid: int, kind: str) -> tuple[IdRange, ...]:
    """The uid_map or gid_map of process ``pid``; () when it is the identity (init ns)."""
    if kind not in ("uid", "gid"):
        raise ValueError(kind)
    with open(f"/proc/{pid}/{kind}_map") as f:
        ranges = tuple(IdRange(int(a), int(b), int(c)) for a, b, c in (line.split() for line in f))
    if ranges == (IdRange(0, 0, 4294967295),):
        return ()
    return ranges


class CntrFs:
    """One CntrFS server for one source directory, mounted once.

    ``mount(path)`` attaches it at a path; ``make_mount_fd()`` returns a detached mount for
    another mount namespace. Either starts the C workers and waits for FUSE_INIT. ``stop``
    (or leaving the ``with`` block) unmounts a path mount and aborts the connection.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        options: MountOptions | None = None,
        *,
        extra_flags: int = 0,
    ):
        """``extra_flags``: further ``dvs.lowlevel.fuse`` server flags (fault injection in
        tests, e.g. TEST_URING_BAD_QID)."""
        self.source = os.path.realpath(os.fspath(source))
        if not os.path.isdir(self.source):
            raise DvsError(f"the FUSE source {self.source!r} is not a directory")
        self.options = options or MountOptions()
        self.mountpoint: str | None = None
        self.negotiated: Negotiated | None = None
        self._raw = llfuse.RawServer(
            self.source,
            flags=self.options.server_flags() | extra_flags,
            workers=self.options.workers,
            max_pages=self.options.max_pages,
            fd_budget=self.options.fd_budget,
            entry_timeout=self.options.entry_timeout,
            attr_timeout=self.options.attr_timeout,
            ring_depth=self.options.ring_depth,
            ring_threads=self.options.ring_threads,
            uid_map=self.options.uid_map,
            gid_map=self.options.gid_map,
        )
        self._started = False
        self._stopped = False
        self._log_history: list[str] = []  # recent server log lines (error messages)
        self._conn_id: int | None = None  # the connection's fusectl name (its st_dev)

    # ---- mounting ------------------------------------------------------------------------

    def make_mount_fd(self, init_timeout: float = 10.0) -> int:
        """Create the FUSE filesystem as a detached mount; the caller owns the returned fd."""
        if self._started:
            raise DvsError("this CntrFS server is already mounted; start another one")
        with contextlib.ExitStack() as knob:
            if self.options.enable_uring and self.options.uring != "off":
                try:
                    knob.enter_context(uring_knob_enabled())
                except DvsError as exc:
                    if self.options.uring == "on":
                        raise
                    # uring=auto: a knob we cannot set only means /dev/fuse
                    log.warning("CntrFS: enable_uring: %s; requests go through /dev/fuse", exc)
            mount_fd = self._make_mount_fd(init_timeout)
        negotiated = self.negotiated
        if self.options.uring == "on" and negotiated and negotiated.transport != "uring":
            os.close(mount_fd)
            self.stop()
            raise KernelLacksFeature(
                "FUSE over io_uring",
                f"Linux 6.14 and {URING_KNOB}=Y (or -o enable_uring)",
                "; ".join(line for line in self._log_history if "ring" in line.lower()),
            )
        return mount_fd

    def _make_mount_fd(self, init_timeout: float) -> int:
        opts = self.options
        try:
            fsfd = llsys.fsopen("fuse")
        except OSError as exc:
            raise _mount_error(exc, "fsopen(fuse)") from exc
        try:
            config = [
                ("source", self.source),
                ("subtype", FSTYPE_SUBTYPE),
                ("fd", str(self._raw.dev_fd)),
                ("rootmode", "40000"),
                ("user_id", "0"),
                ("group_id", "0"),
            ]
            for key, value in config:
                llsys.fsconfig(fsfd, llsys.FSCONFIG_SET_STRING, key, value)
            if opts.allow_other:
                llsys.fsconfig(fsfd, llsys.FSCONFIG_SET_FLAG, "allow_other")
            if opts.default_permissions:
                llsys.fsconfig(fsfd, llsys.FSCONFIG_SET_FLAG, "default_permissions")
            llsys.fsconfig(fsfd, llsys.FSCONFIG_CMD_CREATE)
            mount_fd = llsys.fsmount(fsfd, llsys.FSMOUNT_CLOEXEC, opts.mount_attrs())
        except OSError as exc:
            raise _mount_error(exc, "creating the FUSE mount") from exc
        finally:
            os.close(fsfd)
        try:
            self._raw.start()
            self._started = True
            self.wait_initialized(init_timeout)
            # only now: a stat of the mount before INIT waits for the connection
            self._conn_id = os.minor(os.fstat(mount_fd).st_dev)  # anonymous device: major 0
        except BaseException:
            os.close(mount_fd)
            raise
        return mount_fd

    def mount(self, mountpoint: str | os.PathLike[str], init_timeout: float = 10.0) -> None:
        """Mount at ``mountpoint`` (an existing directory)."""
        target = os.path.realpath(os.fspath(mountpoint))
        if not os.path.isdir(target):
            raise DvsError(f"the mount point {target!r} is not a directory")
        mount_fd = self.make_mount_fd(init_timeout)
        try:
            llsys.move_mount(mount_fd, "", llsys.AT_FDCWD, target, llsys.MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as exc:
            self.stop()
            raise _mount_error(exc, f"attaching the FUSE mount at {target}") from exc
        finally:
            os.close(mount_fd)
        self.mountpoint = target
        log.info("CntrFS: %s mounted at %s", self.source, target)

    def wait_initialized(self, timeout: float = 10.0) -> Negotiated:
        try:
            self.negotiated = self._raw.wait_init(timeout)
        except OSError as exc:
            self._forward_log()
            raise DvsError(f"the kernel did not initialise the FUSE connection: {exc}") from exc
        self._forward_log()
        return self.negotiated

    def unmount(self, lazy: bool = False) -> None:
        if self.mountpoint is None:
            return
        llsys.umount2(self.mountpoint, llsys.MNT_DETACH if lazy else 0)
        log.info("CntrFS: unmounted %s", self.mountpoint)
        self.mountpoint = None

    def wait_unmounted(self, timeout: float | None = None) -> bool:
        """Block until the kernel ends the connection (unmount); True if it did."""
        if not self._started:
            return True
        if timeout is None:
            while not self._raw.wait_exit(3600.0):
                pass
            return True
        return self._raw.wait_exit(timeout)

    # ---- observing -----------------------------------------------------------------------

    def stats(self) -> Stats:
        return self._raw.stats()

    def log_lines(self) -> list[str]:
        """Pending server log lines (negotiation results, degradations); also logged."""
        return self._forward_log()

    def _forward_log(self) -> list[str]:
        lines = self._raw.drain_log()
        self._log_history.extend(lines[-50:])
        del self._log_history[:-50]
        for line in lines:
            level = logging.WARNING if "fail" in line or "did not" in line else logging.INFO
            log.log(level, "CntrFS %s: %s", self.source, line)
        return lines

    # ---- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """Unmount (lazily) if mounted at a path, end the workers, abort the connection."""
        if self._stopped:
            return
        self._stopped = True
        if self.mountpoint is not None:
            try:
                self.unmount(lazy=True)
            except OSError as exc:
                log.warning("CntrFS: unmounting %s: %s", self.mountpoint, exc)
                self.mountpoint = None
        if self._started and self._conn_id is not None:
            abort_connection(self._conn_id)
        self._raw.stop()
        self._forward_log()

    def close(self) -> None:
        self.stop()
        self._raw.free()

    def __enter__(self) -> CntrFs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def abort_connection(conn_id: int) -> bool:
    """Abort FUSE connection ``conn_id`` now through a private fusectl mount.

    fusectl is one superblock per host listing every connection; a detached mount of it
    touches no mount table. False (logged) when it cannot be done: closing the server's
    descriptors still aborts the connection, only later.
    """
    try:
        fsfd = llsys.fsopen("fusectl")
        try:
            llsys.fsconfig(fsfd, llsys.FSCONFIG_CMD_CREATE)
            mnt = llsys.fsmount(fsfd)
        finally:
            os.close(fsfd)
        try:
            fd = os.open(f"{conn_id}/abort", os.O_WRONLY | os.O_CLOEXEC, dir_fd=mnt)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        finally:
            os.close(mnt)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the connection has already ended
            log.warning("CntrFS: aborting FUSE connection %d via fusectl: %s", conn_id, exc)
        return False
    return True


@contextlib.contextmanager
def uring_knob_enabled() -> Iterator[None]:
    """Hold the host's enable_uring knob at Y, then restore what it was.

    The knob is global to the host; a lock file serialises dvs mounts that touch it, so one
    never restores a value another mount set meanwhile.
    """
    try:
        lock = os.open(URING_KNOB_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DvsError(f"enable_uring: cannot open {URING_KNOB_LOCK}: {exc.strerror}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(URING_KNOB) as f:
                before = f.read().strip()
        except OSError as exc:
            raise KernelLacksFeature(
                "FUSE over io_uring", "Linux 6.14 (CONFIG_FUSE_IO_URING)", str(exc)
            ) from exc
        changed = before != "Y"
        if changed:
            try:
                with open(URING_KNOB, "w") as f:
                    f.write("Y")
            except OSError as exc:
                raise NotPermitted(f"enable_uring: writing {URING_KNOB}: {exc.strerror}") from exc
            log.info("CntrFS: %s set to Y for this mount's INIT (was %s)", URING_KNOB, before)
        try:
            yield
        finally:
            if changed:
                with open(URING_KNOB, "w") as f:
                    f.write(before)
                log.info("CntrFS: %s restored to %s", URING_KNOB, before)
    finally:
        os.close(lock)


def _mount_error(exc: OSError, what: str) -> DvsError:
    if exc.errno == errno.EPERM:
        return NotPermitted(f"{what}: mounting FUSE needs CAP_SYS_ADMIN ({exc.strerror})")
    if exc.errno == errno.ENODEV:
        return KernelLacksFeature("the fuse filesystem", "CONFIG_FUSE_FS", str(exc))
    return DvsError(f"{what}: {exc.strerror or exc}")
