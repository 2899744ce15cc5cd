"""The minimal KVM guest: a 64-bit guest of our own, booted under QEMU, driven from the host.

It exists so the hypervisor-mechanics work (ptrace syscall injection into QEMU, injected KVM
ioctls, memslots, ioeventfd/irqfd, MMIO trapping) has a guest that boots under kvm-pvm, where a
stock Linux kernel does not. The guest is built from ``csrc/guest/minimal/`` with the host's
gcc and ld at fixture time and cached (key: a hash of the sources and the build flags).

Semantics relied on:

- Boot: ``qemu-system-x86_64 -kernel guest.elf`` with an ELF carrying a PVH note
  (XEN_ELFNOTE_PHYS32_ENTRY) enters the guest in 32-bit protected mode, paging off; the guest
  sets up identity-mapped page tables and enters long mode itself (``entry.S``). The default
  firmware is QEMU's qboot (``-bios qboot.rom``): under kvm-pvm, where guest kernel-mode code is
  emulated instruction by instruction, SeaBIOS alone takes about 5 s, qboot well under 1 s.
- Guest RAM: QEMU's ``pc`` machine backs RAM with one anonymous private mapping of exactly the
  RAM size in the QEMU process (the only mapping of that size, seen here), and below the PCI
  hole (we allow at most 2 GiB) guest-physical address == offset into it. We pick that mapping from
  ``/proc/PID/maps`` and confirm it by the status-page magic. Host reads and writes go through
  ``/proc/PID/mem`` (pread/pwrite at the host virtual address): the same pages the vCPU uses, so
  the guest sees writes at once. This deliberately does not use dvs's own process_vm shims: the
  fixture must stay an independent oracle for the code it will test.
- Memory map (``csrc/guest/minimal/guest_abi.h``, mirrored below; a test compares the two)::

      0x0010_0000  guest image (code, data, page tables, stack), < 1 MiB
      0x0010_1000  divert entry: set RIP here (KVM_SET_REGS, gdbstub) and the guest prints
                   ``DVS-GUEST diverted count=N``, counts it and resumes its main loop
      0x0020_0000  status page (guest writes): magic, heartbeat, interrupt counters, fault info
      0x0020_1000  mailbox page (shared): request and response of one command at a time
      0x0030_0000  scratch, 1 MiB the guest never touches by itself
      0xFEC0_0000  IOAPIC, 0xFEE0_0000 LAPIC (QEMU's in-kernel irqchip under KVM)

  The guest identity-maps 0-4 GiB and reaches any other GPA below 2^MAXPHYADDR through a
  movable, uncached 2 MiB window, so READ/WRITE commands work on memslots added above 4 GiB.
- Status page (u64 words): +0x00 magic "DVSTATUS", +0x08 heartbeat (incremented by every
  main-loop iteration), +0x10 TSC ticks between serial heartbeat lines (host-writable), +0x18
  lines printed, +0x20 hvm_start_info GPA, +0x28 MAXPHYADDR, +0x30 interrupts taken, +0x38 last
  vector, +0x40 fault vector + 1 (0 = alive), +0x48 error code, +0x50 RIP, +0x58 CR2, +0x60 the
  configured interrupt controller, +0x68 diversions, +0x800 u64[256] interrupts per vector.
- Mailbox protocol (u64 words): +0x00 magic "DVSMBOX1", +0x08 request_seq, +0x10 command,
  +0x18..+0x30 args 0-3, +0x40 status, +0x48 result, +0x50 response_seq. The host writes command
  and args, then (in a second write) request_seq = previous + 1. The guest's main loop notices
  request_seq != response_seq, runs the command, writes status and result, then response_seq,
  then prints ``DVS-GUEST mailbox seq=N command=C arg0=.. arg1=.. status=S result=0x..``.
  One request is in flight at a time. Both sides are x86 and each writes its seq word last, so a
  reader that sees the new seq sees the fields written before it.
- Interrupts: the guest can run the legacy 8259 pair (vectors 0x20 + IRQ) or the LAPIC with
  IOAPIC routes (vector chosen per pin, 0x30-0xEF); every vector >= 32 (and NMI) is counted per
  vector and EOI'd. Under KVM both chips live in the host kernel, so what QEMU raises with
  KVM_IRQ_LINE, and later what an irqfd raises on a GSI, reaches them directly; in QEMU's pc
  routing GSI n is IOAPIC pin n, except GSI 0 (PIT) which is pin 2. Exceptions are fatal: the
  guest records them in the status page, prints ``DVS-GUEST fault ...`` and halts.
- QEMU is started through dvs's spawn helper with PR_SET_PDEATHSIG=SIGKILL, so even a test
  process killed outright takes its guest with it; ``close()`` kills and reaps QEMU and
  removes the work directory (serial log, QMP socket) on every exit path.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import hashlib
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from dvs.errors import DvsError
from dvs.testing.cache import artefact
from dvs.testing.guest_qmp import QmpClient

if TYPE_CHECKING:
    from dvs.lowlevel.sys import Spawned

GUEST_SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "guest" / "minimal"
GUEST_SOURCES = ("guest_abi.h", "entry.S", "guest.c", "guest.ld")
IMAGE_NAME = "guest.elf"

COMPILE_FLAGS = (
    "-O2",
    "-m64",
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=small",  # the image sits at 1 MiB: 32-bit absolute addresses suffice
    "-mno-red-zone",  # interrupts push onto the interrupted stack
    "-mgeneral-regs-only",  # no SSE state to set up, nothing KVM's emulator lacks
    "-fno-stack-protector",
    "-fcf-protection=none",  # no ENDBR64: nothing to gain, one more opcode to emulate
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wextra",
    "-Werror",
)
LINK_FLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-z",
    "noexecstack",
    "-z",
    "max-page-size=4096",
    "--no-warn-rwx-segments",  # one RWX segment is the point: a flat image
)

# ---- the guest ABI (mirror of csrc/guest/minimal/guest_abi.h) ----------------------------------

LOAD_GPA = 0x0010_0000
STATUS_GPA = 0x0020_0000
MAILBOX_GPA = 0x0020_1000
SCRATCH_GPA = 0x0030_0000
SCRATCH_SIZE = 0x0010_0000
WINDOW_VA = 0x0000_0080_0000_0000
DIVERT_ENTRY = 0x0010_1000
READY_MARKER = "DVS-MINIMAL-GUEST-READY"

STATUS_MAGIC_VALUE = 0x5355_5441_5453_5644  # "DVSTATUS"
STATUS_MAGIC = 0x000
STATUS_HEARTBEAT = 0x008
STATUS_REPORT_PERIOD = 0x010
STATUS_REPORTS = 0x018
STATUS_PVH_START_INFO = 0x020
STATUS_MAXPHYADDR = 0x028
STATUS_IRQ_TOTAL = 0x030
STATUS_LAST_VECTOR = 0x038
STATUS_FAULT_VECTOR = 0x040
STATUS_FAULT_ERROR = 0x048
STATUS_FAULT_RIP = 0x050
STATUS_FAULT_CR2 = 0x058
STATUS_IRQ_MODE = 0x060
STATUS_DIVERSIONS = 0x068
STATUS_IRQ_COUNTS = 0x800

MAILBOX_MAGIC_VALUE = 0x3158_4F42_4D53_5644  # "DVSMBOX1"
MAILBOX_MAGIC = 0x000
MAILBOX_REQUEST_SEQ = 0x008
MAILBOX_COMMAND = 0x010
MAILBOX_ARG0 = 0x018
MAILBOX_ARG1 = 0x020
MAILBOX_ARG2 = 0x028
MAILBOX_ARG3 = 0x030
MAILBOX_STATUS = 0x040
MAILBOX_RESULT = 0x048
MAILBOX_RESPONSE_SEQ = 0x050
MAILBOX_ARGS = 4

ROUTE_LEVEL = 0x1
ROUTE_ACTIVE_LOW = 0x2

IRQ_MODE_NONE = 0
IRQ_MODE_PIC = 1
IRQ_MODE_APIC = 2

VECTOR_PIC_BASE = 0x20
VECTOR_APIC_FIRST = 0x30
VECTOR_APIC_LAST = 0xEF
VECTOR_SPURIOUS = 0xFF
VECTOR_NMI = 2


class Command(enum.IntEnum):
    """Mailbox commands (``DVS_CMD_*``); arguments as in guest_abi.h."""

    PING = 1  # -> heartbeat
    READ = 2  # gpa, width -> value
    WRITE = 3  # gpa, value, width
    PORT_IN = 4  # port, width -> value
    PORT_OUT = 5  # port, value, width
    PIC_SETUP = 6  # unmask bits (bit n = ISA IRQ n)
    APIC_SETUP = 7  # -> LAPIC id
    IOAPIC_ROUTE = 8  # pin, vector, ROUTE_* flags -> previous low dword
    IRQ_ENABLE = 9
    IRQ_DISABLE = 10
    HALT = 11  # -> interrupts taken so far, after the next interrupt
    SELF_IPI = 12  # vector


class MailboxStatus(enum.IntEnum):
    """Response codes (``DVS_MBOX_*``)."""

    OK = 0
    BAD_COMMAND = 1
    BAD_ARGUMENT = 2


# ---- errors -----------------------------------------------------------------------------------


class MinimalGuestError(DvsError):
    """The minimal guest could not be built, booted or driven; the message carries the evidence."""


class GuestTimeout(MinimalGuestError, TimeoutError):
    """The guest did not print or answer in time."""


class GuestCommandFailed(MinimalGuestError):
    """The guest answered a mailbox command with a status other than OK."""

    def __init__(self, command: int, args: Sequence[int], status: int) -> None:
        self.command = command
        self.args = tuple(args)
        self.status = status
        try:
            name = Command(command).name
        except ValueError:
            name = str(command)
        try:
            status_name = MailboxStatus(status).name
        except ValueError:
            status_name = str(status)
        shown = ", ".join(hex(a) for a in args)
        super().__init__(f"guest refused {name}({shown}): expected OK, got {status_name}")


@dataclass(frozen=True)
class MailboxReply:
    sequence: int
    status: int
    result: int


# ---- building ----------------------------------------------------------------------------------


def _source_digest() -> str:
    digest = hashlib.sha256()
    for name in GUEST_SOURCES:
        digest.update(name.encode() + b"\0")
        digest.update((GUEST_SOURCE_DIR / name).read_bytes() + b"\0")
    digest.update(repr((COMPILE_FLAGS, LINK_FLAGS)).encode())
    return digest.hexdigest()[:16]


def _run_tool(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MinimalGuestError(
            f"building the minimal guest: {' '.join(argv)} exited {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def _build_into(out: Path) -> None:
    include = f"-I{GUEST_SOURCE_DIR}"
    objects: list[str] = []
    for source in ("entry.S", "guest.c"):
        obj = str(out / (Path(source).stem + ".o"))
        source_path = str(GUEST_SOURCE_DIR / source)
        _run_tool(["gcc", *COMPILE_FLAGS, include, "-c", source_path, "-o", obj], out)
        objects.append(obj)
    linker_script = str(GUEST_SOURCE_DIR / "guest.ld")
    _run_tool(["ld", *LINK_FLAGS, "-T", linker_script, "-o", str(out / IMAGE_NAME), *objects], out)
    for obj in objects:
        os.unlink(obj)


def build_guest_image() -> Path:
    """The guest ELF, built once per source version and cached (see ``dvs.testing.cache``)."""
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise MinimalGuestError(f"building the minimal guest needs {tool!r} on PATH")
    return artefact(f"minimal-kvm-guest-{_source_digest()}", _build_into) / IMAGE_NAME


# ---- probing -----------------------------------------------------------------------------------

_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
_KVM_API_VERSION = 12


def kvm_usable(boot: bool = True) -> tuple[bool, str]:
    """Can /dev/kvm run the minimal guest here? Returns (answer, reason or flavour).

    Checks the device, the KVM API version and VM creation; with ``boot`` it also boots the
    guest under ``-enable-kvm`` once per process and waits for its marker (about a second).
    """
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return False, f"cannot open /dev/kvm: {error}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != _KVM_API_VERSION:
            return False, f"KVM API version {version}, expected {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as error:
        return False, f"KVM_CREATE_VM failed: {error}"
    finally:
        os.close(fd)
    if shutil.which("qemu-system-x86_64") is None:
        return False, "qemu-system-x86_64 not on PATH"
    flavour = next(
        (m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.exists(f"/sys/module/{m}")),
        "kvm",
    )
    if not boot:
        return True, flavour
    return _boot_probe(flavour)


@functools.cache
def _boot_probe(flavour: str) -> tuple[bool, str]:
    try:
        with MinimalGuest(accel="kvm", boot_timeout=60.0) as guest:
            return True, f"{flavour}: minimal guest booted in {guest.boot_seconds:.2f} s"
    except MinimalGuestError as error:
        return False, f"{flavour}: minimal guest did not boot: {error}"


# ---- the guest ---------------------------------------------------------------------------------

_QEMU_FIRMWARE = {"qboot": "/usr/share/qemu/qboot.rom"}
_MAX_MEMORY_MIB = 2048  # keep all RAM below the PCI hole: GPA == offset into the RAM mapping


class MinimalGuest:
    """A running minimal guest under QEMU; use as a context manager.

    ``accel`` is ``"kvm"`` (``-enable-kvm``) or ``"tcg"`` (QEMU's interpreter, to compare).
    ``firmware`` is ``"qboot"`` (fast) or ``"seabios"`` (QEMU's default BIOS).
    ``extra_qemu_args`` are appended to QEMU's command line, e.g. ``("-device", "pc-testdev")``.
    """

    def __init__(
        self,
        *,
        accel: Literal["kvm", "tcg"] = "kvm",
        memory_mib: int = 32,
        firmware: Literal["qboot", "seabios"] = "qboot",
        boot_timeout: float = 60.0,
        extra_qemu_args: Sequence[str] = (),
        qemu_binary: str = "qemu-system-x86_64",
    ) -> None:
        if not 16 <= memory_mib <= _MAX_MEMORY_MIB:
            raise ValueError(f"memory_mib must be in 16..{_MAX_MEMORY_MIB}, got {memory_mib}")
        self.accel = accel
        self.memory_mib = memory_mib
        self.firmware = firmware
        self.boot_timeout = boot_timeout
        self.extra_qemu_args = tuple(extra_qemu_args)
        self.qemu_binary = qemu_binary
        self.workdir: Path | None = None
        self.boot_seconds = 0.0
        self.ram_host_address = 0
        self._process: Spawned | None = None
        self._mem_fd = -1
        self._qmp: QmpClient | None = None
        self._sequence = 0
        self._pending: int | None = None

    # -- life cycle --

    def __enter__(self) -> MinimalGuest:
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
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise MinimalGuestError("the guest is not running")
        return self._process.pid

    @property
    def serial_path(self) -> Path:
        return self._work_path("serial.log")

    @property
    def qmp_path(self) -> Path:
        return self._work_path("qmp.sock")

    @property
    def qemu_log_path(self) -> Path:
        return self._work_path("qemu.log")

    def _work_path(self, name: str) -> Path:
        if self.workdir is None:
            raise MinimalGuestError("the guest has not been started")
        return self.workdir / name

    def qemu_argv(self, image: Path) -> list[str]:
        qemu = shutil.which(self.qemu_binary)
        if qemu is None:
            raise MinimalGuestError(f"{self.qemu_binary!r} not on PATH")
        argv = [qemu, "-enable-kvm"] if self.accel == "kvm" else [qemu, "-accel", "tcg"]
        argv += [
            "-machine", "pc",
            "-smp", "1",
            "-m", str(self.memory_mib),
            "-nodefaults",
            "-no-reboot",
            "-display", "none",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(image),
        ]  # fmt: skip
        if self.firmware != "seabios":
            argv += ["-bios", _QEMU_FIRMWARE[self.firmware]]
        return argv + list(self.extra_qemu_args)

    def start(self) -> None:
        """Build (cached), start QEMU, wait for the marker and find the guest's RAM."""
        from dvs.lowlevel import sys as llsys

        if self._process is not None:
            raise MinimalGuestError("the guest is already running")
        image = build_guest_image()
        self.workdir = Path(tempfile.mkdtemp(prefix="dvs-kvm-guest-"))
        argv = self.qemu_argv(image)
        (self.workdir / "argv").write_text(" ".join(argv) + "\n")
        log_fd = os.open(self.qemu_log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        started = time.monotonic()
        try:
            self._process = llsys.spawn(
                argv, stdio=(null_fd, log_fd, log_fd), pdeath_signal=signal.SIGKILL
            )
        finally:
            os.close(log_fd)
            os.close(null_fd)
        self.wait_for(re.escape(READY_MARKER), self.boot_timeout, what="ready marker")
        self.boot_seconds = time.monotonic() - started
        self.ram_host_address = self._find_ram()
        self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        if self.read_u64(STATUS_GPA + STATUS_MAGIC) != STATUS_MAGIC_VALUE:
            raise MinimalGuestError(self._evidence("no status magic at the RAM mapping"))
        if self.read_u64(MAILBOX_GPA + MAILBOX_MAGIC) != MAILBOX_MAGIC_VALUE:
            raise MinimalGuestError(self._evidence("no mailbox magic at the RAM mapping"))
        self._sequence = self.read_u64(MAILBOX_GPA + MAILBOX_RESPONSE_SEQ)

    def close(self) -> None:
        """Kill and reap QEMU, drop every fd, remove the work directory. Idempotent.

        Every step runs even if an earlier one raised (ExitStack unwinds them all, last
        registered first: QMP, /proc/PID/mem, kill + reap, pidfd, work directory).
        """
        qmp, self._qmp = self._qmp, None
        mem_fd, self._mem_fd = self._mem_fd, -1
        process, self._process = self._process, None
        workdir, self.workdir = self.workdir, None
        with contextlib.ExitStack() as cleanup:
            if workdir is not None:
                cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
            if process is not None:
                cleanup.callback(process.close)
                cleanup.callback(process.wait, timeout=30)
                cleanup.callback(process.kill, signal.SIGKILL)
            if mem_fd >= 0:
                cleanup.callback(os.close, mem_fd)
            if qmp is not None:
                cleanup.callback(qmp.close)

    def running(self) -> bool:
        """QEMU has not exited (it is not reaped until ``close``)."""
        if self._process is None:
            return False
        ready, _, _ = select.select([self._process.pidfd], [], [], 0)
        return not ready

    # -- serial console --

    def serial_output(self) -> str:
        try:
            return self.serial_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _evidence(self, headline: str) -> str:
        serial_tail = "\n".join(self.serial_output().splitlines()[-15:])
        try:
            qemu_log = self.qemu_log_path.read_text(errors="replace").strip()
        except (FileNotFoundError, MinimalGuestError):
            qemu_log = ""
        state = "running" if self.running() else "exited"
        pid = self._process.pid if self._process is not None else "-"
        return (
            f"{headline} (QEMU pid {pid} {state}, accel={self.accel}, firmware={self.firmware})\n"
            f"--- serial tail ---\n{serial_tail or '(empty)'}\n"
            f"--- QEMU output ---\n{qemu_log[-2000:] or '(empty)'}"
        )

    def wait_for(self, pattern: str, timeout: float, what: str = "") -> re.Match[str]:
        """Wait until the serial output matches the regex ``pattern``; return the match."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = compiled.search(self.serial_output())
            if match:
                return match
            if not self.running():
                raise MinimalGuestError(
                    self._evidence(f"QEMU exited while waiting for {what or pattern!r}")
                )
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    self._evidence(f"no {what or repr(pattern)} on the serial port in {timeout} s")
                )
            time.sleep(0.02)

    # -- guest memory, from the host --

    def _find_ram(self) -> int:
        size = self.memory_mib << 20
        candidates = []
        with open(f"/proc/{self.pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                anonymous = len(fields) < 6
                if anonymous and end - start == size and fields[1].startswith("rw"):
                    candidates.append(start)
        for start in candidates:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
                mem.seek(start + STATUS_GPA + STATUS_MAGIC)
                if struct.unpack("<Q", mem.read(8))[0] == STATUS_MAGIC_VALUE:
                    return start
        raise MinimalGuestError(
            self._evidence(
                f"no anonymous {self.memory_mib} MiB mapping with the status magic in "
                f"/proc/{self.pid}/maps (candidates: {[hex(c) for c in candidates]})"
            )
        )

    def _host_address(self, gpa: int, size: int) -> int:
        if gpa < 0 or size < 0 or gpa + size > self.memory_mib << 20:
            raise ValueError(f"GPA range {gpa:#x}+{size:#x} is outside guest RAM")
        if self._mem_fd < 0:
            raise MinimalGuestError("the guest is not running")
        return self.ram_host_address + gpa

    def read_memory(self, gpa: int, size: int) -> bytes:
        """Read guest RAM at ``gpa`` from the host side (QEMU's mapping)."""
        data = os.pread(self._mem_fd, size, self._host_address(gpa, size))
        if len(data) != size:
            raise MinimalGuestError(f"short read of guest RAM at {gpa:#x}: {len(data)}/{size}")
        return data

    def write_memory(self, gpa: int, data: bytes) -> None:
        """Write guest RAM at ``gpa`` from the host side; the guest sees it at once."""
        written = os.pwrite(self._mem_fd, data, self._host_address(gpa, len(data)))
        if written != len(data):
            raise MinimalGuestError(f"short write to guest RAM at {gpa:#x}: {written}")

    def read_u64(self, gpa: int) -> int:
        value: int = struct.unpack("<Q", self.read_memory(gpa, 8))[0]
        return value

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_memory(gpa, struct.pack("<Q", value))

    def status(self, offset: int) -> int:
        """One u64 word of the status page."""
        return self.read_u64(STATUS_GPA + offset)

    def heartbeat(self) -> int:
        return self.status(STATUS_HEARTBEAT)

    def irq_count(self, vector: int) -> int:
        if not 0 <= vector < 256:
            raise ValueError(f"vector must be 0..255, got {vector}")
        return self.status(STATUS_IRQ_COUNTS + 8 * vector)

    def fault(self) -> dict[str, int] | None:
        """The exception that stopped the guest, or None while it is alive."""
        vector_plus_one = self.status(STATUS_FAULT_VECTOR)
        if vector_plus_one == 0:
            return None
        return {
            "vector": vector_plus_one - 1,
            "error_code": self.status(STATUS_FAULT_ERROR),
            "rip": self.status(STATUS_FAULT_RIP),
            "cr2": self.status(STATUS_FAULT_CR2),
        }

    # -- mailbox --

    def submit(self, command: int, *args: int) -> int:
        """Post a command without waiting; returns its sequence number for ``wait_reply``."""
        if self._pending is not None:
            raise MinimalGuestError(f"request {self._pending} is still in flight")
        if len(args) > MAILBOX_ARGS:
            raise ValueError(f"at most {MAILBOX_ARGS} arguments, got {len(args)}")
        words = [int(command), *args] + [0] * (MAILBOX_ARGS - len(args))
        self.write_memory(MAILBOX_GPA + MAILBOX_COMMAND, struct.pack("<5Q", *words))
        self._sequence += 1
        # A separate, later write: the guest must never see the seq before the arguments.
        self.write_u64(MAILBOX_GPA + MAILBOX_REQUEST_SEQ, self._sequence)
        self._pending = self._sequence
        return self._sequence

    def wait_reply(self, sequence: int, timeout: float = 10.0) -> MailboxReply:
        """Wait for the guest's answer to request ``sequence``."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while self.read_u64(MAILBOX_GPA + MAILBOX_RESPONSE_SEQ) != sequence:
            if not self.running():
                raise MinimalGuestError(self._evidence(f"QEMU exited before answering {sequence}"))
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    self._evidence(
                        f"no answer to mailbox request {sequence} in {timeout} s "
                        f"(heartbeat {self.heartbeat()}, fault {self.fault()})"
                    )
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        status, result = struct.unpack("<2Q", self.read_memory(MAILBOX_GPA + MAILBOX_STATUS, 16))
        if self._pending == sequence:
            self._pending = None
        return MailboxReply(sequence, status, result)

    def mailbox(self, command: int, *args: int, timeout: float = 10.0) -> int:
        """Run one command in the guest and return its result; raise if the guest refuses."""
        reply = self.wait_reply(self.submit(command, *args), timeout)
        if reply.status != MailboxStatus.OK:
            raise GuestCommandFailed(command, args, reply.status)
        return reply.result

    # -- QMP --

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute a QMP command (connecting on first use) and return its ``return`` value.

        Errors raise ``dvs.testing.guest_qmp.QmpError``.
        """
        if self._qmp is None:
            self._qmp = QmpClient(self.qmp_path, timeout=30.0)
        return self._qmp.execute(command, arguments or None)
