"""``dvs probe`` must describe this machine as it is; each answer is checked against an
independent look at the kernel (sysfs, procfs, a real ring, a real mount)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dvs.probe import ProbeReport, probe

pytestmark = pytest.mark.timeout(120)


def test_kernel_version_matches_uname(host: ProbeReport) -> None:
    assert host.kernel == os.uname().release
    assert host.kernel_version[:2] == tuple(int(x) for x in os.uname().release.split(".")[:2])


@pytest.mark.fuse
@pytest.mark.root
def test_fuse_protocol_and_passthrough(host: ProbeReport) -> None:
    major, minor = (int(x) for x in host.fuse.protocol.split("."))
    assert major == 7
    # FUSE_PASSTHROUGH arrived with protocol 7.40 (Linux 6.9); the kernel offers it exactly
    # when it speaks that protocol and was built with CONFIG_FUSE_PASSTHROUGH
    assert host.fuse.passthrough == ("PASSTHROUGH" in host.fuse.flags)
    if host.kernel_version >= (6, 9, 0):
        assert minor >= 40
    if host.fuse.passthrough:
        assert host.fuse.passthrough_usable, host.fuse.error
        assert host.backends["cntrfs"] == "fuse with kernel passthrough"
    enable = Path("/sys/module/fuse/parameters/enable_uring")
    if enable.exists() and enable.read_text().strip() == "N":
        assert host.fuse.over_io_uring.startswith("built in, off")
    # the probe left no mount behind
    assert "dvs-probe" not in Path("/proc/self/mountinfo").read_text()


def test_io_uring_matches_the_sysctl(host: ProbeReport) -> None:
    disabled = Path("/proc/sys/kernel/io_uring_disabled")
    if disabled.exists() and disabled.read_text().strip() == "2":
        assert not host.io_uring.available
        return
    assert host.io_uring.available, host.io_uring.error
    for op in ("NOP", "READ", "WRITE", "READ_FIXED", "WRITE_FIXED", "FSYNC", "SEND", "RECV"):
        assert op in host.io_uring.opcodes
    assert host.backends["shield engine"] == "io_uring"


def test_kvm_flavour_matches_the_loaded_module(host: ProbeReport) -> None:
    if not Path("/dev/kvm").exists():
        assert host.kvm.flavour == "none"
        return
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    if Path("/sys/module/kvm_pvm").exists():
        assert host.kvm.flavour == "pvm"
        assert host.kvm.stock_linux_guest is False
        assert host.backends["stock linux guests"].startswith("QEMU TCG")
    elif "vmx" in cpu_flags:
        assert host.kvm.flavour == "vmx"
    elif "svm" in cpu_flags:
        assert host.kvm.flavour == "svm"


@pytest.mark.root
def test_namespaces_mount_api_and_idmap(host: ProbeReport) -> None:
    assert host.mount_api == Path("/proc/self/ns/mnt").exists()
    assert host.user_namespaces == Path("/proc/self/ns/user").exists()
    assert host.time_namespaces == Path("/proc/self/ns/time").exists()
    if host.kernel_version >= (6, 3, 0):  # tmpfs gained idmapped mounts in 6.3
        assert host.idmapped_mounts.get("tmpfs") is True


def test_cgroup_layout(host: ProbeReport) -> None:
    fstypes = {
        line.split(" - ")[1].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    }
    expected = {
        (True, True): "hybrid",
        (False, True): "v2",
        (True, False): "v1",
        (False, False): "none",
    }[("cgroup" in fstypes, "cgroup2" in fstypes)]
    assert host.cgroup == expected


def test_devices_and_tools(host: ProbeReport) -> None:
    assert host.tun == os.access("/dev/net/tun", os.R_OK | os.W_OK)
    for tool in ("runc", "qemu-system-x86_64"):
        if any(Path(d, tool).exists() for d in os.environ["PATH"].split(":")):
            assert tool in host.tools


def test_cli_json_is_the_same_report(host: ProbeReport) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dvs", "probe", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["kernel"] == host.kernel
    assert data["kvm"]["flavour"] == host.kvm.flavour
    assert data["fuse"]["passthrough"] == host.fuse.passthrough
    assert data["io_uring"]["available"] == host.io_uring.available
    table = subprocess.run(
        [sys.executable, "-m", "dvs", "probe"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "backend: container attach" in table


def test_probe_is_cached() -> None:
    assert probe() is probe()
