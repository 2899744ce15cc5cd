"""Guest RAM in several host mappings: a Debian 6.1 guest under QEMU-TCG with two NUMA nodes.

One boot: 4 GiB on the ``pc`` machine, node 0 a 1 GiB ``memory-backend-ram`` (anonymous
mapping), node 1 a 3 GiB ``memory-backend-memfd`` (shared mapping). QEMU lays the nodes end to
end and cuts the whole at 3 GiB for the PCI hole, so node 1's mapping backs two ranges:
[1 GiB, 3 GiB) and [4 GiB, 5 GiB). What we find is checked against QEMU's own view only --
HMP ``info mtree -f`` (which mapping is where), ``gva2gpa`` (the page-table walk) and ``xp``
(the bytes at a guest-physical address) -- and the guest's ``/proc/kallsyms``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dvs.testing.guest import LinuxGuest
from dvs.vm.kernel import LinuxKernel, find_kernel
from dvs.vm.memory import FOUR_GIB

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

GiB = 1 << 30
NODES = (("m0", "memory-backend-ram", 1024), ("m1", "memory-backend-memfd", 3072))
QEMU_ARGS = [
    arg
    for index, (name, backend, mib) in enumerate(NODES)
    for arg in (
        "-object",
        f"{backend},id={name},size={mib}M" + (",share=on" if "memfd" in backend else ""),
        "-numa",
        f"node,nodeid={index},memdev={name}",
    )
]


@dataclass
class Booted:
    guest: LinuxGuest
    kernel: LinuxKernel
    kallsyms: dict[str, int]


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    memory = sum(mib for _, _, mib in NODES)
    with LinuxGuest(memory_mib=memory, cpus=2, qemu_args=QEMU_ARGS) as guest:
        kernel = find_kernel(guest.pid)
        listing = guest.check("grep -v '\\[' /proc/kallsyms", timeout=120)
        table = {}
        for line in listing.splitlines():
            address, _, symbol = line.split()[:3]
            table.setdefault(symbol, int(address, 16))
        yield Booted(guest, kernel, table)


def hmp_gpa(booted: Booted, va: int) -> int:
    answer = booted.guest.hmp(f"gva2gpa {va:#x}")
    match = re.search(r"gpa: (0x[0-9a-f]+)", answer)
    assert match is not None, (hex(va), answer)
    return int(match.group(1), 16)


def hmp_u64(booted: Booted, gpa: int) -> int:
    answer = booted.guest.hmp(f"xp /1gx {gpa:#x}")
    match = re.search(r":\s*(0x[0-9a-f]+)", answer)
    assert match is not None, (hex(gpa), answer)
    return int(match.group(1), 16)


def test_the_guest_has_two_numa_nodes(booted: Booted) -> None:
    nodes = booted.guest.check("ls /sys/devices/system/node").split()
    assert {"node0", "node1"} <= set(nodes), nodes


def test_regions_match_qmp_memory_tree(booted: Booted) -> None:
    """Every RAM range QEMU maps is ours, at the same mapping and offset."""
    ram = booted.kernel.ram
    assert ram.layout == "multi-mapping"
    assert ram.problems == ()
    tree = booted.guest.hmp("info mtree -f")
    pattern = re.compile(r"([0-9a-f]+)-([0-9a-f]+) \(prio \d+, ram\): (m[01])(?: @([0-9a-f]+))?")
    blocks: dict[str, list[tuple[int, int, int]]] = {}
    for match in pattern.finditer(tree):
        start, end = int(match.group(1), 16), int(match.group(2), 16) + 1
        blocks.setdefault(match.group(3), []).append((start, end, int(match.group(4) or "0", 16)))
    # node 1 backs RAM on both sides of the PCI hole
    assert any(start >= FOUR_GIB for start, _, _ in blocks["m1"]), blocks
    assert any(start < 3 * GiB for start, _, _ in blocks["m1"]), blocks
    mapping_of: dict[str, int] = {}
    for name, ranges in blocks.items():
        for start, end, offset in ranges:
            region = next(r for r in ram.regions if r.gpa <= start < r.end)
            assert end <= region.end, (name, hex(start), hex(end), region)
            base = region.hva + (start - region.gpa) - offset  # the block's host address
            assert mapping_of.setdefault(name, base) == base, name
            assert region.mapping.start <= base + offset < region.mapping.end
    assert mapping_of["m0"] != mapping_of["m1"]
    kinds = {r.gpa: r.mapping.kind for r in ram.regions}
    assert kinds[0] == "anonymous" and kinds[FOUR_GIB] == "shared-memory"
    assert ram.size == 4096 << 20


def test_bytes_match_qmp_physical_reads(booted: Booted) -> None:
    """Words read through our map equal QEMU's ``xp`` in every region, either side of 4 GiB."""
    ram = booted.kernel.ram
    checked = 0
    for region in ram.regions:
        for fraction in (1, 5, 9):
            gpa = (region.gpa + region.size * fraction // 10) & ~7
            ours = int.from_bytes(ram.mem.read(gpa, 8), "little")
            assert ours == hmp_u64(booted, gpa), (hex(gpa), region)
            checked += 1
    assert checked >= 9


def test_translations_in_both_nodes_match_qmp_gva2gpa(booted: Booted) -> None:
    """The kernel's page tables, walked through our map, agree with QEMU's walker, including
    on node 1's ``pglist_data`` (the kernel allocates it in node 1's own memory)."""
    kernel = booted.kernel
    node_data = kernel.symbol("node_data")
    pgdat1 = kernel.image.u64(node_data + 8)
    assert pgdat1 != 0
    addresses = [
        kernel.text_va,
        kernel.symbol("init_top_pgt"),
        kernel.symbol("init_task"),
        kernel.image.u64(node_data),
        pgdat1,
        kernel.page_offset_base + 2 * GiB + 0x1234,
        kernel.page_offset_base + FOUR_GIB + GiB // 2 + 0x5678,
    ]
    tables = kernel.page_tables
    gpas = []
    for va in addresses:
        gpa = tables.translate(va).pa
        assert gpa == hmp_gpa(booted, va), hex(va)
        gpas.append(gpa)
    # node 1 is [1 GiB, 3 GiB) + [4 GiB, 5 GiB); pglist_data.node_id of node 1 reads 1
    pgdat1_gpa = gpas[4]
    assert GiB <= pgdat1_gpa < 3 * GiB or FOUR_GIB <= pgdat1_gpa < FOUR_GIB + GiB
    node_id_offset = kernel.btf.offsetof("pglist_data", "node_id")
    assert int.from_bytes(kernel.ram.mem.read(pgdat1_gpa + node_id_offset, 4), "little") == 1


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
    assert report["problems"] == []
    kernel = report["kernel"]
    assert kernel["text_va"] == booted.kallsyms["_text"]
    for name, value in kernel["symbols"].items():
        if name in booted.kallsyms:
            assert value == booted.kallsyms[name], name
    assert kernel["symbols"]["system_wq"] == booted.kallsyms["system_wq"]
    regions = [(r["gpa"], r["size"], r["hva"]) for r in report["regions"]]
    assert regions == [(r.gpa, r.size, r.hva) for r in booted.kernel.ram.regions]
    assert {r["backing"].split()[0] for r in report["regions"]} == {"anonymous", "shared-memory"}
    assert all(r["placed_by"] for r in report["regions"])
    assert any(r["placed_by"].startswith("kernel image") for r in report["regions"])
