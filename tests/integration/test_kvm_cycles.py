"""100 attach/detach cycles against QEMU -enable-kvm: the guest keeps running and QEMU's fd
table and memory map end exactly as they began.

Semantics relied on: each cycle forks a guardian, seizes every QEMU thread (the vCPU leaves
KVM_RUN with -EINTR), maps a scratch page, injects, then unmaps it, restores and detaches.
Every tenth cycle also adds and removes a memory slot, a doorbell and an interrupt line.
"""

from __future__ import annotations

import time

import pytest
from hv_support import ProcessSnapshot, assert_restored, wait_untraced

from dvs.hypervisor import KvmSession
from dvs.testing.kvm_guest import DIVERT_ENTRY, STATUS_DIVERSIONS, Command, MinimalGuest

pytestmark = [pytest.mark.kvm, pytest.mark.qemu, pytest.mark.root]

CYCLES = 100


@pytest.mark.timeout(300)
def test_hundred_attach_detach_cycles_leave_qemu_unchanged() -> None:
    with MinimalGuest(accel="kvm") as guest:
        before = ProcessSnapshot.take(guest.pid)
        heartbeat = guest.heartbeat()
        started = time.monotonic()
        for cycle in range(CYCLES):
            with KvmSession(guest.pid) as session:
                regs = session.get_regs()
                assert regs.rip > 0
                if cycle % 10 == 9:
                    session.run()
                    slot = session.add_memory(0x1_0000_0000, 4096)
                    slot.write(0, cycle.to_bytes(8, "little"))
                    assert guest.mailbox(Command.READ, 0x1_0000_0000, 8) == cycle
                    session.add_ioeventfd(0xD000_0000, 4)
                    session.add_irqfd(22)
            # detached: the guest runs on between cycles
            assert guest.mailbox(Command.PING) > heartbeat
        elapsed = time.monotonic() - started
        wait_untraced(guest.pid)
        assert_restored(guest.pid, before)
        assert guest.fault() is None
        assert guest.status(STATUS_DIVERSIONS) == 0  # registers were never left changed
        # still fully alive: a last RIP rewrite proves the vCPU state is consistent
        with KvmSession(guest.pid) as session:
            session.update_regs(rip=DIVERT_ENTRY)
        guest.wait_for(r"DVS-GUEST diverted count=1", timeout=10)
        assert guest.mailbox(Command.PING) > 0
        print(f"{CYCLES} cycles in {elapsed:.1f} s ({elapsed / CYCLES * 1000:.0f} ms each)")
