"""``dvs vm inspect`` on a KVM hypervisor: the vCPU state comes from injected KVM ioctls.

The minimal guest runs no Linux kernel, so inspect must still describe the VM -- its vCPUs,
in long mode on the guest's own page tables -- and report the missing kernel as a problem.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dvs.testing.kvm_guest import MinimalGuest, build_guest_image

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]


def _guest_symbol(name: str) -> int:
    out = subprocess.run(["nm", str(build_guest_image())], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    return next(int(line.split()[0], 16) for line in out.splitlines() if line.endswith(f" {name}"))


@pytest.fixture(scope="module")
def kvm_guest() -> Iterator[MinimalGuest]:
    with MinimalGuest(accel="kvm") as guest:
        yield guest


def test_inspect_reports_vcpus_of_a_kvm_guest(kvm_guest: MinimalGuest) -> None:
    beat = kvm_guest.heartbeat()
    result = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inspect", str(kvm_guest.pid), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kernel"] is None
    assert any("Linux kernel" in problem for problem in report["problems"])
    (vcpu,) = report["vcpus"]
    assert vcpu["paging_mode"] == "4-level"
    assert vcpu["page_table_root"] == _guest_symbol("pml4")
    assert vcpu["cpl"] == 0
    assert 0x100000 <= vcpu["registers"]["rip"] < 0x200000  # inside the guest image
    assert vcpu["registers"]["efer"] & 0x500 == 0x500  # LME and LMA: long mode
    # the guest kept running through the attach
    kvm_guest.wait_for(r"heartbeat", timeout=30)
    assert kvm_guest.heartbeat() > beat
    text = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inspect", str(kvm_guest.pid)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "vcpu 0" in text and "4-level paging" in text
