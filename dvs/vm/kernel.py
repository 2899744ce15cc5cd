"""Find a running x86-64 Linux kernel in a hypervisor's memory, without CPU registers.

The facts this relies on (arch/x86, stable since 4.x):

* The kernel image is physically contiguous and loaded at a CONFIG_PHYSICAL_ALIGN (2 MiB)
  boundary; KASLR picks the physical load address and, independently, the virtual address
  of ``_text`` inside ``[__START_KERNEL_map, +1 GiB)`` with ``__START_KERNEL_map`` =
  0xffffffff80000000. Any image address translates as ``pa = va - __START_KERNEL_map +
  phys_base`` (``__pa_symbol``), and ``phys_base`` is itself a variable in the image.
* ``init_top_pgt`` (alias ``swapper_pg_dir``) is the kernel's own top-level page table, in
  the image's data; it maps the image, the direct map of all RAM at ``page_offset_base``,
  vmalloc space at ``vmalloc_base`` and ``struct page``s at ``vmemmap_base`` (all three
  randomised by CONFIG_RANDOMIZE_MEMORY and stored in variables of those names). With
  CONFIG_X86_5LEVEL ``__pgtable_l5_enabled`` says whether it is a PML5 or a PML4.
* ``max_pfn`` is one past the last RAM page frame; above 4 GiB RAM continues at 4 GiB.
* ``vmcoreinfo_data`` (CONFIG_CRASH_CORE) is the kernel's own text description for crash
  dumps, including ``KERNELOFFSET`` (the KASLR slide), used as an independent cross-check.

The search: scan the RAM candidates for the kallsyms token-table signature, decode kallsyms
there (``dvs.vm.kallsyms``), and anchor it in host memory through ``linux_banner``, whose bytes
are known ("Linux version "). That gives every symbol's host address, so ``phys_base``,
``page_offset_base`` and ``boot_params`` (with the firmware's e820 map) can be read. Every RAM
mapping is then placed in guest-physical memory (``dvs.vm.placement``): the image's mapping by
``phys_base``, all of them by the self-pointers of the kernel's direct map, the rest by the
e820 map. The placement is a hypothesis that must pass validation: the kernel's page tables,
walked through it (they may sit in any region), map ``_text`` and ``init_top_pgt`` to the
physical addresses ``phys_base`` predicts, and the direct map maps sampled RAM pages of every
region to themselves. A stale copy of a kernel (e.g. in the page cache) fails the page-table
checks, or the self-pointers contradict where it would sit, and it is skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from dvs.lowlevel.guestmem import GuestMemoryFault
from dvs.vm import btf as btf_mod
from dvs.vm import kallsyms as kallsyms_mod
from dvs.vm import ksyms as ksyms_mod
from dvs.vm.errors import GuestLayoutError, KernelNotFound, TranslationFault
from dvs.vm.kallsyms import Kallsyms
from dvs.vm.memory import (
    GuestRam,
    HostMapping,
    HostView,
    HypervisorProcess,
    ram_candidates,
    read_maps,
)
from dvs.vm.paging import PAGE_SIZE, PageTables, PagingMode, Translation
from dvs.vm.placement import (
    BOOT_PARAMS_SPAN,
    Anchor,
    ChunkVote,
    chunk_votes,
    parse_boot_params_e820,
    place_mappings,
    usable_ranges,
)

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
KERNEL_IMAGE_SPAN = 1 << 30
DEFAULT_PHYSICAL_START = 0x100_0000
BANNER_PREFIX = b"Linux version "
_MASK64 = (1 << 64) - 1
"""``phys_base`` wraps (it is "negative") when the physical slide is below the virtual one."""

_REQUIRED_SYMBOLS = ("_text", "_end", "linux_banner", "init_top_pgt", "phys_base")
_KALLSYMS_WINDOW_BEFORE = 48 << 20
_KALLSYMS_WINDOW_AFTER = 16 << 20
_DEFAULT_PAGE_OFFSET = {
    PagingMode.FOUR_LEVEL: 0xFFFF_8880_0000_0000,
    PagingMode.FIVE_LEVEL: 0xFF11_0000_0000_0000,
}
"""``__PAGE_OFFSET_BASE_L4/L5``: the direct map when CONFIG_RANDOMIZE_MEMORY is off."""

_VoteCache = dict[tuple[int, int, int], list[ChunkVote]]


@dataclass(frozen=True)
class KernelImage:
    """A copy of the image bytes ``[_text, _end)`` taken at one moment."""

    va: int
    pa: int
    data: bytes

    @property
    def end(self) -> int:
        return self.va + len(self.data)

    def contains(self, va: int, length: int = 1) -> bool:
        return self.va <= va and va + length <= self.end

    def read(self, va: int, length: int) -> bytes:
        if not self.contains(va, length):
            raise GuestLayoutError(
                "reads stay inside the kernel image", f"{va:#x}+{length:#x} is outside"
            )
        off = va - self.va
        return self.data[off : off + length]

    def u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")


@dataclass
class LinuxKernel:
    """A located, validated guest kernel (see the module note)."""

    ram: GuestRam
    image: KernelImage
    kallsyms: Kallsyms
    banner: str
    text_va: int
    text_pa: int
    phys_base: int
    paging_mode: PagingMode
    root_pa: int
    """Physical address of ``init_top_pgt`` (the kernel PGD / PML5)."""
    pti: bool
    """Page-table isolation is in use (the user copy of ``init_top_pgt`` is populated)."""
    page_offset_base: int
    vmalloc_base: int
    vmemmap_base: int
    max_pfn: int
    vmcoreinfo: dict[str, str]
    checks: list[str] = field(default_factory=list)
    """The validations this kernel passed, in words."""

    @property
    def release(self) -> str:
        words = self.banner.split()
        return words[2] if len(words) > 2 else ""

    @property
    def kaslr_virtual_offset(self) -> int:
        """``kaslr_offset()``: the slide of ``_text`` from its link-time address."""
        if "KERNELOFFSET" in self.vmcoreinfo:
            return int(self.vmcoreinfo["KERNELOFFSET"], 16)
        return self.text_va - (START_KERNEL_MAP + DEFAULT_PHYSICAL_START)

    @property
    def physical_start(self) -> int:
        """CONFIG_PHYSICAL_START, the link-time physical (and virtual) load offset."""
        return self.text_va - self.kaslr_virtual_offset - START_KERNEL_MAP

    @property
    def kaslr_physical_offset(self) -> int:
        return self.text_pa - self.physical_start

    @property
    def page_tables(self) -> PageTables:
        return PageTables(self.ram.mem, self.root_pa, self.paging_mode)

    def symbol(self, name: str) -> int:
        try:
            return self.kallsyms.lookup(name)
        except KeyError:
            raise GuestLayoutError("the kernel has the symbol", name) from None

    def image_pa(self, va: int) -> int:
        """``__pa_symbol``: the physical address of an address inside the kernel image."""
        return (va - START_KERNEL_MAP + self.phys_base) & _MASK64

    def translate(self, va: int) -> Translation:
        return self.page_tables.translate(va)

    def read_va(self, va: int, length: int) -> bytes:
        """Read kernel virtual memory, page by page through the kernel's page tables."""
        tables = self.page_tables
        out = bytearray()
        while length > 0:
            step = min(length, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            out += self.ram.mem.read(tables.translate(va).pa, step)
            va += step
            length -= step
        return bytes(out)

    def read_u64(self, va: int) -> int:
        return int.from_bytes(self.read_va(va, 8), "little")

    @functools.cached_property
    def btf(self) -> btf_mod.Btf:
        """The kernel's ``.BTF`` section (``__start_BTF``..``__stop_BTF``), parsed."""
        start, stop = self.kallsyms.get("__start_BTF"), self.kallsyms.get("__stop_BTF")
        if start is None or stop is None or not self.image.contains(start, stop - start):
            hits = btf_mod.find_btf(self.image.data)
            if not hits:
                raise GuestLayoutError("the kernel has a .BTF section", "no BTF header found")
            return btf_mod.Btf(self.image.data[hits[0] :])
        return btf_mod.Btf(self.image.read(start, stop - start))

    @functools.cached_property
    def ksymtab(self) -> ksyms_mod.Ksymtab:
        """Exported symbols, bounded by kallsyms when it names the tables, else scanned."""
        bounds = {
            name: self.kallsyms.get(name)
            for name in (
                "__start___ksymtab",
                "__stop___ksymtab",
                "__start___ksymtab_gpl",
                "__stop___ksymtab_gpl",
            )
        }
        if all(v is not None for v in bounds.values()):
            known = {k: v for k, v in bounds.items() if v is not None}
            return ksyms_mod.from_kallsyms(self.image.data, self.image.va, known)
        return ksyms_mod.scan(self.image.data, self.image.va)

    def direct_map_va(self, pa: int) -> int:
        return self.page_offset_base + pa

    def pfn_to_page(self, pfn: int, struct_page_size: int = 64) -> int:
        """Virtual address of a page frame's ``struct page`` (SPARSEMEM_VMEMMAP)."""
        return self.vmemmap_base + pfn * struct_page_size


# --- the search -------------------------------------------------------------------------------


@dataclass
class _Candidate:
    mapping: HostMapping
    kallsyms: Kallsyms
    window_start: int
    """Host address of byte 0 of the buffer kallsyms was parsed from."""
    banners: list[int]
    """Host addresses of "Linux version " strings in that buffer."""


def find_kernel(pid: int) -> LinuxKernel:
    """Locate and validate the Linux kernel running in hypervisor process ``pid``."""
    process = HypervisorProcess.of(pid)
    candidates = ram_candidates(read_maps(pid))
    return locate_kernel(process, HostView(pid, candidates))


def locate_kernel(process: HypervisorProcess, view: HostView) -> LinuxKernel:
    """The search of ``find_kernel`` over any host view (a live process or a mapped core)."""
    reasons: list[str] = []
    seen: set[int] = set()
    vote_cache: _VoteCache = {}
    for hit in view.scan(kallsyms_mod.DIGIT_TOKENS):
        parsed = _kallsyms_candidate(view, hit, seen, reasons)
        if parsed is None:
            continue
        try:
            return _anchor_and_validate(process, view, parsed, vote_cache)
        except (GuestLayoutError, GuestMemoryFault, TranslationFault) as exc:
            reasons.append(f"kallsyms at {parsed.window_start:#x}: {exc}")
    sizes = ", ".join(f"{m.start:#x}+{m.size >> 20} MiB" for m in view.candidates)
    detail = "; ".join(reasons[-4:]) or "no kallsyms token table in any candidate"
    raise KernelNotFound(f"searched {len(view.candidates)} RAM candidates ({sizes}): {detail}")


def _kallsyms_candidate(
    view: HostView, hit: int, seen: set[int], reasons: list[str]
) -> _Candidate | None:
    mapping = view.mapping_of(hit)
    if mapping is None:
        return None
    lo, small = view.read_clipped(hit - 0x4000, 0x8000)
    table = kallsyms_mod.token_table_at(small, hit - lo)
    if table is None:
        return None
    table_host = lo + table[0]
    if table_host in seen:
        return None
    seen.add(table_host)
    start, window = view.read_clipped(
        hit - _KALLSYMS_WINDOW_BEFORE, _KALLSYMS_WINDOW_BEFORE + _KALLSYMS_WINDOW_AFTER
    )
    try:
        parsed = kallsyms_mod.parse(window, table_host - start, lo + table[1] - start)
    except GuestLayoutError as exc:
        reasons.append(f"token table at {table_host:#x}: {exc}")
        return None
    missing = [s for s in _REQUIRED_SYMBOLS if s not in parsed]
    if missing:
        reasons.append(f"kallsyms at {table_host:#x} lacks {', '.join(missing)}")
        return None
    banners = []
    pos = window.find(BANNER_PREFIX)
    while pos >= 0:
        banners.append(start + pos)
        pos = window.find(BANNER_PREFIX, pos + 1)
    return _Candidate(mapping, parsed, start, banners)


def _anchor_and_validate(
    process: HypervisorProcess, view: HostView, cand: _Candidate, vote_cache: _VoteCache
) -> LinuxKernel:
    ks = cand.kallsyms
    text_va = ks.lookup("_text")
    banner_va = ks.lookup("linux_banner")
    errors = []
    for banner_host in cand.banners:
        text_host = banner_host - (banner_va - text_va)
        try:
            return _validate(process, view, cand, text_host, vote_cache)
        except (GuestLayoutError, GuestMemoryFault, TranslationFault) as exc:
            errors.append(f"banner at {banner_host:#x}: {exc}")
    raise GuestLayoutError(
        "linux_banner anchors the image in host memory",
        "; ".join(errors[-3:]) or "no 'Linux version' string in the mapping",
    )


def _validate(
    process: HypervisorProcess,
    view: HostView,
    cand: _Candidate,
    text_host: int,
    vote_cache: _VoteCache,
) -> LinuxKernel:
    ks = cand.kallsyms
    mapping = cand.mapping
    text_va = ks.lookup("_text")
    end_va = ks.lookup("_end")
    if not START_KERNEL_MAP <= text_va < START_KERNEL_MAP + KERNEL_IMAGE_SPAN or end_va <= text_va:
        raise GuestLayoutError("_text.._end lies in the kernel image window", f"{text_va:#x}")
    if not (mapping.start <= text_host and text_host + (end_va - text_va) <= mapping.end):
        raise GuestLayoutError("the image lies inside one RAM mapping", f"_text at {text_host:#x}")

    def host_u64(name: str) -> int:
        return int.from_bytes(view.read(text_host + ks.lookup(name) - text_va, 8), "little")

    phys_base = host_u64("phys_base")
    text_pa = (text_va - START_KERNEL_MAP + phys_base) & _MASK64
    if text_pa % (2 << 20) or text_pa >= 1 << 52:
        raise GuestLayoutError(
            "the kernel is loaded at a 2 MiB-aligned physical address",
            f"phys_base {phys_base:#x} puts _text at {text_pa:#x}",
        )
    root_va = ks.lookup("init_top_pgt")
    root_pa = (root_va - START_KERNEL_MAP + phys_base) & _MASK64
    checks = [f"phys_base {phys_base:#x} places _text at physical {text_pa:#x}"]

    modes = [PagingMode.FOUR_LEVEL, PagingMode.FIVE_LEVEL]
    if "__pgtable_l5_enabled" in ks:
        l5 = int.from_bytes(
            view.read(text_host + ks.lookup("__pgtable_l5_enabled") - text_va, 4), "little"
        )
        modes = [PagingMode.FIVE_LEVEL if l5 else PagingMode.FOUR_LEVEL]
    max_pfn = host_u64("max_pfn") if "max_pfn" in ks else 0
    page_offset_base = host_u64("page_offset_base") if "page_offset_base" in ks else 0
    if not page_offset_base:
        page_offset_base = _DEFAULT_PAGE_OFFSET[modes[0]]

    usable: list[tuple[int, int]] = []
    boot_params = ks.get("boot_params")
    if boot_params is not None and text_va <= boot_params <= end_va - BOOT_PARAMS_SPAN:
        e820 = parse_boot_params_e820(
            view.read(text_host + boot_params - text_va, BOOT_PARAMS_SPAN)
        )
        usable = usable_ranges(e820)
        if usable:
            checks.append(
                f"boot_params e820 map: {len(e820)} entries, usable RAM "
                + ", ".join(f"{a:#x}-{b:#x}" for a, b in usable)
            )
    ram_end = usable[-1][1] if usable else max_pfn * PAGE_SIZE or 1 << 46
    votes = {}
    for candidate in view.candidates:
        key = (candidate.start, page_offset_base, ram_end)
        if key not in vote_cache:
            vote_cache[key] = chunk_votes(
                view.read, candidate, view.data_runs_of(candidate), page_offset_base, ram_end
            )
        votes[candidate.start] = vote_cache[key]
    anchor = Anchor(mapping, text_host - mapping.start, end_va - text_va, text_pa)
    placement = place_mappings(view.candidates, votes, usable, anchor)
    ram = GuestRam(process, placement.regions, placement.layout, placement.problems)
    mode = _check_self_mapping(ram, root_pa, root_va, text_va, text_pa, modes)
    checks.append(
        f"{int(mode)}-level page tables at {root_pa:#x} map _text and init_top_pgt to "
        "the addresses phys_base predicts"
    )
    if "page_offset_base" not in ks:
        page_offset_base = _DEFAULT_PAGE_OFFSET[mode]
    checks += placement.describe()
    checked = _check_direct_map(ram, root_pa, mode, page_offset_base, usable, max_pfn)
    checks.append(f"{placement.layout} layout: {checked}")

    image_bytes = ram.mem.read(text_pa, end_va - text_va)
    image = KernelImage(text_va, text_pa, image_bytes)
    banner_raw = image.read(ks.lookup("linux_banner"), 512)
    banner = banner_raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if not banner.startswith("Linux version "):
        raise GuestLayoutError("linux_banner holds the banner", repr(banner[:40]))

    def image_u64(name: str, default: int) -> int:
        address = ks.get(name)
        return image.u64(address) if address is not None and image.contains(address, 8) else default

    tables = PageTables(ram.mem, root_pa, mode)
    kernel = LinuxKernel(
        ram=ram,
        image=image,
        kallsyms=ks,
        banner=banner,
        text_va=text_va,
        text_pa=text_pa,
        phys_base=phys_base,
        paging_mode=mode,
        root_pa=root_pa,
        pti=_user_pgd_populated(ram, root_pa),
        page_offset_base=page_offset_base,
        vmalloc_base=image_u64("vmalloc_base", 0),
        vmemmap_base=image_u64("vmemmap_base", 0),
        max_pfn=max_pfn,
        vmcoreinfo={},
        checks=checks,
    )
    kernel.vmcoreinfo = _read_vmcoreinfo(kernel, tables)
    if "KERNELOFFSET" in kernel.vmcoreinfo:
        stated = int(kernel.vmcoreinfo["KERNELOFFSET"], 16)
        checks.append(f"vmcoreinfo states KERNELOFFSET={stated:x}")
    return kernel


def _check_self_mapping(
    ram: GuestRam,
    root_pa: int,
    root_va: int,
    text_va: int,
    text_pa: int,
    modes: list[PagingMode],
) -> PagingMode:
    problems = []
    for mode in modes:
        tables = PageTables(ram.mem, root_pa, mode)
        try:
            got_text = tables.translate(text_va).pa
            got_root = tables.translate(root_va).pa
        except (GuestLayoutError, TranslationFault) as exc:
            problems.append(f"{int(mode)}-level: {exc}")
            continue
        if got_text == text_pa and got_root == root_pa:
            return mode
        problems.append(
            f"{int(mode)}-level: _text -> {got_text:#x} (want {text_pa:#x}), "
            f"init_top_pgt -> {got_root:#x} (want {root_pa:#x})"
        )
    raise GuestLayoutError("the kernel page tables map the kernel image", "; ".join(problems))


def _check_direct_map(
    ram: GuestRam,
    root_pa: int,
    mode: PagingMode,
    page_offset_base: int,
    usable: list[tuple[int, int]],
    max_pfn: int,
) -> str:
    """Sampled RAM pages of every region must be direct-mapped to themselves.

    The walk reads page tables wherever the kernel allocated them, so it only succeeds when
    every region they sit in is placed right; a region holding no usable RAM is not sampled.
    """
    tables = PageTables(ram.mem, root_pa, mode)
    top = max_pfn * PAGE_SIZE if max_pfn else ram.regions[-1].end
    ram_ranges = usable or [(1 << 20, top)]
    total_ok = 0
    for region in ram.regions:
        spans = [
            (max(region.gpa, start, 1 << 20), min(region.end, end)) for start, end in ram_ranges
        ]
        spans = [(a, b) for a, b in spans if b - a >= PAGE_SIZE]
        length = sum(b - a for a, b in spans)
        if not spans:
            continue
        ok = 0
        samples = 16
        for i in range(samples):
            offset = length * i // samples
            for a, b in spans:
                if offset < b - a:
                    gpa = (a + offset) & ~(PAGE_SIZE - 1)
                    break
                offset -= b - a
            try:
                got = tables.translate(page_offset_base + gpa).pa
            except TranslationFault:
                continue  # a range the kernel reserved and does not direct-map
            if got != gpa:
                raise GuestLayoutError(
                    "the direct map maps RAM to itself",
                    f"page_offset_base+{gpa:#x} -> {got:#x} in region {region.gpa:#x}",
                )
            ok += 1
        if ok < samples // 2:
            raise GuestLayoutError(
                "the direct map covers each RAM region",
                f"only {ok}/{samples} sampled pages of {region.gpa:#x}+{region.size:#x} mapped",
            )
        total_ok += ok
    return f"{total_ok} sampled RAM pages direct-mapped to themselves"


def _user_pgd_populated(ram: GuestRam, root_pa: int) -> bool:
    try:
        user = ram.mem.read(root_pa + PAGE_SIZE, PAGE_SIZE)
    except GuestMemoryFault:
        return False
    return root_pa % (2 * PAGE_SIZE) == 0 and any(user)


def _read_vmcoreinfo(kernel: LinuxKernel, tables: PageTables) -> dict[str, str]:
    pointer = kernel.kallsyms.get("vmcoreinfo_data")
    if pointer is None or not kernel.image.contains(pointer, 8):
        return {}
    address = kernel.image.u64(pointer)
    size_va = kernel.kallsyms.get("vmcoreinfo_size")
    size = kernel.image.u64(size_va) if size_va and kernel.image.contains(size_va, 8) else 4096
    size = min(size, 4096)
    try:
        raw = kernel.read_va(address, size)
    except (TranslationFault, GuestLayoutError, GuestMemoryFault):
        return {}
    info: dict[str, str] = {}
    for line in raw.split(b"\0", 1)[0].decode("ascii", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key] = value
    return info
