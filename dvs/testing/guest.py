"""``LinuxGuest``: a stock Debian kernel booted under QEMU-TCG, driven over its serial console.

Why TCG and not KVM: ``/dev/kvm`` on the project's machines is kvm-pvm, which runs small
hand-made guests but cannot boot a stock Linux kernel (notes/environment.md). QEMU's TCG
(``-accel tcg``) emulates the whole CPU in software; the kit's kernel + busybox initramfs
reaches its shell in a few seconds. Guest RAM is still one mapping in the QEMU process
(anonymous by default, a shared memfd with ``memfd_ram=True`` as vhost-user back-ends need),
so host-side memory introspection works against these guests as it would under KVM.

Machine: ``-nodefaults`` (no NIC, VGA, floppy drive, parallel port or default monitor; only
the i440fx ``pc`` chipset devices) plus exactly what we add: the serial port, a QMP socket and
the caller's ``qemu_args``. ``-no-reboot`` and ``panic=-1`` make a guest panic end QEMU, which
the fixture reports instead of hanging. KASLR is on unless ``kaslr=False`` (``nokaslr``).
The CPU model defaults to TCG's ``qemu64``: vendor AuthenticAMD (so the kernel skips page
table isolation unless ``kernel_args=["pti=on"]``), no PCID/SMEP/SMAP, 4-level paging with
48-bit virtual addresses. ``cpu_model="max"`` offers LA57, and the Debian kernel then runs
with 5-level paging (CR4.LA57 set, 57-bit virtual addresses) -- pick it on purpose when
testing page-table walkers against a live guest.

Serial console protocol. The fixture listens on a unix socket of its own and QEMU connects to
it as a client (``-chardev socket,server=off``) at start-up, before the guest runs, so no
console byte is ever lost. A reader thread copies everything into ``serial_log_path`` and an
in-memory buffer. The guest's init (``csrc/guest/initramfs/init``) loads the kit's modules,
lowers the console log level to emergencies only (``dmesg -n 1``) so printk lines cannot tear
command output apart, puts ttyS0 in raw mode (no echo, no line length limit, no ``\\n`` ->
``\\r\\n``), and starts the console agent (``csrc/guest/initramfs/agent``), which prints
``@@DVS-READY <token>@@`` with a token this boot passed on the kernel command line. ``run()``
then sends one line ``<nonce> <timeout> <base64 command>`` and waits for
``\\n@@DVS-BEGIN <nonce>@@\\n<output>@@DVS-END <nonce> <status>@@``: the per-command nonce
keeps output of an earlier command (or of a command that timed out) from being mistaken for
this one, the status is the command's exit status, and the output is exactly what it wrote
(stdout and stderr merged, stdin ``/dev/null``). Each command runs in a fresh ``sh`` as root,
so ``cd`` or variables do not carry over; the guest kills a command at its timeout
(``timeout -s KILL``), which keeps the console usable afterwards.

QMP goes over a second unix socket (``-qmp unix:...,server=on``), see ``guest_qmp``.
``close()`` (and leaving the ``with`` block, also by an exception) kills QEMU, waits for it,
and removes its sockets and temporary files; an ``atexit`` hook does the same for guests a
caller forgot. If the caller dies without either (``os._exit``, as pytest-timeout does, or
SIGKILL), QEMU gets SIGKILL from the kernel (``PR_SET_PDEATHSIG``) -- only its temporary
directory in ``$TMPDIR`` is left behind.
"""

from __future__ import annotations

import atexit
import base64
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from dvs.errors import DvsError
from dvs.lowlevel import sys as lowlevel_sys
from dvs.testing.guest_kit import GuestKit, GuestKitError, guest_kit
from dvs.testing.guest_qmp import QmpClient, QmpError

__all__ = [
    "GuestBootError",
    "GuestCommandTimeout",
    "GuestError",
    "GuestExited",
    "GuestKit",
    "GuestKitError",
    "LinuxGuest",
    "QmpError",
    "guest_kit",
]

DEFAULT_BOOT_TIMEOUT = 180.0
"""Seconds from QEMU start to the ready marker. Measured here: 8-13 s from QEMU start to the
marker (the kernel itself is at init after ~3.5 s; loading the modules and QEMU's own start-up
take the rest). CI runs on 2 vCPUs next to other tests, so leave a wide margin."""

_COMMAND_GRACE = 30.0
"""Extra seconds the host waits after a command's guest-side timeout for the agent to report."""

_SERIAL_TAIL_LINES = 40

_MARKER_OVERLAP = 256
"""Longer than any marker line, so a marker split across two reads is still found."""

_KILLED_STATUS = 128 + 9  # what sh reports for a child killed by SIGKILL


class GuestError(DvsError):
    """A test guest failed to start or to do what it was asked."""


class GuestBootError(GuestError):
    """QEMU exited or the guest did not reach the ready marker in time."""


class GuestExited(GuestError):
    """QEMU is gone (guest panic, poweroff, or killed) while a caller still used the guest."""


class GuestCommandTimeout(GuestError):
    """A command did not finish within its timeout (the guest killed it)."""


class _QemuProcess:
    """The QEMU child, held by a pidfd, that dies with the thread that started it.

    ``PR_SET_PDEATHSIG=SIGKILL`` (set by the cffi spawn helper between fork and exec, where
    Python must not run) kills QEMU when its parent dies without cleaning up -- pytest-timeout
    ends a hung run with ``os._exit``, which skips ``finally`` blocks and ``atexit``. The
    signal follows the *thread* that spawned the child: start guests from a thread that
    outlives them (the main thread in tests). The pidfd rules out signalling a recycled pid.
    """

    def __init__(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "wb") as log, open(os.devnull, "rb") as devnull:
            try:
                self._spawned = lowlevel_sys.spawn(
                    argv,
                    stdio=(devnull.fileno(), log.fileno(), log.fileno()),
                    pdeath_signal=signal.SIGKILL,
                )
            except OSError as exc:
                raise GuestBootError(f"cannot start {argv[0]}: {exc}") from exc
        self.pid = self._spawned.pid
        self._status: int | None = None

    def poll(self) -> int | None:
        """The exit status (``-signal`` if killed by one), or ``None`` while it runs."""
        if self._status is None and self._spawned.pidfd >= 0:
            info = os.waitid(os.P_PIDFD, self._spawned.pidfd, os.WEXITED | os.WNOHANG)
            if info is not None:
                self._status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return self._status

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the exit; return ``poll()``."""
        if self.poll() is None and self._spawned.pidfd >= 0:
            select.select([self._spawned.pidfd], [], [], timeout)
        return self.poll()

    def kill_and_reap(self, timeout: float = 30.0) -> None:
        if self.poll() is None:
            self._spawned.kill(signal.SIGKILL)
            ready, _, _ = select.select([self._spawned.pidfd], [], [], timeout)
            if not ready:
                raise GuestError(f"QEMU pid {self.pid} survived SIGKILL for {timeout:.0f} s")
            self.poll()
        self._spawned.close()


class _SerialConsole:
    """The fixture's end of ttyS0: a listening socket QEMU connects to, and a reader thread."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(str(socket_path))
        self._listener.listen(1)
        self._connection: socket.socket | None = None
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._log: BinaryIO = open(log_path, "ab")  # noqa: SIM115 - closed in close()

    def accept(self, deadline: float, alive: Callable[[], bool]) -> None:
        """Wait for QEMU to connect; ``alive()`` is false once QEMU has exited."""
        self._listener.settimeout(0.2)
        while True:
            try:
                connection, _ = self._listener.accept()
                break
            except TimeoutError:
                if not alive():
                    raise GuestBootError("QEMU exited before connecting its serial port") from None
                if time.monotonic() >= deadline:
                    raise GuestBootError(
                        f"QEMU did not connect to the serial socket {self.socket_path}"
                    ) from None
        connection.settimeout(None)
        self._connection = connection
        self._reader = threading.Thread(
            target=self._read_loop, name=f"dvs-serial-{self.socket_path.parent.name}", daemon=True
        )
        self._reader.start()

    def _read_loop(self) -> None:
        assert self._connection is not None
        try:
            while True:
                chunk = self._connection.recv(65536)
                if not chunk:
                    break
                self._log.write(chunk)
                self._log.flush()
                with self._changed:
                    self._buffer += chunk
                    self._changed.notify_all()
        except OSError:
            pass  # the socket was shut down by close()
        finally:
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def send(self, data: bytes) -> None:
        if self._connection is None:
            raise GuestExited("the serial console is not connected")
        try:
            self._connection.sendall(data)
        except OSError as exc:
            raise GuestExited(f"cannot write to the serial console: {exc}") from exc

    @property
    def closed_by_qemu(self) -> bool:
        """QEMU closed the console: it is exiting (it closes sockets before it is reaped)."""
        with self._changed:
            return self._eof

    @property
    def size(self) -> int:
        with self._changed:
            return len(self._buffer)

    def snapshot(self, start: int = 0) -> bytes:
        with self._changed:
            return bytes(self._buffer[start:])

    def wait_for(
        self, pattern: re.Pattern[bytes], start: int, deadline: float, alive: Callable[[], bool]
    ) -> re.Match[bytes] | None:
        """Wait until ``pattern`` matches the console output at or after offset ``start``.

        ``pattern`` must match a short marker (at most ``_MARKER_OVERLAP`` bytes): each new
        chunk is searched together with the tail of what was searched before, not the whole
        buffer again. The match is made on the bytes from ``start`` (``match.string``), so
        its offsets are relative to ``start``. Returns ``None`` at the deadline, at console
        EOF, or once ``alive()`` is false, whichever comes first.
        """
        searched = start
        with self._changed:
            while True:
                resume = max(start, searched - _MARKER_OVERLAP)
                if pattern.search(self._buffer, resume) is not None:
                    return pattern.search(bytes(self._buffer[start:]), resume - start)
                searched = len(self._buffer)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof or not alive():
                    return None
                self._changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._connection is not None:
            self._connection.close()
        self._listener.close()
        self._log.close()


class LinuxGuest:
    """A QEMU-TCG guest running the kit's kernel and busybox initramfs.

    Use as a context manager; ``__enter__`` boots and waits for the ready marker::

        with LinuxGuest() as guest:
            status, output = guest.run("uname -r")
            guest.qmp("query-status")["status"]  # "running"
    """

    def __init__(
        self,
        kit: GuestKit | None = None,
        *,
        memory_mib: int = 512,
        cpus: int = 1,
        kaslr: bool = True,
        memfd_ram: bool = False,
        kernel_args: Sequence[str] = (),
        qemu_args: Sequence[str] = (),
        cpu_model: str = "qemu64",
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        serial_log_path: Path | None = None,
        qemu_binary: str = "qemu-system-x86_64",
    ) -> None:
        """Describe a guest; nothing starts before ``start()`` or ``with``.

        ``memfd_ram`` backs RAM with ``memory-backend-memfd,id=mem,share=on`` (one NUMA node),
        as vhost-user devices need. ``kernel_args`` are appended to the kernel command line and
        ``qemu_args`` to QEMU's. ``serial_log_path`` keeps the console log after ``close()``;
        by default it lives in the guest's temporary directory and is removed with it (the
        text stays readable through ``serial_log``).
        """
        if memory_mib < 128:
            raise ValueError(f"memory_mib={memory_mib}: the kit's kernel needs at least 128 MiB")
        if cpus < 1:
            raise ValueError(f"cpus={cpus}: need at least one vCPU")
        self.kit = kit if kit is not None else guest_kit()
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.kaslr = kaslr
        self.memfd_ram = memfd_ram
        self.extra_kernel_args = tuple(kernel_args)
        self.extra_qemu_args = tuple(qemu_args)
        self.cpu_model = cpu_model
        self.boot_timeout = boot_timeout
        self.qemu_binary = qemu_binary
        self._requested_log_path = serial_log_path

        self.ready_token = secrets.token_hex(8)
        self.run_dir: Path | None = None
        self.boot_seconds: float | None = None
        """Seconds from QEMU start to the ready marker (set by ``start()``)."""
        self._process: _QemuProcess | None = None
        self._console: _SerialConsole | None = None
        self._qmp: QmpClient | None = None
        self._command_lock = threading.Lock()
        self._qmp_lock = threading.Lock()
        self._closed = False
        self._final_log: bytes = b""

    # --- paths and command lines ---------------------------------------------------------

    @property
    def kernel_cmdline(self) -> str:
        words = ["console=ttyS0", "panic=-1", f"dvs.ready={self.ready_token}"]
        if not self.kaslr:
            words.append("nokaslr")
        words.extend(self.extra_kernel_args)
        return " ".join(words)

    def _path(self, name: str) -> Path:
        if self.run_dir is None:
            raise GuestError("the guest has not been started")
        return self.run_dir / name

    @property
    def serial_socket_path(self) -> Path:
        return self._path("serial.sock")

    @property
    def qmp_socket_path(self) -> Path:
        return self._path("qmp.sock")

    @property
    def serial_log_path(self) -> Path:
        if self._requested_log_path is not None:
            return self._requested_log_path
        return self._path("serial.log")

    @property
    def qemu_log_path(self) -> Path:
        """QEMU's own stdout/stderr (warnings, fatal errors)."""
        return self._path("qemu.log")

    def qemu_argv(self) -> list[str]:
        """The QEMU command line (needs ``run_dir``, i.e. a started guest)."""
        argv = [
            self.qemu_binary,
            "-accel", "tcg",
            "-machine", "pc",
            "-cpu", self.cpu_model,
            "-smp", str(self.cpus),
            "-m", f"{self.memory_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(self.kit.bzimage),
            "-initrd", str(self.kit.initramfs),
            "-append", self.kernel_cmdline,
            "-chardev", f"socket,id=dvs-serial,path={self.serial_socket_path},server=off",
            "-serial", "chardev:dvs-serial",
            "-qmp", f"unix:{self.qmp_socket_path},server=on,wait=off",
        ]  # fmt: skip
        if self.memfd_ram:
            argv += [
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
                "-numa", "node,memdev=mem",
            ]  # fmt: skip
        argv += self.extra_qemu_args
        return argv

    # --- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> LinuxGuest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start QEMU and wait until the guest's console agent is ready."""
        if self._process is not None or self._closed:
            raise GuestError("a LinuxGuest can be started once")
        self.run_dir = Path(tempfile.mkdtemp(prefix="dvs-guest."))
        _live_guests.add(self)
        self._console = _SerialConsole(self.serial_socket_path, self.serial_log_path)
        started = time.monotonic()
        deadline = started + self.boot_timeout
        qemu_path = shutil.which(self.qemu_binary)
        if qemu_path is None:
            raise GuestBootError(f"{self.qemu_binary} not found (apt package qemu-system-x86)")
        argv = self.qemu_argv()
        argv[0] = qemu_path
        self._process = _QemuProcess(argv, self.qemu_log_path)
        try:
            self._console.accept(deadline, self.is_running)
        except GuestBootError as exc:
            raise GuestBootError(f"{exc}\n{self._diagnostics()}") from None
        marker = re.compile(rb"@@DVS-READY " + self.ready_token.encode() + rb"@@")
        if self._console.wait_for(marker, 0, deadline, self.is_running) is None:
            if self.is_running():
                reason = f"the guest did not become ready within {self.boot_timeout:.0f} s"
            else:
                reason = f"QEMU exited with status {self._process.poll()} during boot"
            raise GuestBootError(f"{reason}\n{self._diagnostics()}")
        self.boot_seconds = time.monotonic() - started

    def close(self) -> None:
        """Kill QEMU and remove sockets and temporary files. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._qmp is not None:
                self._qmp.close()
        finally:
            try:
                self._kill_qemu()
            finally:
                try:
                    if self._console is not None:
                        self._console.close()
                        self._final_log = self._console.snapshot()
                finally:
                    if self.run_dir is not None:
                        shutil.rmtree(self.run_dir, ignore_errors=True)
                    _live_guests.discard(self)

    def _kill_qemu(self) -> None:
        if self._process is not None:
            self._process.kill_and_reap()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The QEMU process id (for ptrace, /proc/PID/maps, process_vm_readv ...)."""
        if self._process is None:
            raise GuestError("the guest has not been started")
        return self._process.pid

    @property
    def serial_log(self) -> str:
        """Everything the serial console printed so far (kept after ``close()``)."""
        raw = self._console.snapshot() if self._console is not None else self._final_log
        return raw.decode("utf-8", errors="replace")

    def _diagnostics(self) -> str:
        tail = "\n".join(self.serial_log.splitlines()[-_SERIAL_TAIL_LINES:])
        try:
            qemu_output = self.qemu_log_path.read_text(errors="replace").strip()
        except (OSError, GuestError):
            qemu_output = ""
        parts = [f"--- last {_SERIAL_TAIL_LINES} serial console lines ---", tail or "(none)"]
        if qemu_output:
            parts += ["--- QEMU output ---", qemu_output]
        if self.run_dir is not None:
            parts += ["--- QEMU command line ---", " ".join(self.qemu_argv())]
        return "\n".join(parts)

    # --- commands ----------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` with ``sh`` in the guest; return ``(exit status, output)``.

        Output is stdout and stderr merged, byte for byte as written (decoded as UTF-8 with
        replacement). Raises ``GuestCommandTimeout`` if the command outlives ``timeout``
        seconds (the guest kills it, the guest stays usable) and ``GuestExited`` if QEMU dies.
        """
        console = self._console
        if console is None or self.boot_seconds is None or self._closed:
            raise GuestError("run() needs a started guest")
        limit = max(1, math.ceil(timeout))
        nonce = secrets.token_hex(8)
        encoded = base64.b64encode(command.encode()).decode("ascii")
        end_marker = re.compile(
            rb"@@DVS-END " + nonce.encode() + rb" (?P<status>\d+)@@"
            + rb"|@@DVS-BAD-REQUEST " + nonce.encode() + rb"@@"
        )  # fmt: skip
        begin_marker = b"\n@@DVS-BEGIN " + nonce.encode() + b"@@\n"
        with self._command_lock:
            start = console.size
            sent = time.monotonic()
            console.send(f"{nonce} {limit} {encoded}\n".encode("ascii"))
            deadline = sent + limit + _COMMAND_GRACE
            end = console.wait_for(end_marker, start, deadline, self.is_running)
            elapsed = time.monotonic() - sent
        if end is None:
            if console.closed_by_qemu or not self.is_running():
                status = self._process.wait(timeout=10) if self._process is not None else None
                raise GuestExited(
                    f"QEMU exited (status {status}) while running {command!r}\n"
                    f"{self._diagnostics()}"
                )
            raise GuestCommandTimeout(
                f"no answer to {command!r} after {elapsed:.0f} s (timeout {limit} s); the "
                f"serial console is not responding\n{self._diagnostics()}"
            )
        if end.group("status") is None:
            raise GuestError(f"the guest agent could not decode the request for {command!r}")
        output_start = end.string.rfind(begin_marker, 0, end.start())
        if output_start < 0:
            raise GuestError(f"the guest answered {command!r} without a begin marker")
        raw_output = end.string[output_start + len(begin_marker) : end.start()]
        status = int(end.group("status"))
        output = raw_output.decode("utf-8", errors="replace")
        if status == _KILLED_STATUS and elapsed >= limit:
            raise GuestCommandTimeout(
                f"{command!r} did not finish within {limit} s and was killed; output so far:\n"
                f"{output}"
            )
        return status, output

    def check(self, command: str, timeout: float = 60.0) -> str:
        """Like ``run`` but return only the output, raising ``GuestError`` on a non-zero exit."""
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"{command!r} exited with status {status}; output:\n{output}")
        return output

    # --- QMP -----------------------------------------------------------------------------------

    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Execute a QMP command and return its ``return`` value.

        Keyword arguments have ``_`` turned into ``-`` (QMP spells ``command-line``, Python
        cannot); pass ``arguments`` for names that really contain underscores.
        """
        args: dict[str, Any] = dict(arguments or {})
        args.update({key.replace("_", "-"): value for key, value in kwargs.items()})
        with self._qmp_lock:
            return self._qmp_client().execute(command, args)

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``info registers``) through QMP."""
        with self._qmp_lock:
            return self._qmp_client().hmp(command_line)

    def _qmp_client(self) -> QmpClient:
        if self._closed or self._process is None:
            raise GuestError("QMP needs a started guest")
        if self._qmp is None:
            self._qmp = QmpClient(self.qmp_socket_path)
        return self._qmp


_live_guests: set[LinuxGuest] = set()
"""Started, not yet closed guests (strong references: a dropped guest must still be killed)."""


@atexit.register
def _close_forgotten_guests() -> None:
    """Kill the QEMU of guests that were never closed (a caller that crashed or forgot)."""
    for guest in list(_live_guests):
        try:
            guest.close()
        except Exception:  # best effort at interpreter exit: report and go on
            os.write(2, f"dvs: could not clean up guest {guest.run_dir}\n".encode())
