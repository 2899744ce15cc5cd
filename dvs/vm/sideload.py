"""Make a running guest kernel execute a payload of ours exactly once, from outside, without KVM.

This is the riskiest step of VM attach, proven here in isolation: a small position-independent
payload (``csrc/guest/sideload/``) is placed in guest RAM, the kernel is made to call it once
from a safe context, it prints a marker with ``printk`` and returns into the code the kernel
meant to run, and every change is undone. Nothing needs CPU registers or KVM ioctls, so it
works for QEMU-TCG and for any hypervisor whose RAM we can write (``process_vm_writev``).

Where the payload lives. The first megabyte of RAM: since 5.13 x86 ``setup_arch`` memblock-
reserves all of it (BIOSes scribble there), so those pages are never handed to the page
allocator; the only kernel user after boot is the real-mode trampoline (``real_mode_header``,
``real_mode_blob_end - real_mode_blob`` bytes, used to start CPUs and resume), plus firmware
areas (page 0, the EBDA named by the BIOS data area word at 0x40E). ``plan_low_pages`` proves a
page free before use: below the EBDA, outside the trampoline, above 64 KiB, all zero, and its
``struct page`` (``vmemmap_base + pfn * sizeof(struct page)``, layout and ``PG_reserved`` from
the guest's own BTF) has ``PG_reserved`` set. We restore the pages to zero afterwards.

How it is mapped. The kernel image window ``[0xffffffff80000000, _text)`` is at least 16 MiB of
unused virtual space (``cleanup_highmap`` clears those entries of ``level2_kernel_pgt``, the PMD
shared by every address space through the kernel half of each PGD). We fill one reserved page
as a page table and point an empty PMD entry there: a stub page (RX), the payload text (RX) and
its data page (RW, NX). A not-present -> present change needs no TLB flush.

How it is entered. A one-shot redirect through data the kernel calls, never through patched
code (an emulator such as TCG may keep running translated blocks of the old code; a function
pointer is re-read on every call). The pointer is ``shepherd.work.func`` of the vmstat
shepherd, a ``delayed_work`` that runs ``vmstat_shepherd`` once a second in a kworker (process
context, interrupts on, no locks held, so ``printk`` is safe) and re-queues itself. Kernel text
addresses are ``0xffffffff8X......``; we choose the stub's address to differ from the original
pointer only in byte 3 (``0x8X`` -> ``0x80``, which is below any ``_text``), so arming is a
single-byte store -- atomic, no torn pointer can ever be read. The payload then (1) restores the
pointer with a compare-and-swap, (2) prints once (a second compare-and-swap on ``state``),
(3) tail-jumps to ``vmstat_shepherd`` with the original argument, which re-arms its timer. The
host polls ``state`` and waits until the shepherd's ``timer.expires`` has changed, which proves
the kworker has left our pages, before unmapping them and zeroing them.

Safe contexts: the target must be process-context work that re-reads its function pointer and
whose function tolerates one extra level of call (a tail jump keeps the stack as it was). Not
safe: interrupt or NMI handlers (printk from NMI is deferred but our code could be interrupted
mid-way by the host's cleanup), callbacks that run with spinlocks held that printk's console
path needs, and code pointers the kernel caches (static calls, alternatives, jump labels).

On KVM the same steps work with the hypervisor's memory: guest RAM is shared between the
hypervisor process and the guest, so ``process_vm_writev`` changes are seen at once. Two
things differ. The hardware TLB and paging-structure caches may hold entries for our virtual
addresses across runs, so the pages must stay the same physical pages in the same roles (as
here) or the host must make the guest flush (for instance by entering through a pointer that
runs an ``invlpg`` first). And with vCPU registers available (later issue) the entry can also
be a one-shot change of RIP on a halted vCPU, as VMSH does, but the function-pointer route needs
no ptrace at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dvs.vm.errors import GuestLayoutError, SideloadError, TranslationFault
from dvs.vm.kernel import LinuxKernel
from dvs.vm.paging import (
    PAGE_SIZE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_NX,
    PTE_PRESENT,
    PTE_WRITABLE,
    PageTables,
)

PAYLOAD_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "guest" / "sideload"
CFLAGS = [
    "-ffreestanding",
    "-nostdlib",
    "-fPIC",
    "-fvisibility=hidden",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fcf-protection=branch",
    "-fno-jump-tables",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
]

SIDELOAD_MAGIC = 0x64766D736C6F6164
STATE_ARMED, STATE_ENTERED, STATE_DONE = 0, 1, 2
# struct sideload_args (csrc/guest/sideload/sideload_abi.h)
ARGS_FORMAT = "<QQQQQIIQ64s128s"
ARGS_SIZE = struct.calcsize(ARGS_FORMAT)
OFF_STATE = 0x28
OFF_CALLS = 0x2C
OFF_RESTORED = 0x30

KERNEL_WINDOW = 0xFFFF_FFFF_8000_0000
LOW_MEMORY_FLOOR = 0x10000
"""Below 64 KiB BIOSes are known to scribble (and the kernel keeps page 0 and boot data)."""
BDA_EBDA_SEGMENT = 0x40E
EBDA_DEFAULT = 0x9F000
TABLE_FLAGS = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED | PTE_DIRTY  # _KERNPG_TABLE
STUB_SIZE = 9  # endbr64 (4) + jmp rel32 (5)

KERN_INFO = 6


@dataclass(frozen=True)
class Target:
    """A self-requeueing ``delayed_work`` whose ``work.func`` we redirect once."""

    work_symbol: str
    function_symbol: str


TARGETS = (Target("shepherd", "vmstat_shepherd"),)


# --- the payload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    image: bytes
    """Flat image: text from offset 0 (``sideload_entry`` first), data page at ``data_offset``."""
    data_offset: int

    @property
    def text(self) -> bytes:
        return self.image[: self.data_offset]

    @property
    def text_pages(self) -> int:
        return self.data_offset // PAGE_SIZE


def _cache_root() -> Path:
    root = Path(
        os.environ.get("DVS_CACHE_DIR") or Path(__file__).resolve().parents[2] / ".cache" / "dvs"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_payload(source: Path = PAYLOAD_SOURCE) -> Payload:
    """Compile the payload with the host gcc (cached by a hash of sources and flags)."""
    files = sorted(p for p in source.iterdir() if p.suffix in (".c", ".S", ".h", ".ld"))
    if not files:
        raise SideloadError(f"no payload sources in {source}")
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    out = _cache_root() / f"sideload-payload-{digest.hexdigest()[:16]}.bin"
    if not out.exists():
        lock = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.exists():
                _compile(source, out)
        finally:
            os.close(lock)
    image = out.read_bytes()
    data_offset = (len(image) - ARGS_SIZE) & ~(PAGE_SIZE - 1)
    magic = struct.unpack_from("<Q", image, data_offset)[0] if data_offset < len(image) else 0
    if data_offset == 0 or magic != SIDELOAD_MAGIC:
        raise SideloadError(f"{out} does not hold the payload layout (no args at {data_offset:#x})")
    return Payload(image, data_offset)


def _compile(source: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="dvs-payload."))
    try:
        objects = []
        for name in ("entry.S", "payload.c"):
            obj = work / (name + ".o")
            _run(["gcc", *CFLAGS, "-c", str(source / name), "-o", str(obj)])
            objects.append(str(obj))
        elf = work / "payload.elf"
        _run(["ld", "-T", str(source / "payload.ld"), "-nostdlib", "-static", "-o", str(elf),
              *objects])  # fmt: skip
        relocs = _run(["readelf", "-r", str(elf)])
        if "Relocation section" in relocs:
            raise SideloadError(f"the payload needs relocations:\n{relocs}")
        tmp = work / "payload.bin"
        _run(["objcopy", "-O", "binary", str(elf), str(tmp)])
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise SideloadError(f"building the payload needs {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        raise SideloadError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result.stdout


# --- proving low pages unused ----------------------------------------------------------------


@dataclass(frozen=True)
class LowPage:
    pa: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class LowMemoryPlan:
    pages: tuple[LowPage, ...]
    trampoline: tuple[int, int]
    ebda: int
    pg_reserved_bit: int


def plan_low_pages(kernel: LinuxKernel, count: int) -> LowMemoryPlan:
    """Pick ``count`` pages of the first megabyte and prove each unused (module note)."""
    btf = kernel.btf
    page_size = btf.struct_size("page")
    flags_offset = btf.offsetof("page", "flags")
    reserved_bit = btf.enum_value("pageflags", "PG_reserved")
    header_va = kernel.image.u64(kernel.symbol("real_mode_header"))
    trampoline_pa = kernel.translate(header_va).pa
    blob = kernel.symbol("real_mode_blob_end") - kernel.symbol("real_mode_blob")
    trampoline = (trampoline_pa & ~(PAGE_SIZE - 1), _page_up(trampoline_pa + blob))
    segment = int.from_bytes(kernel.ram.mem.read(BDA_EBDA_SEGMENT, 2), "little")
    ebda = segment << 4 if 0x80000 <= segment << 4 < 0xA0000 else EBDA_DEFAULT
    ceiling = min(ebda & ~(PAGE_SIZE - 1), 0xA0000)
    if trampoline[0] < ceiling:
        ceiling = trampoline[0]
    chosen: list[LowPage] = []
    # Highest pages first, keeping one guard page below whatever bounds the range.
    for pa in range(ceiling - 2 * PAGE_SIZE, LOW_MEMORY_FLOOR - 1, -PAGE_SIZE):
        if trampoline[0] <= pa < trampoline[1]:
            continue
        if any(kernel.ram.mem.read(pa, PAGE_SIZE)):
            continue
        pfn = pa // PAGE_SIZE
        flags = kernel.read_u64(kernel.vmemmap_base + pfn * page_size + flags_offset)
        if not flags >> reserved_bit & 1:
            continue
        chosen.append(
            LowPage(
                pa,
                (
                    f"below the EBDA at {ebda:#x} and above {LOW_MEMORY_FLOOR:#x}",
                    f"outside the real-mode trampoline {trampoline[0]:#x}-{trampoline[1]:#x}",
                    "all zero",
                    f"struct page flags {flags:#x} have PG_reserved (bit {reserved_bit})",
                ),
            )
        )
        if len(chosen) == count:
            return LowMemoryPlan(tuple(chosen), trampoline, ebda, reserved_bit)
    raise SideloadError(f"only {len(chosen)} of {count} provably unused pages below {ceiling:#x}")


def _page_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


# --- one injection ------------------------------------------------------------------------------


@dataclass
class SideloadResult:
    marker: str
    entry_va: int
    slot_va: int
    pages: tuple[int, ...]
    calls: int
    restored_by_payload: bool
    seconds_to_marker: float
    seconds_total: float
    proof: LowMemoryPlan
    notes: list[str] = field(default_factory=list)
    done_at: float = 0.0
    """``time.monotonic()`` when the payload reported that printk returned."""


@dataclass(frozen=True)
class _Layout:
    entry_va: int
    stub_va: int
    stub_pages: int
    text_va: int
    data_va: int
    pmd_table: int
    pmd_index: int


def _plan_layout(kernel: LinuxKernel, original: int, payload: Payload) -> _Layout:
    if original >> 32 != 0xFFFFFFFF or (original >> 24) & 0xFF <= 0x80:
        raise SideloadError(f"target function {original:#x} is not above the first 16 MiB")
    entry = KERNEL_WINDOW | (original & 0xFFFFFF)
    if entry >= kernel.text_va:
        raise SideloadError(f"entry {entry:#x} would not lie below _text {kernel.text_va:#x}")
    stub_va = entry & ~(PAGE_SIZE - 1)
    stub_pages = 2 if (entry & (PAGE_SIZE - 1)) > PAGE_SIZE - STUB_SIZE else 1
    slot = (stub_va >> 12) & 0x1FF
    pages = payload.text_pages + 1
    if slot + stub_pages + pages <= 512:
        text_va = stub_va + stub_pages * PAGE_SIZE
    elif slot - pages >= 0:
        text_va = stub_va - pages * PAGE_SIZE
    else:  # pragma: no cover - 512 entries always leave room on one side
        raise SideloadError("no room in the page table around the entry")
    tables = kernel.page_tables
    pmd_table, pmd_index, pmd_entry = tables.table_entry(entry, 2)
    if pmd_entry & PTE_PRESENT:
        raise SideloadError(f"the PMD entry for {entry:#x} is in use ({pmd_entry:#x})")
    return _Layout(
        entry, stub_va, stub_pages, text_va, text_va + payload.data_offset, pmd_table, pmd_index
    )


class Sideloader:
    """Runs the proof against one located kernel (see the module note)."""

    def __init__(
        self,
        kernel: LinuxKernel,
        payload: Payload | None = None,
        target: Target | None = None,
        *,
        log_level: int = KERN_INFO,
    ) -> None:
        self.kernel = kernel
        self.payload = payload or build_payload()
        self.log_level = log_level
        self.target = target or self._pick_target()
        btf = kernel.btf
        self.func_offset = btf.offsetof("delayed_work", "work.func")
        self.expires_offset = btf.offsetof("delayed_work", "timer.expires")
        self.work_va = kernel.symbol(self.target.work_symbol)
        self.function_va = kernel.symbol(self.target.function_symbol)
        self.slot_va = self.work_va + self.func_offset
        self.printk_va = kernel.kallsyms.get("_printk") or kernel.symbol("printk")
        self.mem = kernel.ram.mem

    def _pick_target(self) -> Target:
        for target in TARGETS:
            if target.work_symbol in self.kernel.kallsyms and (
                target.function_symbol in self.kernel.kallsyms
            ):
                return target
        raise SideloadError("the kernel has none of the known self-requeueing work items")

    def _pa(self, va: int) -> int:
        return self.kernel.image_pa(va)

    def current_slot(self) -> int:
        """The redirected function pointer's value right now."""
        return int.from_bytes(self.mem.read(self._pa(self.slot_va), 8), "little")

    def _args_state(self, data_pa: int) -> tuple[int, int, int]:
        raw = self.mem.read(data_pa + OFF_STATE, 16)
        state, calls, restored = struct.unpack("<IIQ", raw)
        return state, calls, restored

    def inject(
        self,
        marker: str | None = None,
        *,
        timeout: float = 30.0,
        on_armed: Callable[[], None] | None = None,
    ) -> SideloadResult:
        """Run the payload once; always undo every change before returning or raising."""
        started = time.monotonic()
        marker = marker or f"dvs-sideload {secrets.token_hex(6)}"
        original = self.current_slot()
        if original != self.function_va:
            raise SideloadError(
                f"{self.target.work_symbol}.work.func is {original:#x}, expected "
                f"{self.target.function_symbol} at {self.function_va:#x} (another injection?)"
            )
        layout = _plan_layout(self.kernel, original, self.payload)
        n_pages = 1 + layout.stub_pages + self.payload.text_pages + 1
        proof = plan_low_pages(self.kernel, n_pages)
        pa = [p.pa for p in proof.pages]
        table_pa, stub_pas = pa[0], pa[1 : 1 + layout.stub_pages]
        text_pas = pa[1 + layout.stub_pages : -1]
        data_pa = pa[-1]
        redirected = layout.entry_va
        result = SideloadResult(
            marker, layout.entry_va, self.slot_va, tuple(pa), 0, False, 0.0, 0.0, proof
        )
        armed = False
        mapped = False
        try:
            self._write_pages(layout, table_pa, stub_pas, text_pas, data_pa, original, marker)
            self.mem.write_u64(layout.pmd_table + 8 * layout.pmd_index, table_pa | TABLE_FLAGS)
            mapped = True
            self._verify_mapping(layout, stub_pas, data_pa)
            expires_pa = self._pa(self.work_va + self.expires_offset)
            expires_before = self.mem.read_u64(expires_pa)
            # Arm: one byte, 0x8X -> 0x80 (the module note explains why a byte suffices).
            self.mem.write(self._pa(self.slot_va) + 3, bytes([(redirected >> 24) & 0xFF]))
            armed = True
            armed_at = time.monotonic()
            if on_armed is not None:
                on_armed()
            deadline = armed_at + timeout
            state = calls = restored = 0
            while time.monotonic() < deadline:
                state, calls, restored = self._args_state(data_pa)
                if state == STATE_DONE:
                    break
                time.sleep(0.002)
            else:
                raise SideloadError(
                    f"the payload did not finish within {timeout:.0f} s (state {state}, "
                    f"{calls} calls)"
                )
            result.done_at = time.monotonic()
            result.seconds_to_marker = result.done_at - armed_at
            # Wait until the kworker has left our pages: vmstat_shepherd re-arms its timer
            # only after our tail jump reached it.
            while time.monotonic() < deadline:
                rearmed = self.mem.read_u64(expires_pa) != expires_before
                if rearmed and self.current_slot() == original:
                    break
                time.sleep(0.002)
            else:
                raise SideloadError("the work item did not re-arm after the payload ran")
            armed = False
            state, calls, restored = self._args_state(data_pa)
            result.calls = calls
            result.restored_by_payload = bool(restored)
        finally:
            self._undo(layout, armed, mapped, original, data_pa, pa, result)
        result.seconds_total = time.monotonic() - started
        return result

    def _write_pages(
        self,
        layout: _Layout,
        table_pa: int,
        stub_pas: list[int],
        text_pas: list[int],
        data_pa: int,
        original: int,
        marker: str,
    ) -> None:
        payload = self.payload
        stub = bytearray(PAGE_SIZE * layout.stub_pages)
        at = layout.entry_va - layout.stub_va
        rel = layout.text_va - (layout.entry_va + STUB_SIZE)
        stub[at : at + STUB_SIZE] = b"\xf3\x0f\x1e\xfa\xe9" + struct.pack("<i", rel)
        for i, stub_pa in enumerate(stub_pas):
            self.mem.write(stub_pa, bytes(stub[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]))
        text = payload.text.ljust(PAGE_SIZE * payload.text_pages, b"\0")
        for i, text_pa in enumerate(text_pas):
            self.mem.write(text_pa, text[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        level = f"\x01{self.log_level}".encode()
        args = struct.pack(
            ARGS_FORMAT,
            SIDELOAD_MAGIC,
            self.printk_va,
            self.slot_va,
            original,
            layout.entry_va,
            STATE_ARMED,
            0,
            0,
            level + b"%s\n",
            marker.encode()[:127],
        )
        data = bytearray(payload.image[payload.data_offset :].ljust(PAGE_SIZE, b"\0"))
        data[:ARGS_SIZE] = args
        self.mem.write(data_pa, bytes(data))
        table = bytearray(PAGE_SIZE)
        code = PTE_PRESENT | PTE_ACCESSED
        for i, stub_pa in enumerate(stub_pas):
            index = ((layout.stub_va >> 12) & 0x1FF) + i
            struct.pack_into("<Q", table, 8 * index, stub_pa | code)
        for i, text_pa in enumerate(text_pas):
            index = ((layout.text_va >> 12) & 0x1FF) + i
            struct.pack_into("<Q", table, 8 * index, text_pa | code)
        data_flags = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED | PTE_DIRTY | PTE_NX
        struct.pack_into("<Q", table, 8 * ((layout.data_va >> 12) & 0x1FF), data_pa | data_flags)
        self.mem.write(table_pa, bytes(table))

    def _verify_mapping(self, layout: _Layout, stub_pas: list[int], data_pa: int) -> None:
        tables = PageTables(self.mem, self.kernel.root_pa, self.kernel.paging_mode)
        entry = tables.translate(layout.entry_va)
        data = tables.translate(layout.data_va)
        if entry.page_pa != stub_pas[0] or not entry.executable or entry.writable:
            raise SideloadError(f"stub mapping is wrong: {entry}")
        if data.page_pa != data_pa or data.executable or not data.writable:
            raise SideloadError(f"data mapping is wrong: {data}")

    def _undo(
        self,
        layout: _Layout,
        armed: bool,
        mapped: bool,
        original: int,
        data_pa: int,
        pages: list[int],
        result: SideloadResult,
    ) -> None:
        if armed:
            if self.current_slot() != original:
                self.mem.write(self._pa(self.slot_va) + 3, bytes([(original >> 24) & 0xFF]))
                result.notes.append("the host restored the function pointer")
            # A kworker may have read the redirected pointer just before the restore; give it
            # time to enter and leave before the pages go away.
            grace = time.monotonic() + 3.0
            while time.monotonic() < grace:
                state, calls, _ = self._args_state(data_pa)
                if calls and state != STATE_DONE:
                    grace = max(grace, time.monotonic() + 0.5)
                time.sleep(0.01)
        if mapped:
            self.mem.write_u64(layout.pmd_table + 8 * layout.pmd_index, 0)
        for pa in pages:
            self.mem.write(pa, bytes(PAGE_SIZE))
        try:
            PageTables(self.mem, self.kernel.root_pa, self.kernel.paging_mode).translate(
                layout.entry_va
            )
        except TranslationFault:
            return
        except GuestLayoutError:
            return
        result.notes.append("the entry address still translates after the undo")
