"""``dvs vm coredump``: guest physical memory as an ELF core file.

Format (ELF-64, System V gABI; the kdump ``vmcore`` conventions that gdb and crash read):

* ``ET_CORE``, ``EM_X86_64``; program headers right after the 64-byte ELF header.
* One ``PT_NOTE`` segment: a ``VMCOREINFO`` note (the guest kernel's own crash-dump
  description, as kdump writes it), a ``DVS`` note (type 1) holding JSON with the RAM layout
  and the kernel facts we found, and one ``CORE``/``NT_PRSTATUS`` note per vCPU when registers
  are known (``struct elf_prstatus`` of x86-64: 112 bytes of process fields, 27 registers in
  ``user_regs_struct`` order, ``pr_fpvalid``).
* One ``PT_LOAD`` per RAM region: ``p_paddr`` is the guest-physical address; ``p_vaddr`` is the
  region's address in the kernel's direct map (``page_offset_base + gpa``) when the kernel is
  known, else the guest-physical address. One more ``PT_LOAD`` aliases the kernel image at its
  virtual address (the same file bytes), so ``gdb vmlinux core`` reads kernel variables.
* Segments start at page-aligned file offsets. Zero pages are left as holes (a sparse file),
  and pages the hypervisor never populated (``/proc/PID/pagemap``) are not even read.

The guest keeps running while we read unless ``pause`` is set, in which case the hypervisor
process is stopped (SIGSTOP; every thread, so every vCPU) for the copy and continued after.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvs.lowlevel.guestmem import buffer_address
from dvs.vm.kernel import LinuxKernel
from dvs.vm.memory import GuestRam, HostMapping, HostView, HypervisorProcess, data_ranges

ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_R, PF_W, PF_X = 4, 2, 1
NT_PRSTATUS = 1
DVS_NOTE_LAYOUT = 1
PAGE = 4096
CHUNK = 16 << 20

PRSTATUS_REGISTERS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip
"""``struct user_regs_struct`` of x86-64, the ``pr_reg`` of ``NT_PRSTATUS``."""


@dataclass(frozen=True)
class VcpuRegisters:
    index: int
    registers: dict[str, int]


@dataclass(frozen=True)
class CoreSegment:
    """A ``PT_LOAD`` as read back from a core file."""

    vaddr: int
    paddr: int
    offset: int
    filesz: int


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    return struct.pack("<III", len(name_z), len(desc), note_type) + _pad4(name_z) + _pad4(desc)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def prstatus(vcpu: VcpuRegisters) -> bytes:
    head = struct.pack("<iii", 0, 0, 0) + struct.pack("<h", 0) + b"\0\0"
    head += struct.pack("<QQ", 0, 0)
    head += struct.pack("<iiii", vcpu.index + 1, 0, 0, 0)  # pid: vCPU number + 1, as QEMU
    head += b"\0" * 64  # four struct timeval
    regs = struct.pack(
        "<27Q", *(vcpu.registers.get(r, 0) & (2**64 - 1) for r in PRSTATUS_REGISTERS)
    )
    return head + regs + struct.pack("<ii", 0, 0)


def write_core(
    ram: GuestRam,
    path: str | Path,
    *,
    kernel: LinuxKernel | None = None,
    vcpus: Sequence[VcpuRegisters] = (),
    extra: dict[str, object] | None = None,
    pause: bool = False,
) -> list[CoreSegment]:
    """Write the core; returns the ``PT_LOAD`` segments as written."""
    notes = b""
    if kernel is not None and kernel.vmcoreinfo:
        text = "".join(f"{k}={v}\n" for k, v in kernel.vmcoreinfo.items())
        notes += _note(b"VMCOREINFO", 0, text.encode())
    layout: dict[str, object] = {
        "pid": ram.pid,
        "layout": ram.layout,
        "regions": [{"gpa": r.gpa, "size": r.size, "hva": r.hva} for r in ram.regions],
    }
    if kernel is not None:
        layout["kernel"] = {
            "banner": kernel.banner,
            "text_va": kernel.text_va,
            "text_pa": kernel.text_pa,
            "phys_base": kernel.phys_base,
            "root_pa": kernel.root_pa,
            "paging_levels": int(kernel.paging_mode),
            "page_offset_base": kernel.page_offset_base,
            "vmemmap_base": kernel.vmemmap_base,
        }
    if extra:
        layout.update(extra)
    notes += _note(b"DVS", DVS_NOTE_LAYOUT, json.dumps(layout).encode())
    for vcpu in vcpus:
        notes += _note(b"CORE", NT_PRSTATUS, prstatus(vcpu))

    segments: list[CoreSegment] = []
    n_phdrs = 1 + len(ram.regions) + (1 if kernel is not None else 0)
    offset = 64 + 56 * n_phdrs
    note_offset = offset
    offset += len(notes)
    region_offsets = []
    for region in ram.regions:
        offset = (offset + PAGE - 1) & ~(PAGE - 1)
        region_offsets.append(offset)
        vaddr = kernel.page_offset_base + region.gpa if kernel is not None else region.gpa
        segments.append(CoreSegment(vaddr, region.gpa, offset, region.size))
        offset += region.size
    total = offset
    if kernel is not None:
        for seg in segments:
            if seg.paddr <= kernel.text_pa < seg.paddr + seg.filesz:
                image_offset = seg.offset + kernel.text_pa - seg.paddr
                segments.append(
                    CoreSegment(
                        kernel.text_va, kernel.text_pa, image_offset, len(kernel.image.data)
                    )
                )
                break
        else:
            n_phdrs -= 1
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack(
        "<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, 1, 0, 64, 0, 0, 64, 56, n_phdrs, 0, 0, 0
    )
    phdrs = struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_offset, 0, 0, len(notes), 0, 4)
    for seg in segments:
        phdrs += struct.pack(
            "<IIQQQQQQ", PT_LOAD, PF_R | PF_W | PF_X, seg.offset, seg.vaddr, seg.paddr,
            seg.filesz, seg.filesz, PAGE,
        )  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    stopped = False
    try:
        os.pwrite(fd, header + phdrs, 0)
        os.pwrite(fd, notes, note_offset)
        if pause:
            os.kill(ram.pid, signal.SIGSTOP)
            stopped = True
        for region, file_offset in zip(ram.regions, region_offsets, strict=True):
            _copy_region(ram, region.gpa, region.hva, region.size, region.mapping, fd, file_offset)
        os.ftruncate(fd, total)
    finally:
        if stopped:
            os.kill(ram.pid, signal.SIGCONT)
        os.close(fd)
    return segments


def _copy_region(
    ram: GuestRam, gpa: int, hva: int, size: int, mapping: object, fd: int, file_offset: int
) -> None:
    assert isinstance(mapping, HostMapping)
    buf = bytearray(CHUNK)
    for run_start, run_end in data_ranges(ram.pid, mapping):
        lo, hi = max(run_start, hva), min(run_end, hva + size)
        for start in range(lo, hi, CHUNK):
            length = min(CHUNK, hi - start)
            view = memoryview(buf)[:length]
            ram.mem.readinto(gpa + (start - hva), view)
            pages = np.frombuffer(buf, dtype="<u8", count=length // 8).reshape(-1, PAGE // 8)
            nonzero = np.concatenate([[False], pages.any(axis=1), [False]])
            edges = np.diff(nonzero.astype(np.int8))
            for a, b in zip(
                np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist(), strict=True
            ):
                os.pwrite(fd, view[a * PAGE : b * PAGE], file_offset + (start - hva) + a * PAGE)


# --- reading a core back (tests, offline analysis) -----------------------------------------------


@dataclass
class CoreFile:
    path: Path
    segments: list[CoreSegment]
    notes: list[tuple[str, int, bytes]]

    @classmethod
    def open(cls, path: str | Path) -> CoreFile:
        path = Path(path)
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:
                raise ValueError(f"{path} is not an ELF-64 file")
            e_type, e_machine = struct.unpack_from("<HH", header, 16)
            phoff = struct.unpack_from("<Q", header, 32)[0]
            phnum = struct.unpack_from("<H", header, 56)[0]
            if e_type != ET_CORE or e_machine != EM_X86_64:
                raise ValueError(f"{path} is not an x86-64 core ({e_type}, {e_machine})")
            f.seek(phoff)
            table = f.read(56 * phnum)
            segments, notes = [], []
            for i in range(phnum):
                p_type, _, off, vaddr, paddr, filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", table, 56 * i
                )
                if p_type == PT_LOAD:
                    segments.append(CoreSegment(vaddr, paddr, off, filesz))
                elif p_type == PT_NOTE:
                    f.seek(off)
                    notes += _parse_notes(f.read(filesz))
        return cls(path, segments, notes)

    def note(self, name: str, note_type: int) -> bytes | None:
        for n, t, desc in self.notes:
            if n == name and t == note_type:
                return desc
        return None

    def physical_regions(self) -> list[CoreSegment]:
        """The per-region segments (the kernel-image alias excluded)."""
        layout = self.note("DVS", DVS_NOTE_LAYOUT)
        count = len(json.loads(layout)["regions"]) if layout else len(self.segments)
        return self.segments[:count]


def open_core_memory(core: CoreFile) -> tuple[HypervisorProcess, HostView, object]:
    """Map a core file here and describe it as a hypervisor whose RAM is that mapping.

    The physical segments are consecutive and page aligned in the file, just as QEMU lays
    out one RAM block, so the kernel finder runs on it unchanged (``locate_kernel``).
    Returns the process descriptor, the view, and the mapping to keep alive.
    """
    import mmap

    regions = core.physical_regions()
    if not regions:
        raise ValueError(f"{core.path} has no PT_LOAD segments")
    with open(core.path, "rb") as f:
        area = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base, view_obj = buffer_address(area)
    first, last = regions[0], regions[-1]
    mapping = HostMapping(
        start=base + first.offset,
        end=base + last.offset + last.filesz,
        perms="rw-p",
        offset=first.offset,
        inode=0,
        path=str(core.path),
    )
    process = HypervisorProcess(pid=0, comm="core", exe=str(core.path), kind="core-file")
    runs = [
        (base + lo, base + hi)
        for lo, hi in file_data_ranges(core.path)
        if hi > first.offset and lo < last.offset + last.filesz
    ]
    runs = [(max(a, mapping.start), min(b, mapping.end)) for a, b in runs]
    view = HostView(0, [mapping], use_pagemap=False, data_runs={mapping.start: runs})
    return process, view, (area, view_obj)


def file_data_ranges(path: str | Path) -> list[tuple[int, int]]:
    """``(start, end)`` of the parts of a sparse file that are not holes (SEEK_DATA/SEEK_HOLE)."""
    runs = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return runs


def _parse_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    out = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz].rstrip(b"\0").decode("ascii", "replace")
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        out.append((name, note_type, desc))
    return out
