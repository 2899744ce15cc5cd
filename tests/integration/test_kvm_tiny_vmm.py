"""The hypervisor mechanics against a KVM VM that QEMU did not make: the tiny VMM of
csrc/testing/tiny_vmm.c (one thread that is both the vCPU thread and the thread dvs injects
through, 64 KiB of RAM, a 16-bit real-mode loop, its own slot numbering and signal handler).

Semantics relied on: the guest loop reads GPA 0x20000 (no memory slot: an MMIO exit the VMM
answers with 0x5A5A5A5A) and, with --read-slot, GPA 0x30000, storing what it read in RAM; the
VMM re-enters KVM_RUN after -EINTR and prints a line from its SIGUSR1 handler.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hv_support import ProcessSnapshot, assert_restored, wait_untraced

from dvs.hypervisor import KvmSession, find_kvm, vcpu_states
from dvs.testing.tiny_vmm import (
    DIVERT_COUNT,
    DIVERT_GPA,
    DIVERT_MARK,
    DIVERT_MARK_VALUE,
    LAST_SLOT_VALUE,
    LAST_WINDOW_VALUE,
    LOOP_END_GPA,
    LOOP_GPA,
    SLOT_GPA,
    VMM_ANSWER,
    WINDOW_GPA,
    TinyVmm,
)

pytestmark = [pytest.mark.kvm, pytest.mark.root]


@pytest.fixture
def vmm() -> Iterator[TinyVmm]:
    with TinyVmm(read_slot=True) as running:
        running.wait_iterations(10)
        yield running


def usr1_lines(vmm: TinyVmm) -> list[str]:
    return [line for line in vmm.output().splitlines() if "SIGUSR1" in line]


@pytest.mark.timeout(60)
def test_discovery_and_vcpu_state_of_a_real_mode_guest(vmm: TinyVmm) -> None:
    handles = find_kvm(vmm.pid)
    assert [v.index for v in handles.vcpus] == [0]
    assert handles.vcpus[0].kvm_run_address is not None
    (state,) = vcpu_states(vmm.pid)
    assert state.paging_mode == "real" and state.cpl == 0
    assert state.page_table_root is None
    assert state.sregs.ds.base == WINDOW_GPA  # the loop's segment set-up
    assert LOOP_GPA <= state.regs.rip < LOOP_END_GPA
    wait_untraced(vmm.pid)
    vmm.wait_iterations(10)


@pytest.mark.timeout(60)
def test_rip_rewrite_memory_slot_and_mmio_trap(vmm: TinyVmm) -> None:
    before = ProcessSnapshot.take(vmm.pid)
    assert vmm.u32(LAST_WINDOW_VALUE) == VMM_ANSWER
    assert vmm.u32(LAST_SLOT_VALUE) == VMM_ANSWER  # no slot at 0x30000 yet
    with KvmSession(vmm.pid) as session:
        assert session.status().n_threads == 1
        session.update_regs(rip=DIVERT_GPA)
        slot = session.add_memory(SLOT_GPA, 0x1000)
        assert slot.slot == session.nr_memslots() - 1
        slot.write(0, struct.pack("<I", 0x00C0_FFEE))
        session.run()
        vmm.wait_iterations(20)
        assert vmm.u32(DIVERT_MARK) == DIVERT_MARK_VALUE
        assert vmm.u32(DIVERT_COUNT) == 1
        assert vmm.u32(LAST_SLOT_VALUE) == 0x00C0_FFEE

        with session.trap_mmio(WINDOW_GPA, 0x1000) as trap:
            trap.set(0, 0xCAFE_BABE)
            vmm.wait_iterations(20)
            assert vmm.u32(LAST_WINDOW_VALUE) == 0xCAFE_BABE
            # inject while trapping: the only thread is the syscall-traced vCPU thread
            assert session.get_sregs().paging_mode == "real"
            trap.set(0, 0x0BAD_CAFE)
            vmm.wait_iterations(20)
            assert vmm.u32(LAST_WINDOW_VALUE) == 0x0BAD_CAFE
            assert trap.reads >= 40 and session.status().n_vcpu_threads == 1
        vmm.wait_iterations(20)
        assert vmm.u32(LAST_WINDOW_VALUE) == VMM_ANSWER  # the VMM answers again
        with session.trap_mmio(WINDOW_GPA, 0x1000, reads_by_guardian=True) as trap:
            trap.set(0, 0x600D_BA4C)  # in memory the guardian shares: it answers alone
            vmm.wait_iterations(20)
            assert vmm.u32(LAST_WINDOW_VALUE) == 0x600D_BA4C
            assert trap.reads >= 20 and trap.bank.reads == 0  # dvs's loop never woke
        slot.remove()
        vmm.wait_iterations(20)
        assert vmm.u32(LAST_SLOT_VALUE) == VMM_ANSWER
    wait_untraced(vmm.pid)
    assert_restored(vmm.pid, before)
    vmm.wait_iterations(20)


@pytest.mark.timeout(120)
def test_register_writes_survive_a_pending_mmio_completion(vmm: TinyVmm) -> None:
    """The loop makes an MMIO exit every iteration, so a stop often finds the VMM between
    KVM_RUN returning the exit and entering KVM_RUN again: KVM then still owes the
    instruction's completion, which would overwrite a RIP written now. Every rewrite must
    land anyway (the guardian settles the vCPU first)."""
    settles = 0
    for n in range(1, 21):
        with KvmSession(vmm.pid) as session:
            written = session.update_regs(rip=DIVERT_GPA)
            assert written.rip == DIVERT_GPA
            assert session.get_regs().rip == DIVERT_GPA
            settles += session.status().settles
        deadline = time.monotonic() + 5
        while vmm.u32(DIVERT_COUNT) < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert vmm.u32(DIVERT_COUNT) == n
    print(f"{settles} of 20 rewrites needed a pending exit completed first")
    vmm.wait_iterations(10)


@pytest.mark.timeout(60)
def test_signals_are_held_then_redelivered_or_delivered_at_once(vmm: TinyVmm) -> None:
    with KvmSession(vmm.pid) as session:
        os.kill(vmm.pid, signal.SIGUSR1)
        session.get_regs()  # the injection thread takes the signal: held back
        assert session.status().n_deferred_signals == 1
        time.sleep(0.2)
        assert usr1_lines(vmm) == []
    vmm.wait_for(r"TINY-VMM SIGUSR1 n=1", 5)
    with KvmSession(vmm.pid, run=True) as session:
        with session.trap_mmio(WINDOW_GPA, 0x1000):
            os.kill(vmm.pid, signal.SIGUSR1)  # while the thread is traced at syscalls
            vmm.wait_for(r"TINY-VMM SIGUSR1 n=2", 5)
            assert session.status().signals_delivered >= 1
    time.sleep(0.2)
    assert usr1_lines(vmm) == ["TINY-VMM SIGUSR1 n=1", "TINY-VMM SIGUSR1 n=2"]
    vmm.wait_iterations(20)


@pytest.mark.timeout(60)
def test_cli_shows_vcpu_state(vmm: TinyVmm) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "vcpus", str(vmm.pid), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (vcpu,) = report["vcpus"]
    assert vcpu["paging_mode"] == "real" and vcpu["cr3"] == 0
    assert vcpu["sregs"]["ds"]["base"] == WINDOW_GPA
    text = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "vcpus", str(vmm.pid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert text.returncode == 0
    assert "vCPU 0: real paging, CPL 0" in text.stdout
    not_kvm = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "vcpus", str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert not_kvm.returncode == 1 and "kvm-vm" in not_kvm.stderr
    vmm.wait_iterations(10)
