"""The minimal KVM guest fixture, used the way the hypervisor-mechanics tests will use it.

Semantics relied on: the guest (csrc/guest/minimal/) boots through QEMU's PVH entry into long
mode and prints DVS-MINIMAL-GUEST-READY on COM1; its status page and mailbox sit at fixed GPAs
that the host reads and writes inside QEMU's RAM mapping; the mailbox answers one command at a
time (request_seq / response_seq, each written last by its owner). QMP ``query-kvm`` says
whether QEMU really runs the vCPU with KVM. Interrupts are raised by real devices: QEMU's
``pc-testdev`` drives ISA IRQ n from port 0x2000 + n (userspace QEMU -> KVM_IRQ_LINE -> the
in-kernel PIC/IOAPIC), the in-kernel PIT ticks on GSI 0 (IOAPIC pin 2), the LAPIC sends
self-IPIs, and QMP ``inject-nmi`` raises LINT1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest

import dvs.testing.kvm_guest as kvm_guest
from dvs.testing.kvm_guest import (
    MAILBOX_GPA,
    READY_MARKER,
    SCRATCH_GPA,
    STATUS_IRQ_TOTAL,
    STATUS_MAXPHYADDR,
    VECTOR_NMI,
    VECTOR_PIC_BASE,
    Command,
    GuestCommandFailed,
    GuestTimeout,
    MailboxStatus,
    MinimalGuest,
    kvm_usable,
)

IRQ_TEST_DEVICE = ("-device", "pc-testdev")
PC_TESTDEV_IRQ_PORT = 0x2000  # writing 1/0 to 0x2000 + n raises/lowers ISA IRQ n
PC_TESTDEV_IOMEM = 0xFF00_0000  # a small read/write buffer behind MMIO, in QEMU userspace
HPET_GPA = 0xFED0_0000  # capabilities register: vendor 0x8086 in bits 16-31
COM1_LSR = 0x3FD
PIT_COMMAND, PIT_CHANNEL0 = 0x43, 0x40
PIT_HZ = 1_193_182


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _advances(guest: MinimalGuest, within: float = 5.0) -> bool:
    """The heartbeat counter, read from QEMU's memory, moves within ``within`` seconds."""
    start = guest.heartbeat()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if guest.heartbeat() > start:
            return True
    return False


def _wait_count(guest: MinimalGuest, vector: int, at_least: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while (count := guest.irq_count(vector)) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def _pulse_isa_irq(guest: MinimalGuest, irq: int) -> None:
    guest.mailbox(Command.PORT_OUT, PC_TESTDEV_IRQ_PORT + irq, 1, 1)
    guest.mailbox(Command.PORT_OUT, PC_TESTDEV_IRQ_PORT + irq, 0, 1)


def _start_pit(guest: MinimalGuest, hz: int) -> None:
    divisor = PIT_HZ // hz
    guest.mailbox(Command.PORT_OUT, PIT_COMMAND, 0x34, 1)  # channel 0, lo/hi byte, rate generator
    guest.mailbox(Command.PORT_OUT, PIT_CHANNEL0, divisor & 0xFF, 1)
    guest.mailbox(Command.PORT_OUT, PIT_CHANNEL0, divisor >> 8, 1)


def _stop_pit(guest: MinimalGuest) -> None:
    # Mode 0 without a count: the output stays low, no more ticks.
    guest.mailbox(Command.PORT_OUT, PIT_COMMAND, 0x30, 1)


# ---- no guest needed ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_python_constants_mirror_the_guest_header() -> None:
    header = (kvm_guest.GUEST_SOURCE_DIR / "guest_abi.h").read_text()
    defines = dict(re.findall(r"^#define (DVS_\w+)\s+(0x[0-9A-Fa-f]+|\d+)(?:ULL)?\b", header, re.M))
    prefixes = {
        "DVS_GUEST_": "",
        "DVS_STATUS_": "STATUS_",
        "DVS_MAILBOX_": "MAILBOX_",
        "DVS_ROUTE_": "ROUTE_",
        "DVS_IRQ_MODE_": "IRQ_MODE_",
        "DVS_VECTOR_": "VECTOR_",
    }
    checked = 0
    for name, text in defines.items():
        value = int(text, 0)
        if name.startswith("DVS_CMD_"):
            assert Command[name.removeprefix("DVS_CMD_")] == value, name
        elif name.startswith("DVS_MBOX_"):
            assert MailboxStatus[name.removeprefix("DVS_MBOX_")] == value, name
        else:
            prefix = next(p for p in prefixes if name.startswith(p))
            python_name = prefixes[prefix] + name.removeprefix(prefix)
            assert getattr(kvm_guest, python_name) == value, name
        checked += 1
    assert checked >= 50
    assert f'"{READY_MARKER}"' in header


@pytest.mark.timeout(120)
def test_image_is_cached_and_rebuilt_when_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "src"
    shutil.copytree(kvm_guest.GUEST_SOURCE_DIR, sources)
    monkeypatch.setattr(kvm_guest, "GUEST_SOURCE_DIR", sources)
    monkeypatch.setenv("DVS_CACHE_DIR", str(tmp_path / "cache"))

    first = kvm_guest.build_guest_image()
    assert first.read_bytes()[:4] == b"\x7fELF"
    assert kvm_guest.build_guest_image() == first  # cached: same artefact, no rebuild

    guest_c = sources / "guest.c"
    guest_c.write_text(guest_c.read_text() + "\n/* an edit */\n")
    second = kvm_guest.build_guest_image()
    assert second != first and second.is_file()


# ---- under KVM ---------------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_kvm_is_usable_for_the_minimal_guest() -> None:
    usable, reason = kvm_usable()
    assert usable, reason


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("firmware", ["qboot", "seabios"])
def test_guest_boots_under_kvm_and_prints_its_marker(firmware: Literal["qboot", "seabios"]) -> None:
    with MinimalGuest(accel="kvm", firmware=firmware) as guest:
        assert guest.qmp("query-kvm") == {"enabled": True, "present": True}
        assert READY_MARKER + " long-mode" in guest.serial_output()
        assert guest.qmp("query-status")["status"] == "running"
        assert guest.status(STATUS_MAXPHYADDR) >= 36
        assert guest.fault() is None


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_heartbeat_advances_in_memory_and_on_the_serial_port() -> None:
    with MinimalGuest(accel="kvm") as guest:
        assert _advances(guest)
        guest.write_u64(kvm_guest.STATUS_GPA + kvm_guest.STATUS_REPORT_PERIOD, 1 << 28)  # faster
        first = guest.wait_for(r"DVS-GUEST heartbeat=(\d+)", timeout=20)
        later = guest.wait_for(rf"DVS-GUEST heartbeat=(?!{first.group(1)}\b)(\d+)", timeout=20)
        assert int(later.group(1)) > int(first.group(1))


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_mailbox_round_trip_through_guest_memory() -> None:
    with MinimalGuest(accel="kvm") as guest:
        heartbeat = guest.mailbox(Command.PING)
        assert heartbeat > 0

        # Host writes, guest reads on command.
        guest.write_u64(SCRATCH_GPA, 0x1122_3344_5566_7788)
        assert guest.mailbox(Command.READ, SCRATCH_GPA, 8) == 0x1122_3344_5566_7788
        assert guest.mailbox(Command.READ, SCRATCH_GPA + 4, 4) == 0x1122_3344
        guest.wait_for(r"command=2 arg0=0x300000 arg1=0x8 status=0 result=0x1122334455667788", 5)

        # Guest writes on command, host reads.
        guest.mailbox(Command.WRITE, SCRATCH_GPA + 0x100, 0xFEED_F00D_CAFE_BEEF, 8)
        assert guest.read_u64(SCRATCH_GPA + 0x100) == 0xFEED_F00D_CAFE_BEEF

        # The reply lives in the mailbox page too, where the host can read it again.
        assert guest.read_u64(MAILBOX_GPA + kvm_guest.MAILBOX_STATUS) == MailboxStatus.OK

        with pytest.raises(GuestCommandFailed, match="BAD_ARGUMENT"):
            guest.mailbox(Command.READ, SCRATCH_GPA + 1, 8)  # misaligned
        with pytest.raises(GuestCommandFailed, match="BAD_COMMAND"):
            guest.mailbox(0x99)

        assert guest.mailbox(Command.PING) > heartbeat
        assert _advances(guest)  # still running after all commands
        assert guest.fault() is None


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_mmio_and_port_commands_reach_qemu_devices() -> None:
    with MinimalGuest(accel="kvm", extra_qemu_args=IRQ_TEST_DEVICE) as guest:
        # MMIO read served by QEMU userspace: the HPET capabilities register.
        assert guest.mailbox(Command.READ, HPET_GPA, 4) >> 16 == 0x8086
        # MMIO write then read back: pc-testdev's I/O memory buffer.
        guest.mailbox(Command.WRITE, PC_TESTDEV_IOMEM, 0x1234_5678, 4)
        assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM, 4) == 0x1234_5678
        # Above 4 GiB (no RAM there with 32 MiB): the window reaches it without faulting.
        guest.mailbox(Command.READ, 0x1_0000_0000, 8)
        # Port I/O: the UART's line status says its transmitter is empty.
        assert guest.mailbox(Command.PORT_IN, COM1_LSR, 1) & 0x20
        assert guest.fault() is None
        assert _advances(guest)


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_interrupts_through_the_ioapic_and_lapic() -> None:
    with MinimalGuest(accel="kvm", extra_qemu_args=IRQ_TEST_DEVICE) as guest:
        guest.mailbox(Command.APIC_SETUP)
        guest.mailbox(Command.IRQ_ENABLE)

        guest.mailbox(Command.SELF_IPI, 0x40)
        assert _wait_count(guest, 0x40, 1) == 1

        # ISA IRQ 5 from QEMU userspace (pc-testdev) -> in-kernel IOAPIC pin 5 -> vector 0x35.
        assert guest.mailbox(Command.IOAPIC_ROUTE, 5, 0x35, 0) & 0x10000  # was masked
        _pulse_isa_irq(guest, 5)
        assert _wait_count(guest, 0x35, 1) == 1

        # The in-kernel PIT on GSI 0 = IOAPIC pin 2, and HALT returns on its next tick.
        guest.mailbox(Command.IOAPIC_ROUTE, 2, 0x32, 0)
        _start_pit(guest, 100)
        assert _wait_count(guest, 0x32, 10) >= 10
        before = guest.status(STATUS_IRQ_TOTAL)
        assert guest.mailbox(Command.HALT, timeout=10) > before
        _stop_pit(guest)

        # NMIs (QMP inject-nmi -> LINT1), twice: IRETQ ends NMI blocking.
        guest.qmp("inject-nmi")
        assert _wait_count(guest, VECTOR_NMI, 1) == 1
        guest.qmp("inject-nmi")
        assert _wait_count(guest, VECTOR_NMI, 2) == 2

        assert guest.fault() is None
        assert _advances(guest)


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_interrupts_through_the_legacy_pic() -> None:
    with MinimalGuest(accel="kvm", extra_qemu_args=IRQ_TEST_DEVICE) as guest:
        guest.mailbox(Command.PIC_SETUP, 1 << 5)
        guest.mailbox(Command.IRQ_ENABLE)
        _pulse_isa_irq(guest, 5)
        assert _wait_count(guest, VECTOR_PIC_BASE + 5, 1) == 1
        _pulse_isa_irq(guest, 5)  # a second edge after the EOI
        assert _wait_count(guest, VECTOR_PIC_BASE + 5, 2) == 2
        assert guest.fault() is None
        assert _advances(guest)


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_qemu_and_files_are_gone_after_the_context() -> None:
    with MinimalGuest(accel="kvm") as guest:
        pid, workdir = guest.pid, guest.workdir
        assert workdir is not None and guest.qmp_path.exists() and guest.serial_path.exists()
        guest.qmp("query-status")  # an open QMP connection must not keep anything alive
    assert not _alive(pid)
    assert not workdir.exists()


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_qemu_and_files_are_gone_after_an_exception_in_the_body() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with MinimalGuest(accel="kvm") as guest:
            pid, workdir = guest.pid, guest.workdir
            raise Boom
    assert not _alive(pid)
    assert workdir is not None and not workdir.exists()


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_qemu_dies_with_a_test_process_that_is_killed_outright() -> None:
    # No finaliser runs after SIGKILL: only PR_SET_PDEATHSIG can take QEMU down with it.
    script = (
        "import os, sys\n"
        "from dvs.testing.kvm_guest import MinimalGuest\n"
        "guest = MinimalGuest(accel='kvm').__enter__()\n"
        "print(guest.pid, guest.workdir, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    repo = kvm_guest.GUEST_SOURCE_DIR.parents[2]
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -9, child.stderr
    pid_text, workdir = child.stdout.split()
    shutil.rmtree(workdir)  # the one thing a killed process cannot clean up itself
    qemu_pid = int(pid_text)
    deadline = time.monotonic() + 10
    while _alive(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(qemu_pid)


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_a_guest_that_never_boots_fails_clearly_and_is_cleaned_up() -> None:
    guest = MinimalGuest(accel="kvm", boot_timeout=3, extra_qemu_args=("-S",))  # paused CPU
    with pytest.raises(GuestTimeout) as caught:
        with guest:
            pass
    message = str(caught.value)
    assert "no ready marker on the serial port in 3" in message and "serial tail" in message
    pid = int(re.search(r"QEMU pid (\d+)", message).group(1))  # type: ignore[union-attr]
    assert not _alive(pid)
    assert guest.workdir is None and not guest.running()


class _GdbRemote:
    """QEMU's gdbstub over a UNIX socket: ``$data#checksum`` packets, each acknowledged by '+'.

    QEMU stops the VM when a debugger connects, announces that with an unsolicited stop packet
    (``T02...``), and resumes the VM on ``D`` (detach). ``g`` reads and ``G`` writes the whole
    register block (little-endian hex, x86-64 order: 16 GPRs, then RIP); QEMU pushes written
    registers into KVM (KVM_SET_REGS) before the vCPU runs again. (``P``, one register, is
    refused until the debugger has negotiated target XML.)
    """

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(20)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._buffer = b""
        stop = self._read_packet()  # the stop announcement, so replies line up with commands
        assert stop.startswith("T"), stop

    def command(self, data: str) -> str:
        checksum = sum(data.encode()) & 0xFF
        self._sock.sendall(f"${data}#{checksum:02x}".encode())
        return self._read_packet()

    def _read_packet(self) -> str:
        while True:
            start = self._buffer.find(b"$")
            end = self._buffer.find(b"#", start)
            if start >= 0 and end >= 0 and len(self._buffer) >= end + 3:
                reply = self._buffer[start + 1 : end].decode()
                self._buffer = self._buffer[end + 3 :]
                self._sock.sendall(b"+")
                return reply
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError("gdbstub closed the connection")
            self._buffer += chunk

    def close(self) -> None:
        self._sock.close()


RIP_SLOT = slice(16 * 8, 17 * 8)  # byte range of RIP in the gdbstub's x86-64 register block


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_rewriting_rip_to_the_divert_entry_diverts_the_guest(tmp_path: Path) -> None:
    gdb_socket = tmp_path / "gdb.sock"
    gdb_arg = f"unix:{gdb_socket},server=on,wait=off"
    with MinimalGuest(accel="kvm", extra_qemu_args=("-gdb", gdb_arg)) as guest:
        gdb = _GdbRemote(gdb_socket)
        try:
            assert gdb.command("?").startswith("T")  # the VM is stopped now
            registers = bytearray.fromhex(gdb.command("g"))
            rip = int.from_bytes(registers[RIP_SLOT], "little")
            assert kvm_guest.LOAD_GPA <= rip < kvm_guest.STATUS_GPA  # in the guest image
            registers[RIP_SLOT] = kvm_guest.DIVERT_ENTRY.to_bytes(8, "little")
            assert gdb.command("G" + registers.hex()) == "OK"
            assert int.from_bytes(bytes.fromhex(gdb.command("g"))[RIP_SLOT], "little") == (
                kvm_guest.DIVERT_ENTRY
            )
            assert gdb.command("D") == "OK"  # detach: the VM runs again
        finally:
            gdb.close()
        guest.wait_for(r"DVS-GUEST diverted count=1\b", timeout=20)
        assert guest.status(kvm_guest.STATUS_DIVERSIONS) == 1
        assert guest.mailbox(Command.PING) > 0  # the main loop serves the mailbox again
        assert _advances(guest)
        assert guest.fault() is None


# ---- TCG, for comparison -----------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.timeout(90)
def test_the_same_guest_runs_under_tcg() -> None:
    with MinimalGuest(accel="tcg") as guest:
        assert guest.qmp("query-kvm")["enabled"] is False
        guest.write_u64(SCRATCH_GPA, 0xA5A5_5A5A)
        assert guest.mailbox(Command.READ, SCRATCH_GPA, 8) == 0xA5A5_5A5A
        assert _advances(guest)
