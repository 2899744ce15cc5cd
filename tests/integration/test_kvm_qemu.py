"""Acting inside QEMU -enable-kvm (kvm-pvm here) on the minimal guest: registers, memory
slots, ioeventfd doorbells, irqfd interrupts, MMIO answered by dvs, signals, restoration.

Semantics relied on: the minimal guest (dvs.testing.kvm_guest) runs a main loop in 64-bit
long mode at CPL 0 with identity-mapped page tables, serves one mailbox command at a time
(READ/WRITE of any GPA through an uncached window, port I/O, IOAPIC routing, interrupt
counting per vector) and jumps to its divert entry when RIP is set there. QEMU's pc machine
under KVM keeps PIC/IOAPIC/LAPIC in the kernel, so an irqfd GSI n reaches IOAPIC pin n;
pc-testdev backs GPA 0xFF000000 with a read/write buffer in QEMU userspace.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import time
from collections.abc import Iterator

import pytest
from hv_support import (
    ProcessSnapshot,
    assert_restored,
    tracer_pids,
    user_threads,
    wait_untraced,
)

from dvs.hypervisor import KvmSession, find_kvm, vcpu_states
from dvs.hypervisor.errors import KvmOperationFailed
from dvs.lowlevel import kvm as llkvm
from dvs.testing.kvm_guest import (
    DIVERT_ENTRY,
    LOAD_GPA,
    ROUTE_LEVEL,
    SCRATCH_GPA,
    STATUS_DIVERSIONS,
    Command,
    MinimalGuest,
)

pytestmark = [pytest.mark.kvm, pytest.mark.qemu, pytest.mark.root]

GUEST_IMAGE_END = 0x0020_0000
HIGH_GPA = 0x1_0000_0000  # above the 32 MiB of guest RAM and the 4 GiB hole
PC_TESTDEV_IOMEM = 0xFF00_0000
PAGE = 4096


@pytest.fixture
def guest() -> Iterator[MinimalGuest]:
    with MinimalGuest(accel="kvm", extra_qemu_args=("-device", "pc-testdev")) as g:
        yield g


def wait_count(guest: MinimalGuest, vector: int, at_least: int, within: float = 5.0) -> int:
    deadline = time.monotonic() + within
    while (count := guest.irq_count(vector)) < at_least and time.monotonic() < deadline:
        time.sleep(0.005)
    return count


def advances(guest: MinimalGuest, within: float = 5.0) -> bool:
    start = guest.heartbeat()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if guest.heartbeat() > start:
            return True
    return False


@pytest.mark.timeout(60)
def test_discovery_finds_the_vm_vcpu_and_kvm_run(guest: MinimalGuest) -> None:
    handles = find_kvm(guest.pid)
    assert os.readlink(f"/proc/{guest.pid}/fd/{handles.vm_fd}") == "anon_inode:kvm-vm"
    (vcpu,) = handles.vcpus
    assert vcpu.index == 0
    assert os.readlink(f"/proc/{guest.pid}/fd/{vcpu.fd}") == "anon_inode:kvm-vcpu:0"
    assert vcpu.kvm_run_address is not None
    with KvmSession(guest.pid) as session:
        # every thread that runs user code is ours; KVM's own worker thread in QEMU's thread
        # group (kvm-nx-lpage-recovery, PF_USER_WORKER) is left alone
        tracers = tracer_pids(guest.pid)
        workers = set(tracers) - set(user_threads(guest.pid))
        assert {tracers[tid] for tid in user_threads(guest.pid)} == {session.guardian_pid}
        assert all(tracers[tid] == 0 for tid in workers)
        assert session.status().n_threads == len(user_threads(guest.pid))
        local = bytes(session.kvm_run(0)[:64])
        with open(f"/proc/{guest.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(vcpu.kvm_run_address)
            remote = mem.read(64)
        assert local == remote  # the same page, mapped into dvs through the pulled vCPU fd
        assert session.exit_reason(0) == "intr"  # our stop kicked it out of KVM_RUN


@pytest.mark.timeout(60)
def test_read_registers_paging_cpuid_and_translate(guest: MinimalGuest) -> None:
    with KvmSession(guest.pid) as session:
        regs = session.get_regs()
        assert LOAD_GPA <= regs.rip < GUEST_IMAGE_END  # in the guest's code
        sregs = session.get_sregs()
        assert sregs.paging_mode == "4-level"
        assert sregs.cs.l == 1 and sregs.cs.selector & 3 == 0
        assert LOAD_GPA <= sregs.page_table_root < GUEST_IMAGE_END  # type: ignore[operator]
        state = session.vcpu_state(0)
        assert state.cpl == 0 and state.cr3 == sregs.cr3
        cpuid = {(e.function, e.index): e for e in session.get_cpuid()}
        kvm_leaf = cpuid[(0x4000_0000, 0)]
        signature = struct.pack("<3I", kvm_leaf.ebx, kvm_leaf.ecx, kvm_leaf.edx)
        assert signature == b"KVMKVMKVM\0\0\0"
        here = session.translate(regs.rip)
        assert here.valid and here.physical_address == regs.rip  # identity-mapped
        nowhere = session.translate(0x0000_7000_0000_0000)
        assert not nowhere.valid
        assert session.check_extension(llkvm.KVM_CAP_NR_MEMSLOTS) == session.nr_memslots()
        assert session.check_extension(llkvm.KVM_CAP_IRQFD) == 1
    assert advances(guest)


@pytest.mark.timeout(60)
def test_set_registers_diverts_the_guest(guest: MinimalGuest) -> None:
    with KvmSession(guest.pid) as session:
        regs = session.get_regs()
        session.set_regs(regs.replace(rip=DIVERT_ENTRY))  # the main loop has no pending exit
        assert session.get_regs().rip == DIVERT_ENTRY
        assert session.update_regs(rbx=0x1234).rip == DIVERT_ENTRY
    guest.wait_for(r"DVS-GUEST diverted count=1", timeout=10)
    assert guest.status(STATUS_DIVERSIONS) == 1
    assert guest.mailbox(Command.PING) > 0  # and back in its main loop
    assert guest.fault() is None


@pytest.mark.timeout(60)
def test_vcpu_states_function(guest: MinimalGuest) -> None:
    before = ProcessSnapshot.take(guest.pid)
    (state,) = vcpu_states(guest.pid)
    assert state.index == 0 and state.paging_mode == "4-level"
    assert state.as_dict()["regs"]["rip"] == state.regs.rip
    wait_untraced(guest.pid)
    assert_restored(guest.pid, before)


@pytest.mark.timeout(90)
def test_memory_slot_from_the_top_of_nr_memslots_seen_by_the_guest(guest: MinimalGuest) -> None:
    before = ProcessSnapshot.take(guest.pid)
    with KvmSession(guest.pid, run=True) as session:
        top = session.nr_memslots() - 1
        first = session.add_memory(HIGH_GPA, 16 * PAGE)
        first.write(0x100, struct.pack("<Q", 0xC0FF_EE12_3456_7890))
        assert first.slot == top
        assert guest.mailbox(Command.READ, HIGH_GPA + 0x100, 8) == 0xC0FF_EE12_3456_7890
        guest.mailbox(Command.WRITE, HIGH_GPA + 0x208, 0xABCD_EF01, 4)
        assert first.read(0x208, 4) == struct.pack("<I", 0xABCD_EF01)
        # the top id is taken now: KVM refuses it (EINVAL) and the next one down is used
        second = session.add_memory(HIGH_GPA + 0x10_0000, PAGE)
        assert second.slot == top - 1
        second.write(0, b"\x5a" * 8)
        assert guest.mailbox(Command.READ, HIGH_GPA + 0x10_0000, 8) == 0x5A5A_5A5A_5A5A_5A5A
        first.remove()
        third = session.add_memory(HIGH_GPA + 0x20_0000, PAGE)
        assert third.slot == top  # free again after removal
        assert guest.mailbox(Command.READ, HIGH_GPA + 0x10_0000, 8) == 0x5A5A_5A5A_5A5A_5A5A
    wait_untraced(guest.pid)
    assert_restored(guest.pid, before)
    assert advances(guest)


@pytest.mark.timeout(60)
def test_read_only_slot_and_overlapping_slot(guest: MinimalGuest) -> None:
    with KvmSession(guest.pid, run=True) as session:
        baseline = ProcessSnapshot.take(guest.pid)
        with pytest.raises(KvmOperationFailed) as failure:
            session.add_memory(SCRATCH_GPA, PAGE)  # inside guest RAM
        assert failure.value.errno == errno.EEXIST
        assert_restored(guest.pid, baseline)  # the memfd and its mapping were undone
        rom = session.add_memory(HIGH_GPA, PAGE, readonly=True)
        rom.write(0, struct.pack("<I", 0x1234_5678))
        assert guest.mailbox(Command.READ, HIGH_GPA, 4) == 0x1234_5678
        guest.mailbox(Command.WRITE, HIGH_GPA, 0xFFFF_FFFF, 4)  # an MMIO exit QEMU ignores
        assert rom.read(0, 4) == struct.pack("<I", 0x1234_5678)


@pytest.mark.timeout(60)
def test_ioeventfd_fires_when_the_guest_rings_the_doorbell(guest: MinimalGuest) -> None:
    with KvmSession(guest.pid, run=True) as session:
        doorbell = session.add_ioeventfd(0xD000_0000, 4)
        assert doorbell.count() == 0
        guest.mailbox(Command.WRITE, 0xD000_0000, 1, 4)
        assert doorbell.wait(5) == 1
        guest.mailbox(Command.WRITE, 0xD000_0000, 2, 4)
        guest.mailbox(Command.WRITE, 0xD000_0000, 3, 4)
        assert doorbell.wait(5) == 2  # counts accumulate between reads

        port = session.add_ioeventfd(0x510, 2, pio=True, datamatch=0x42)
        guest.mailbox(Command.PORT_OUT, 0x510, 0x41, 2)
        assert port.wait(0.3) == 0  # not the matching value
        guest.mailbox(Command.PORT_OUT, 0x510, 0x42, 2)
        assert port.wait(5) == 1

        doorbell.remove()
        guest.mailbox(Command.WRITE, 0xD000_0000, 4, 4)  # now an ordinary MMIO exit
        assert port.count() == 0
    assert guest.fault() is None


@pytest.mark.timeout(60)
def test_irqfd_interrupts_reach_the_guest(guest: MinimalGuest) -> None:
    guest.mailbox(Command.APIC_SETUP)
    guest.mailbox(Command.IOAPIC_ROUTE, 20, 0x50, 0)  # edge
    guest.mailbox(Command.IOAPIC_ROUTE, 21, 0x51, ROUTE_LEVEL)
    guest.mailbox(Command.IRQ_ENABLE)
    with KvmSession(guest.pid, run=True) as session:
        assert session.check_extension(llkvm.KVM_CAP_IRQFD_RESAMPLE) == 1
        edge = session.add_irqfd(20)
        for n in range(1, 4):
            edge.trigger()
            assert wait_count(guest, 0x50, n) == n

        # level-triggered with resample: raised until the guest's EOI, then KVM tells us
        level = session.add_irqfd(21, resample=True)
        level.trigger()
        assert level.wait_eoi(5)
        assert wait_count(guest, 0x51, 1) == 1
        level.trigger()
        assert level.wait_eoi(5)
        assert wait_count(guest, 0x51, 2) == 2

        edge.remove()
    # deassigned: GSI 20 is QEMU's again and nothing fires it
    time.sleep(0.2)
    assert guest.irq_count(0x50) == 3
    assert guest.fault() is None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reads_by_guardian", [False, True], ids=["dvs-loop", "guardian-bank"])
def test_mmio_reads_answered_by_dvs_never_reach_qemu(
    guest: MinimalGuest, reads_by_guardian: bool
) -> None:
    guest.mailbox(Command.WRITE, PC_TESTDEV_IOMEM, 0x1111_1111, 4)  # QEMU's device memory
    with KvmSession(guest.pid, run=True) as session:
        trap = session.trap_mmio(PC_TESTDEV_IOMEM, 0x1000, reads_by_guardian=reads_by_guardian)
        with trap:
            trap.set(0x0, 0xCAFE_BABE)
            trap.set(0x8, 0x1122_3344_5566_7788, 8)
            assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM, 4) == 0xCAFE_BABE
            assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM + 8, 8) == 0x1122_3344_5566_7788
            assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM + 10, 2) == 0x5566
            guest.mailbox(Command.WRITE, PC_TESTDEV_IOMEM + 4, 0x2222_2222, 4)
            assert trap.get(0x4) == 0x2222_2222
            assert (trap.reads, trap.writes) == (3, 1)
            status = session.status()
            assert status.trapping and status.n_vcpu_threads == 1
            assert status.mmio_timeouts == 0
            # outside the window QEMU still answers
            assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM + 0x1000, 4) == 0
        # the window is QEMU's again: its buffer never saw our answers or the guest's write
        assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM, 4) == 0x1111_1111
        assert guest.mailbox(Command.READ, PC_TESTDEV_IOMEM + 4, 4) == 0
    assert advances(guest)


@pytest.mark.timeout(60)
def test_sigterm_sent_while_held_reaches_qemu_after_detach(guest: MinimalGuest) -> None:
    with KvmSession(guest.pid) as session:
        os.kill(guest.pid, signal.SIGTERM)
        for _ in range(5):
            session.get_regs()  # the injecting thread takes the signal and holds it back
        time.sleep(0.2)
        assert guest.running()
        assert session.status().n_deferred_signals == 1
    deadline = time.monotonic() + 20
    while guest.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not guest.running()
    assert "terminating on signal 15" in guest.qemu_log_path.read_text()


@pytest.mark.timeout(60)
def test_sigterm_while_running_is_delivered_at_once(guest: MinimalGuest) -> None:
    session = KvmSession(guest.pid, run=True)
    try:
        os.kill(guest.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while guest.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not guest.running()  # QEMU shut down while traced
    finally:
        session.close()  # nothing left to restore; must not hang or raise
    assert "terminating on signal 15" in guest.qemu_log_path.read_text()


@pytest.mark.timeout(90)
def test_everything_undone_after_a_full_session(guest: MinimalGuest) -> None:
    before = ProcessSnapshot.take(guest.pid)
    with KvmSession(guest.pid, run=True) as session:
        session.add_memory(HIGH_GPA, 4 * PAGE)
        session.add_ioeventfd(0xD000_0000, 4)
        session.add_irqfd(22, resample=True)
        session.trap_mmio(0xC000_0000, PAGE)
        session.kvm_run(0)
        during = ProcessSnapshot.take(guest.pid)
        assert len(during.fds) == len(before.fds) + 3  # eventfds: doorbell, irq, resample
        assert set(tracer_pids(guest.pid).values()) >= {session.guardian_pid}
    wait_untraced(guest.pid)
    assert_restored(guest.pid, before)
    assert guest.mailbox(Command.READ, SCRATCH_GPA, 8) == 0
    assert advances(guest)
