"""Guest kernel introspection against live Debian 6.1 guests under QEMU-TCG (KASLR on).

Three boots, shared by the module's tests: 512 MiB with 1 vCPU (qemu64: 4-level, no PTI);
4 GiB with 2 vCPUs, ``-cpu max`` and ``pti=on`` (5-level paging, PTI, RAM split around the
PCI hole); 1 GiB memfd-backed RAM with 2 vCPUs. Everything we find is checked against what
the guest or QEMU says: ``/proc/kallsyms`` and ``/proc/iomem`` read over the console, HMP
``gva2gpa`` and ``info mtree -f`` -- oracles only, never used by the code under test.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dvs.testing.guest import LinuxGuest
from dvs.vm.coredump import CoreFile, open_core_memory, write_core
from dvs.vm.kernel import LinuxKernel, find_kernel, locate_kernel
from dvs.vm.paging import PagingMode
from dvs.vm.sideload import Sideloader

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

CONFIGS = {
    "512M-1cpu": dict(memory_mib=512, cpus=1),
    "4G-2cpu-la57-pti": dict(memory_mib=4096, cpus=2, cpu_model="max", kernel_args=["pti=on"]),
    "1G-2cpu-memfd": dict(memory_mib=1024, cpus=2, memfd_ram=True),
}
KERNEL_LINK_TEXT = 0xFFFF_FFFF_8100_0000


@dataclass
class Booted:
    name: str
    guest: LinuxGuest
    kernel: LinuxKernel
    kallsyms: dict[str, list[int]]


def _boot(name: str) -> Iterator[Booted]:
    with LinuxGuest(**CONFIGS[name]) as guest:  # type: ignore[arg-type]
        kernel = find_kernel(guest.pid)
        listing = guest.check("grep -v '\\[' /proc/kallsyms", timeout=120)
        table: dict[str, list[int]] = {}
        for line in listing.splitlines():
            address, _, symbol = line.split()[:3]
            table.setdefault(symbol, []).append(int(address, 16))
        yield Booted(name, guest, kernel, table)


# One module-scoped guest per configuration, booted when a test first needs it; ``booted``
# runs a test on each. (Explicit fixtures rather than indirect parametrisation, so that the
# order of the tests below -- fresh side-loading first, long-running last -- is kept.)
@pytest.fixture(scope="module")
def guest_512m() -> Iterator[Booted]:
    yield from _boot("512M-1cpu")


@pytest.fixture(scope="module")
def guest_4g() -> Iterator[Booted]:
    yield from _boot("4G-2cpu-la57-pti")


@pytest.fixture(scope="module")
def guest_memfd() -> Iterator[Booted]:
    yield from _boot("1G-2cpu-memfd")


FIXTURES = {
    "512M-1cpu": "guest_512m",
    "4G-2cpu-la57-pti": "guest_4g",
    "1G-2cpu-memfd": "guest_memfd",
}


@pytest.fixture(params=list(CONFIGS))
def booted(request: pytest.FixtureRequest) -> Booted:
    value: Booted = request.getfixturevalue(FIXTURES[request.param])
    return value


@pytest.mark.parametrize("name", ["512M-1cpu", "4G-2cpu-la57-pti"])
def test_sideload_20_times_on_a_fresh_guest(name: str, request: pytest.FixtureRequest) -> None:
    """The first test of the module on these guests: side-load right after boot."""
    booted: Booted = request.getfixturevalue(FIXTURES[name])
    run_sideload_series(booted.guest, booted.kernel, runs=20)


def test_every_kallsyms_symbol_matches_the_guest(booted: Booted) -> None:
    ks = booted.kernel.kallsyms
    assert len(ks) == sum(len(v) for v in booted.kallsyms.values())
    for name, kind, address in ks.items():
        assert address in booted.kallsyms[name], (name, kind, hex(address))


def test_exported_symbols_match_the_guest(booted: Booted) -> None:
    table = booted.kernel.ksymtab
    assert table.format == "prel32-ns"
    assert table.count > 4000 and table.gpl_count > 4000
    for sym in table.symbols:
        if sym.name in booted.kallsyms:
            assert sym.value in booted.kallsyms[sym.name], sym
    assert table.as_dict()["system_wq"] == booted.kallsyms["system_wq"][0]  # positive offset


def test_kaslr_offsets_match_the_guests_own_view(booted: Booted) -> None:
    kernel, guest = booted.kernel, booted.guest
    text = booted.kallsyms["_text"][0]
    assert kernel.text_va == text
    assert kernel.kaslr_virtual_offset == text - KERNEL_LINK_TEXT
    assert int(kernel.vmcoreinfo["KERNELOFFSET"], 16) == kernel.kaslr_virtual_offset
    iomem = guest.check("cat /proc/iomem")
    code = re.search(r"([0-9a-f]+)-[0-9a-f]+ : Kernel code", iomem)
    assert code is not None and int(code.group(1), 16) == kernel.text_pa
    mask = (1 << 64) - 1  # phys_base wraps when the physical slide is below the virtual one
    assert kernel.phys_base == (kernel.text_pa - (text - 0xFFFF_FFFF_8000_0000)) & mask
    assert kernel.kaslr_physical_offset == kernel.text_pa - 0x100_0000
    assert kernel.banner.startswith(f"Linux version {guest.check('uname -r').strip()} ")
    for name in ("page_offset_base", "vmalloc_base", "vmemmap_base"):
        address = booted.kallsyms[name][0]
        assert getattr(kernel, name) == kernel.image.u64(address)


def test_paging_mode_and_pti(booted: Booted) -> None:
    kernel, guest = booted.kernel, booted.guest
    flags = guest.check("grep -m1 '^flags' /proc/cpuinfo").split()
    la57 = "la57" in flags
    assert kernel.paging_mode == (PagingMode.FIVE_LEVEL if la57 else PagingMode.FOUR_LEVEL)
    pti = "Kernel/User page tables isolation: enabled" in guest.check("dmesg")
    assert kernel.pti == pti
    assert booted.name != "4G-2cpu-la57-pti" or (la57 and pti)


def test_translations_match_qmp_gva2gpa(booted: Booted) -> None:
    kernel, guest = booted.kernel, booted.guest
    addresses = [
        kernel.text_va,
        kernel.symbol("init_top_pgt"),
        kernel.symbol("_printk") + 0x123,
        kernel.symbol("init_task"),
        kernel.page_offset_base + 0x1000,
        kernel.page_offset_base + kernel.text_pa + 0x4567,
        kernel.vmemmap_base + 64 * 0x1000,
        kernel.image.u64(kernel.symbol("vmcoreinfo_data")),
    ]
    tables = kernel.page_tables
    for va in addresses:
        answer = guest.hmp(f"gva2gpa {va:#x}")
        match = re.search(r"gpa: (0x[0-9a-f]+)", answer)
        assert match is not None, (hex(va), answer)
        assert tables.translate(va).pa == int(match.group(1), 16), hex(va)


def test_ram_regions_match_qmp_memory_tree(booted: Booted) -> None:
    ram = booted.kernel.ram
    tree = booted.guest.hmp("info mtree -f")
    block = "mem" if booted.name.endswith("memfd") else "pc.ram"
    pattern = re.compile(
        r"([0-9a-f]+)-([0-9a-f]+) \(prio \d+, ram\): " + re.escape(block) + r"(?: @([0-9a-f]+))?"
    )
    checked = 0
    for match in pattern.finditer(tree):
        start, end = int(match.group(1), 16), int(match.group(2), 16) + 1
        offset = int(match.group(3) or "0", 16)
        region = next(r for r in ram.regions if r.gpa <= start < r.end)
        assert end <= region.end
        assert region.hva + (start - region.gpa) == region.mapping.start + offset
        checked += 1
    assert checked >= 2
    assert ram.size == booted.guest.memory_mib << 20
    expected_layout = "split-at-4g" if booted.guest.memory_mib > 3072 else "linear"
    assert ram.layout == expected_layout
    if booted.name.endswith("memfd"):
        assert ram.regions[0].mapping.kind == "shared-memory"


def test_inspect_cli_json(booted: Booted) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inspect", str(booted.guest.pid), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    kernel = report["kernel"]
    assert report["hypervisor"] == "qemu" and report["vcpus"] is None
    assert kernel["text_va"] == booted.kallsyms["_text"][0]
    assert kernel["symbols"]["system_wq"] == booted.kallsyms["system_wq"][0]
    assert kernel["struct_offsets"]["work_struct.func"] == 24
    assert kernel["ksymtab_count"] > 4000 and kernel["kallsyms_count"] > 50000
    assert report["problems"] == []
    text = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inspect", str(booted.guest.pid)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "KASLR" in text and f"{kernel['text_va']:#x}" in text


def test_kaslr_differs_between_boots(
    guest_512m: Booted, guest_4g: Booted, guest_memfd: Booted
) -> None:
    slides = [(g.kernel.text_va, g.kernel.text_pa) for g in (guest_512m, guest_4g, guest_memfd)]
    assert len(set(slides)) == 3, slides


def test_coredump_is_readable_by_gdb_and_by_the_finder(guest_512m: Booted, tmp_path: Path) -> None:
    booted = guest_512m
    kernel = booted.kernel
    core = tmp_path / "guest.core"
    segments = write_core(kernel.ram, core, kernel=kernel, pause=True)
    assert len([s for s in segments if s.vaddr != kernel.text_va]) == len(kernel.ram.regions)
    parsed = CoreFile.open(core)
    assert parsed.note("VMCOREINFO", 0) is not None
    banner = booted.kallsyms["linux_banner"][0]
    gdb = subprocess.run(
        ["gdb", "-q", "-batch", "-ex", f"x/s {banner:#x}", "-c", str(core)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "Linux version" in gdb.stdout, gdb.stdout + gdb.stderr
    process, view, keep = open_core_memory(parsed)
    offline = locate_kernel(process, view)
    assert (offline.text_va, offline.text_pa, offline.root_pa) == (
        kernel.text_va,
        kernel.text_pa,
        kernel.root_pa,
    )
    del keep


def test_inject_test_and_coredump_commands(guest_memfd: Booted, tmp_path: Path) -> None:
    booted = guest_memfd
    pid = str(booted.guest.pid)
    booted.guest.check("dmesg -n 1")
    run = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inject-test", pid, "--count", "2", "--marker", "cli"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "run 2: marker 'cli 2/2' printed" in run.stdout
    assert "PG_reserved" in run.stdout
    log = booted.guest.check("dmesg")
    assert "cli 1/2\n" in log and "cli 2/2\n" in log
    core = tmp_path / "vm.core"
    dump = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "coredump", pid, str(core), "--pause"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr
    regions = CoreFile.open(core).physical_regions()
    assert [(r.paddr, r.filesz) for r in regions] == [
        (r.gpa, r.size) for r in booted.kernel.ram.regions
    ]
    assert booted.guest.qmp("query-status")["status"] == "running"  # SIGCONT after the copy
    bad = subprocess.run(
        [sys.executable, "-m", "dvs", "vm", "inspect", str(2**22 + 7)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "dvs: error:" in bad.stderr


def test_sideload_20_times_on_a_long_running_guest(guest_512m: Booted) -> None:
    """The last test of the module: the 1-vCPU guest has been up through every test above."""
    booted = guest_512m
    uptime = float(booted.guest.check("cut -d' ' -f1 /proc/uptime"))
    assert uptime > 60
    run_sideload_series(booted.guest, booted.kernel, runs=20)


# --- the side-loading check ---------------------------------------------------------------------
# "The guest keeps running normally": a heartbeat process started before the first injection
# writes a line every 0.2 s and never stops (no gap over 5 s, and it advanced while we
# injected; the guest clock of a TCG guest is host time, so a vCPU thread starved on a loaded
# 2-core host shows gaps of a few seconds that are not guest stalls: a 3.0 s gap was seen at load
# 4.5 with dmesg clean and every marker once. A real stall also shows as a lockup or RCU stall
# in dmesg, checked below); every marker is in dmesg and on the serial console exactly once;
# dmesg gains no oops, BUG, WARNING, lockup or RCU stall; and every change is undone (the work
# function pointer is the original one, the PMD entry we used is empty again).

BAD_DMESG = re.compile(
    r"Oops|BUG:|WARNING:|soft lockup|hard LOCKUP|rcu_.*stall|general protection|Call Trace"
)

HEARTBEAT = (
    "setsid sh -c 'while :; do cut -d\" \" -f1 /proc/uptime >> /tmp/dvs-heartbeat; sleep 0.2; done'"
    " </dev/null >/dev/null 2>&1 &"
)


def run_sideload_series(guest: LinuxGuest, kernel: LinuxKernel, runs: int) -> None:
    guest.check("pkill -f dvs-heartbeat; rm -f /tmp/dvs-heartbeat; " + HEARTBEAT)
    bad_before = len(BAD_DMESG.findall(guest.check("dmesg")))
    # read before the console level goes up: kernel lines would interleave with the output
    beats_before = int(guest.check("sleep 1; wc -l < /tmp/dvs-heartbeat").strip())
    # The console shows KERN_INFO only while we inject (the fixture keeps it at emergencies).
    guest.check("dmesg -n 7")
    tag = secrets.token_hex(4)
    loader = Sideloader(kernel)
    results = []
    try:
        for run in range(runs):
            results.append(loader.inject(f"dvs-sideload {tag} run {run + 1}", timeout=60))
        # the console prints after the log buffer has the line: on a loaded host the UART
        # lags, so wait for the last marker before taking the snapshot
        last = f"dvs-sideload {tag} run {runs}"
        deadline = time.monotonic() + 30
        while last not in guest.serial_log and time.monotonic() < deadline:
            time.sleep(0.1)
        console = guest.serial_log  # before any command echoes the kernel log back
    finally:
        guest.check("dmesg -n 1")
    for result in results:
        assert result.calls == 1 and result.restored_by_payload and not result.notes, result
        assert loader.current_slot() == loader.function_va
    tables = kernel.page_tables
    _, _, pmd = tables.table_entry(results[-1].entry_va, 2)
    assert pmd == 0
    log = guest.check("dmesg")
    for run in range(runs):
        marker = f"dvs-sideload {tag} run {run + 1}"
        assert log.count(marker + "\n") == 1, marker
        assert len(re.findall(re.escape(marker) + r"\r?\n", console)) == 1, marker
    assert len(BAD_DMESG.findall(log)) == bad_before, log[-3000:]
    beats = [float(x) for x in guest.check("cat /tmp/dvs-heartbeat").split()]
    assert len(beats) > beats_before
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 5.0, max(gaps)
    guest.check("pkill -f dvs-heartbeat || true")
