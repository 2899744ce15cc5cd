"""Offline introspection of a saved core of a live Debian guest (built once into the cache by
``dvs.testing.guest_dump``; the first run boots a guest to make it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.testing.guest_dump import SavedDump, saved_guest_dump
from dvs.vm.coredump import CoreFile, VcpuRegisters, open_core_memory, write_core
from dvs.vm.inspect import describe_kernel
from dvs.vm.kernel import LinuxKernel, locate_kernel
from dvs.vm.sideload import (
    PAYLOAD_SOURCE,
    SIDELOAD_MAGIC,
    _plan_layout,
    build_payload,
    plan_low_pages,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def dump() -> SavedDump:
    return saved_guest_dump()


@pytest.fixture(scope="module")
def kernel(dump: SavedDump) -> Iterator[LinuxKernel]:
    process, view, keep = open_core_memory(CoreFile.open(dump.core))
    yield locate_kernel(process, view)
    del keep


def test_the_finder_works_on_the_saved_core(dump: SavedDump, kernel: LinuxKernel) -> None:
    assert kernel.release == dump.release
    for name, address in dump.symbols.items():
        assert kernel.symbol(name) == address, name
    assert kernel.text_va == dump.symbols["_text"]
    assert kernel.ram.layout == "linear" and kernel.ram.size == 256 << 20
    info, problems = describe_kernel(kernel)
    assert problems == []
    assert info.ksymtab_count > 4000 and info.btf_types > 50000


def test_enumerated_mappings_cover_the_image_and_the_direct_map(kernel: LinuxKernel) -> None:
    runs = kernel.page_tables.mappings()
    text = next(r for r in runs if r.contains(kernel.text_va))
    assert text.pa + (kernel.text_va - text.va) == kernel.text_pa
    assert text.executable and not text.writable and not text.user
    data = next(r for r in runs if r.contains(kernel.symbol("init_task")))
    assert data.writable and not data.executable
    direct = [
        r for r in runs if kernel.page_offset_base <= r.va < kernel.page_offset_base + (1 << 40)
    ]
    covered = sum(r.size for r in direct)
    assert 200 << 20 < covered <= 256 << 20
    assert all(r.pa == r.va - kernel.page_offset_base for r in direct)
    assert not any(r.user for r in runs if r.va >= 1 << 63)


def test_low_pages_are_proved_unused(kernel: LinuxKernel) -> None:
    plan = plan_low_pages(kernel, 4)
    assert len(plan.pages) == 4
    for page in plan.pages:
        assert 0x10000 <= page.pa < min(plan.ebda, 0xA0000)
        assert not plan.trampoline[0] <= page.pa < plan.trampoline[1]
        assert not any(kernel.ram.mem.read(page.pa, 4096))
        assert any("PG_reserved" in r for r in page.reasons)


def test_the_redirect_changes_one_byte_of_the_pointer(kernel: LinuxKernel) -> None:
    payload = build_payload()
    assert payload.text.startswith(b"\xf3\x0f\x1e\xfa")  # endbr64 at sideload_entry
    assert (
        int.from_bytes(payload.image[payload.data_offset : payload.data_offset + 8], "little")
        == SIDELOAD_MAGIC
    )
    assert (PAYLOAD_SOURCE / "payload.c").exists()
    original = kernel.symbol("vmstat_shepherd")
    layout = _plan_layout(kernel, original, payload)
    differing = [
        i for i in range(8) if (layout.entry_va >> 8 * i) & 0xFF != (original >> 8 * i) & 0xFF
    ]
    assert differing == [3]
    assert layout.entry_va < kernel.text_va
    assert layout.text_va % 4096 == 0 and layout.data_va == layout.text_va + payload.data_offset


def test_a_core_with_vcpu_registers_is_read_by_gdb(kernel: LinuxKernel, tmp_path: Path) -> None:
    """vCPU notes (NT_PRSTATUS) are written when registers are known; gdb shows them."""
    registers = {"rip": kernel.symbol("_printk"), "rsp": 0xFFFF_C900_0001_3F58, "rax": 42}
    core = tmp_path / "again.core"
    write_core(kernel.ram, core, kernel=kernel, vcpus=[VcpuRegisters(0, registers)])
    parsed = CoreFile.open(core)
    assert parsed.note("CORE", 1) is not None
    gdb = subprocess.run(
        ["gdb", "-q", "-batch", "-ex", "info registers rip rsp rax", "-c", str(core)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert f"{registers['rip']:#x}" in gdb.stdout, gdb.stdout + gdb.stderr
    assert "0xffffc90000013f58" in gdb.stdout and "0x2a" in gdb.stdout
