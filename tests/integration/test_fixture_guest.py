"""The Linux guest kit and the LinuxGuest fixture, used the way later tests use them.

One guest is shared by the module (a boot costs 8-13 s under TCG); two more boots check what
needs a fresh guest: a second KASLR slide with memfd-backed RAM that then panics (QEMU exits,
``run`` reports it, cleanup follows), and cleanup after a failing ``with`` body on a 2-vCPU
guest without KASLR. A fourth QEMU is only started (never booted) to show it dies with a
parent that exits without cleaning up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.testing.guest import (
    GuestBootError,
    GuestCommandTimeout,
    GuestExited,
    GuestKit,
    LinuxGuest,
    guest_kit,
)

pytestmark = pytest.mark.qemu

KERNEL_LINK_ADDRESS = 0xFFFFFFFF81000000
"""Where x86-64 kernels are linked: ``_text`` without KASLR."""


@pytest.fixture(scope="module")
def kit() -> GuestKit:
    return guest_kit()


@pytest.fixture(scope="module")
def guest(kit: GuestKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxGuest]:
    log = tmp_path_factory.mktemp("guest") / "serial.log"
    with LinuxGuest(kit, serial_log_path=log) as running:
        yield running


def kernel_text_address(guest: LinuxGuest) -> int:
    status, output = guest.run("grep ' _text$' /proc/kallsyms")
    assert status == 0, output
    return int(output.split()[0], 16)


def qemu_is_gone(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going
        return True
    return b"qemu-system" not in cmdline  # the pid was reused by something else


def assert_cleaned_up(guest: LinuxGuest, pid: int) -> None:
    assert qemu_is_gone(pid)
    assert guest.run_dir is not None
    assert not guest.serial_socket_path.exists()
    assert not guest.qmp_socket_path.exists()
    assert not guest.run_dir.exists()


@pytest.mark.timeout(600)
def test_kit_holds_the_debian_kernel_and_its_vmlinux(kit: GuestKit) -> None:
    assert kit.kernel_package == f"linux-image-{kit.kernel_release}"
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", kit.kernel_release)
    assert kit.bzimage.read_bytes()[0x202:0x206] == b"HdrS"  # the x86 boot protocol header

    with kit.vmlinux.open("rb") as vmlinux:
        header = vmlinux.read(20)
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2  # ELFCLASS64
    assert int.from_bytes(header[18:20], "little") == 62  # EM_X86_64
    assert kit.linux_banner.startswith(f"Linux version {kit.kernel_release} ")
    # Debian's banner names the package version: "... Debian 6.1.192-2 (date)".
    assert f"Debian {kit.kernel_package_version} " in kit.linux_banner
    assert kit.linux_banner.encode() in kit.vmlinux.read_bytes()


@pytest.mark.timeout(60)
def test_module_order_puts_dependencies_first(kit: GuestKit) -> None:
    order = list(kit.module_load_order)
    for module in kit.wanted_modules:
        assert module in order or module in kit.builtin_modules
    assert "crc32c_intel" not in order

    def before(first: str, then: str) -> None:
        if first in order and then in order:
            assert order.index(first) < order.index(then), order

    before("virtio_ring", "virtio")
    for driver in ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console"):
        before("virtio", driver)
    for dependency in ("jbd2", "mbcache", "crc16", "crc32c_generic"):
        before(dependency, "ext4")


@pytest.mark.timeout(300)
def test_guest_boots_to_the_ready_marker(guest: LinuxGuest) -> None:
    marker = f"@@DVS-READY {guest.ready_token}@@"
    assert marker in guest.serial_log
    assert marker in guest.serial_log_path.read_text(errors="replace")
    assert guest.boot_seconds is not None
    assert guest.is_running()


@pytest.mark.timeout(120)
def test_guest_runs_the_kits_kernel(guest: LinuxGuest, kit: GuestKit) -> None:
    assert guest.run("uname -r") == (0, kit.kernel_release + "\n")
    assert guest.check("cat /proc/version") == kit.linux_banner + "\n"
    assert guest.check("hostname") == kit.hostname + "\n"
    assert guest.check("id -u") == "0\n"


@pytest.mark.timeout(120)
def test_kit_modules_are_loaded(guest: LinuxGuest, kit: GuestKit) -> None:
    loaded = {line.split()[0] for line in guest.check("cat /proc/modules").splitlines()}
    builtin = set(guest.check(f"cat /lib/modules/{kit.kernel_release}/modules.builtin").split())
    for module in kit.wanted_modules:
        assert module in loaded or module in kit.builtin_modules, (module, sorted(loaded))
    assert set(kit.module_load_order) <= loaded
    assert builtin  # modprobe in the guest can tell built-ins from missing modules


@pytest.mark.timeout(120)
def test_exit_status_and_output_are_exact(guest: LinuxGuest) -> None:
    assert guest.run("sh -c 'exit 3'") == (3, "")
    assert guest.run("false")[0] == 1
    # Output is byte-exact: no trailing newline added, no \r, stderr merged in order.
    assert guest.run("printf 'a\\nb'") == (0, "a\nb")
    assert guest.run("echo out; echo err >&2; exit 7") == (7, "out\nerr\n")
    # Quotes, dollars and newlines in the command survive the transport.
    assert guest.run('x=\'$HOME "q"\'\necho "$x"') == (0, '$HOME "q"\n')
    # A command cannot swallow the next request from the console.
    assert guest.run("cat") == (0, "")
    long_line = "y" * 20000
    assert guest.run(f"echo {long_line} | wc -c") == (0, "20001\n")


@pytest.mark.timeout(120)
def test_a_command_past_its_timeout_is_killed_and_the_guest_stays_usable(
    guest: LinuxGuest,
) -> None:
    with pytest.raises(GuestCommandTimeout, match="did not finish within 2 s"):
        guest.run("echo started; sleep 60", timeout=2)
    assert guest.run("echo still here") == (0, "still here\n")


@pytest.mark.timeout(120)
def test_qmp_reports_a_running_guest(guest: LinuxGuest) -> None:
    status = guest.qmp("query-status")
    assert status["status"] == "running"
    assert status["running"] is True
    assert "running" in guest.hmp("info status")
    # kwargs with underscores become QMP's dashed names.
    assert "running" in guest.qmp("human-monitor-command", command_line="info status")


@pytest.mark.timeout(300)
def test_a_second_guest_has_another_kaslr_slide_memfd_ram_and_reports_its_panic(
    guest: LinuxGuest, kit: GuestKit
) -> None:
    first = kernel_text_address(guest)
    assert first != KERNEL_LINK_ADDRESS  # KASLR is on by default
    with LinuxGuest(kit, memfd_ram=True) as second:
        pid = second.pid
        second_text = kernel_text_address(second)
        # RAM is one shared memfd mapping of the guest's size, as vhost-user needs.
        shared_memfd_sizes = []
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if fields[1] == "rw-s" and "/memfd:" in line:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                shared_memfd_sizes.append(end - start)
        assert shared_memfd_sizes == [second.memory_mib << 20]
        # A guest panic ends QEMU (panic=-1 with -no-reboot); run() says so at once.
        with pytest.raises(GuestExited, match="QEMU exited"):
            second.run("echo c > /proc/sysrq-trigger", timeout=30)
        assert not second.is_running()
    assert_cleaned_up(second, pid)
    if second_text == first:
        # Slides are 2 MiB steps in a 1 GiB window: a repeat is rare but possible.
        with LinuxGuest(kit) as third:
            second_text = kernel_text_address(third)
    assert second_text != first


@pytest.mark.timeout(300)
def test_a_failing_body_still_cleans_up(kit: GuestKit) -> None:
    with pytest.raises(RuntimeError, match="body failed"):
        with LinuxGuest(kit, kaslr=False, cpus=2) as doomed:
            pid = doomed.pid
            assert kernel_text_address(doomed) == KERNEL_LINK_ADDRESS
            assert doomed.check("nproc") == "2\n"
            raise RuntimeError("body failed")
    assert_cleaned_up(doomed, pid)
    assert "@@DVS-READY" in doomed.serial_log  # the log stays readable after close()


@pytest.mark.timeout(120)
def test_boot_timeout_reports_the_serial_log(kit: GuestKit) -> None:
    guest = LinuxGuest(kit, boot_timeout=1.0)
    # On a loaded machine QEMU may not even have connected its serial port within 1 s.
    expected = "did not (become ready within 1 s|connect to the serial socket)"
    with pytest.raises(GuestBootError, match=expected) as failure:
        with guest:
            pass
    assert "serial console lines" in str(failure.value)
    assert_cleaned_up(guest, guest.pid)
    assert not os.path.exists(guest.serial_socket_path)


ABANDONING_PARENT = """
import os, threading, time
from dvs.testing.guest import GuestError, LinuxGuest

guest = LinuxGuest(boot_timeout=600)

def vanish_once_qemu_runs() -> None:
    while True:
        try:
            pid = guest.pid
            break
        except GuestError:
            time.sleep(0.05)
    print(pid, guest.run_dir, flush=True)
    os._exit(0)  # what pytest-timeout does: no finally blocks, no atexit hooks

threading.Thread(target=vanish_once_qemu_runs, daemon=True).start()
guest.start()
"""


@pytest.mark.timeout(120)
def test_qemu_dies_with_a_parent_that_skips_cleanup(kit: GuestKit) -> None:
    child = subprocess.run(
        [sys.executable, "-c", ABANDONING_PARENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid_text, run_dir = child.stdout.split()
    try:
        deadline = time.monotonic() + 30
        while not qemu_is_gone(int(pid_text)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qemu_is_gone(int(pid_text))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
