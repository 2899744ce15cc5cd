"""KVM's UAPI structures and numbers, packed and unpacked through cffi (csrc/kvm/kvm_abi.h).

The layouts come from the C compiler (mirrors of linux/kvm.h, checked field by field at
build time), so nothing here spells out a struct format by hand. Values are plain dicts of
ints (segments nested) that dvs.hypervisor turns into dataclasses; bytes are what travels
through the injection scratch buffer to and from the hypervisor's KVM ioctls.
"""

from __future__ import annotations

from typing import Any

from dvs.lowlevel import ffi, lib

# ioctls
KVM_GET_API_VERSION: int = lib.KVM_GET_API_VERSION
KVM_GET_VCPU_MMAP_SIZE: int = lib.KVM_GET_VCPU_MMAP_SIZE
KVM_CHECK_EXTENSION: int = lib.KVM_CHECK_EXTENSION
KVM_RUN: int = lib.KVM_RUN
KVM_GET_REGS: int = lib.KVM_GET_REGS
KVM_SET_REGS: int = lib.KVM_SET_REGS
KVM_GET_SREGS: int = lib.KVM_GET_SREGS
KVM_SET_SREGS: int = lib.KVM_SET_SREGS
KVM_TRANSLATE: int = lib.KVM_TRANSLATE
KVM_GET_CPUID2: int = lib.KVM_GET_CPUID2
KVM_SET_USER_MEMORY_REGION: int = lib.KVM_SET_USER_MEMORY_REGION
KVM_IOEVENTFD: int = lib.KVM_IOEVENTFD
KVM_IRQFD: int = lib.KVM_IRQFD
# capabilities
KVM_CAP_NR_MEMSLOTS: int = lib.KVM_CAP_NR_MEMSLOTS
KVM_CAP_IOEVENTFD: int = lib.KVM_CAP_IOEVENTFD
KVM_CAP_IRQFD: int = lib.KVM_CAP_IRQFD
KVM_CAP_IRQFD_RESAMPLE: int = lib.KVM_CAP_IRQFD_RESAMPLE
KVM_CAP_NR_VCPUS: int = lib.KVM_CAP_NR_VCPUS
KVM_CAP_MAX_VCPUS: int = lib.KVM_CAP_MAX_VCPUS
KVM_CAP_USER_MEMORY: int = lib.KVM_CAP_USER_MEMORY
KVM_CAP_READONLY_MEM: int = lib.KVM_CAP_READONLY_MEM
KVM_CAP_EXT_CPUID: int = lib.KVM_CAP_EXT_CPUID
KVM_CAP_IMMEDIATE_EXIT: int = lib.KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_IRQCHIP: int = lib.KVM_CAP_IRQCHIP
# flags
KVM_MEM_LOG_DIRTY_PAGES: int = lib.KVM_MEM_LOG_DIRTY_PAGES
KVM_MEM_READONLY: int = lib.KVM_MEM_READONLY
KVM_IOEVENTFD_FLAG_DATAMATCH: int = lib.KVM_IOEVENTFD_FLAG_DATAMATCH
KVM_IOEVENTFD_FLAG_PIO: int = lib.KVM_IOEVENTFD_FLAG_PIO
KVM_IOEVENTFD_FLAG_DEASSIGN: int = lib.KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN: int = lib.KVM_IRQFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_RESAMPLE: int = lib.KVM_IRQFD_FLAG_RESAMPLE
# kvm_run exit reasons
EXIT_REASONS: dict[int, str] = {
    lib.KVM_EXIT_UNKNOWN: "unknown",
    lib.KVM_EXIT_IO: "io",
    lib.KVM_EXIT_HLT: "hlt",
    lib.KVM_EXIT_MMIO: "mmio",
    lib.KVM_EXIT_SHUTDOWN: "shutdown",
    lib.KVM_EXIT_FAIL_ENTRY: "fail_entry",
    lib.KVM_EXIT_INTR: "intr",
    lib.KVM_EXIT_INTERNAL_ERROR: "internal_error",
    lib.KVM_EXIT_SYSTEM_EVENT: "system_event",
}
KVM_EXIT_MMIO: int = lib.KVM_EXIT_MMIO
KVM_RUN_EXIT_REASON_OFFSET: int = lib.DVS_KVM_RUN_EXIT_REASON_OFFSET
KVM_RUN_EXIT_OFFSET: int = lib.DVS_KVM_RUN_EXIT_OFFSET
MAX_CPUID_ENTRIES: int = lib.DVS_KVM_MAX_CPUID_ENTRIES

REGS_SIZE: int = ffi.sizeof("struct dvs_kvm_regs")
SREGS_SIZE: int = ffi.sizeof("struct dvs_kvm_sregs")
TRANSLATION_SIZE: int = ffi.sizeof("struct dvs_kvm_translation")
CPUID2_HEADER_SIZE: int = ffi.offsetof("struct dvs_kvm_cpuid2", "entries")
CPUID_ENTRY_SIZE: int = ffi.sizeof("struct dvs_kvm_cpuid_entry2")
MEMORY_REGION_SIZE: int = ffi.sizeof("struct dvs_kvm_userspace_memory_region")
IOEVENTFD_SIZE: int = ffi.sizeof("struct dvs_kvm_ioeventfd")
IRQFD_SIZE: int = ffi.sizeof("struct dvs_kvm_irqfd")

REG_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SEGMENT_FIELDS = (
    "base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
    "unusable",
)  # fmt: skip
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def _from_bytes(ctype: str, data: bytes) -> Any:
    size = ffi.sizeof(ctype)
    if len(data) < size:
        raise ValueError(f"{ctype} needs {size} bytes, got {len(data)}")
    obj = ffi.new(f"{ctype} *")
    ffi.memmove(obj, data[:size], size)
    return obj


def _to_bytes(obj: Any, ctype: str) -> bytes:
    return bytes(ffi.buffer(obj, ffi.sizeof(ctype)))


# ---- registers ------------------------------------------------------------------------------


def regs_from_bytes(data: bytes) -> dict[str, int]:
    regs = _from_bytes("struct dvs_kvm_regs", data)
    return {name: int(getattr(regs, name)) for name in REG_NAMES}


def regs_to_bytes(values: dict[str, int]) -> bytes:
    regs = ffi.new("struct dvs_kvm_regs *")
    for name in REG_NAMES:
        setattr(regs, name, values[name] & 0xFFFF_FFFF_FFFF_FFFF)
    return _to_bytes(regs, "struct dvs_kvm_regs")


def sregs_from_bytes(data: bytes) -> dict[str, Any]:
    sregs = _from_bytes("struct dvs_kvm_sregs", data)
    out: dict[str, Any] = {}
    for name in SEGMENT_NAMES:
        seg = getattr(sregs, name)
        out[name] = {f: int(getattr(seg, f)) for f in SEGMENT_FIELDS}
    for name in ("gdt", "idt"):
        table = getattr(sregs, name)
        out[name] = {"base": int(table.base), "limit": int(table.limit)}
    for name in CONTROL_NAMES:
        out[name] = int(getattr(sregs, name))
    out["interrupt_bitmap"] = [int(sregs.interrupt_bitmap[i]) for i in range(4)]
    return out


def translation_to_bytes(linear_address: int) -> bytes:
    tr = ffi.new("struct dvs_kvm_translation *")
    tr.linear_address = linear_address
    return _to_bytes(tr, "struct dvs_kvm_translation")


def translation_from_bytes(data: bytes) -> dict[str, int]:
    tr = _from_bytes("struct dvs_kvm_translation", data)
    return {
        "linear_address": int(tr.linear_address),
        "physical_address": int(tr.physical_address),
        "valid": int(tr.valid),
        "writeable": int(tr.writeable),
        "usermode": int(tr.usermode),
    }


def cpuid2_request(n_entries: int) -> bytes:
    """A kvm_cpuid2 header asking for up to ``n_entries`` entries (the rest zero)."""
    if not 0 < n_entries <= MAX_CPUID_ENTRIES:
        raise ValueError(f"1..{MAX_CPUID_ENTRIES} entries")
    header = ffi.new("struct dvs_kvm_cpuid2 *")
    header.nent = n_entries
    return bytes(ffi.buffer(header, CPUID2_HEADER_SIZE))


def cpuid2_from_bytes(data: bytes) -> list[dict[str, int]]:
    if len(data) < CPUID2_HEADER_SIZE:
        raise ValueError("short kvm_cpuid2")
    buf = ffi.new("struct dvs_kvm_cpuid2 *")
    ffi.memmove(buf, data, min(len(data), ffi.sizeof("struct dvs_kvm_cpuid2")))
    count = min(
        int(buf.nent), MAX_CPUID_ENTRIES, (len(data) - CPUID2_HEADER_SIZE) // CPUID_ENTRY_SIZE
    )
    return [
        {name: int(getattr(buf.entries[i], name)) for name in CPUID_FIELDS} for i in range(count)
    ]


# ---- memory slots, ioeventfds, irqfds ---------------------------------------------------------


def memory_region(slot: int, flags: int, guest_phys_addr: int, size: int, hva: int) -> bytes:
    region = ffi.new("struct dvs_kvm_userspace_memory_region *")
    region.slot = slot
    region.flags = flags
    region.guest_phys_addr = guest_phys_addr
    region.memory_size = size
    region.userspace_addr = hva
    return _to_bytes(region, "struct dvs_kvm_userspace_memory_region")


def ioeventfd(address: int, length: int, fd: int, flags: int, datamatch: int = 0) -> bytes:
    ev = ffi.new("struct dvs_kvm_ioeventfd *")
    ev.datamatch = datamatch
    ev.addr = address
    ev.len = length
    ev.fd = fd
    ev.flags = flags
    return _to_bytes(ev, "struct dvs_kvm_ioeventfd")


def irqfd(fd: int, gsi: int, flags: int, resamplefd: int = 0) -> bytes:
    irq = ffi.new("struct dvs_kvm_irqfd *")
    irq.fd = fd
    irq.gsi = gsi
    irq.flags = flags
    irq.resamplefd = resamplefd
    return _to_bytes(irq, "struct dvs_kvm_irqfd")


def kvm_run_mmio(data: bytes) -> dict[str, int]:
    """The MMIO exit fields of a kvm_run page head."""
    run = _from_bytes("struct dvs_kvm_run_head", data)
    return {
        "phys_addr": int(run.exit.mmio.phys_addr),
        "len": int(run.exit.mmio.len),
        "is_write": int(run.exit.mmio.is_write),
        "data": int.from_bytes(bytes(run.exit.mmio.data), "little"),
    }


KVM_RUN_HEAD_SIZE: int = ffi.sizeof("struct dvs_kvm_run_head")

# ---- syscall numbers and flags of the build host (x86-64) --------------------------------------

SYS_read: int = lib.SYS_read
SYS_write: int = lib.SYS_write
SYS_close: int = lib.SYS_close
SYS_mmap: int = lib.SYS_mmap
SYS_munmap: int = lib.SYS_munmap
SYS_ioctl: int = lib.SYS_ioctl
SYS_getpid: int = lib.SYS_getpid
SYS_gettid: int = lib.SYS_gettid
SYS_ftruncate: int = lib.SYS_ftruncate
SYS_memfd_create: int = lib.SYS_memfd_create
SYS_eventfd2: int = lib.SYS_eventfd2
SYS_fcntl: int = lib.SYS_fcntl
SYS_dup: int = lib.SYS_dup
PROT_READ: int = lib.PROT_READ
PROT_WRITE: int = lib.PROT_WRITE
MAP_SHARED: int = lib.MAP_SHARED
MAP_PRIVATE: int = lib.MAP_PRIVATE
MAP_ANONYMOUS: int = lib.MAP_ANONYMOUS
MFD_CLOEXEC: int = lib.MFD_CLOEXEC
EFD_CLOEXEC: int = lib.EFD_CLOEXEC
EFD_NONBLOCK: int = lib.EFD_NONBLOCK
