"""Pieces of the hypervisor mechanics that need no hypervisor: KVM structure layouts (as the
kernel defines them), vCPU state decoding, fd/maps discovery on synthetic input, the syscall
instruction finder on this process, and the C loop that serves trapped MMIO (driven over a
real socketpair the way the guardian drives it).
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from dvs.hypervisor.discovery import find_syscall_instruction, handles_from, parse_maps
from dvs.hypervisor.errors import NotAKvmHypervisor
from dvs.hypervisor.vcpu import page_table_root, paging_mode, privilege_level
from dvs.lowlevel import kvm as llkvm
from dvs.lowlevel.ptrace import MmioBank

# ---- KVM ABI (values from linux/kvm.h, x86-64) --------------------------------------------------


def test_kvm_structure_sizes_match_the_kernel_abi() -> None:
    assert llkvm.REGS_SIZE == 18 * 8
    assert llkvm.SREGS_SIZE == 312
    assert llkvm.TRANSLATION_SIZE == 24
    assert llkvm.CPUID_ENTRY_SIZE == 40
    assert llkvm.CPUID2_HEADER_SIZE == 8
    assert llkvm.MEMORY_REGION_SIZE == 32
    assert llkvm.IOEVENTFD_SIZE == 64
    assert llkvm.IRQFD_SIZE == 32
    assert llkvm.KVM_RUN_EXIT_REASON_OFFSET == 8
    assert llkvm.KVM_RUN_EXIT_OFFSET == 32


def test_kvm_ioctl_numbers_are_the_kernels() -> None:
    # _IO/_IOR/_IOW/_IOWR(0xAE, nr, type) as the kernel encodes them
    assert llkvm.KVM_RUN == 0xAE80
    assert llkvm.KVM_CHECK_EXTENSION == 0xAE03
    assert llkvm.KVM_GET_REGS == 0x8090AE81
    assert llkvm.KVM_SET_REGS == 0x4090AE82
    assert llkvm.KVM_GET_SREGS == 0x8138AE83
    assert llkvm.KVM_TRANSLATE == 0xC018AE85
    assert llkvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert llkvm.KVM_IOEVENTFD == 0x4040AE79
    assert llkvm.KVM_IRQFD == 0x4020AE76
    assert llkvm.KVM_GET_CPUID2 == 0xC008AE91


def test_regs_round_trip_in_kernel_field_order() -> None:
    values = {name: (i + 1) * 0x1111 for i, name in enumerate(llkvm.REG_NAMES)}
    raw = llkvm.regs_to_bytes(values)
    assert struct.unpack("<18Q", raw) == tuple(values[n] for n in llkvm.REG_NAMES)
    assert llkvm.regs_from_bytes(raw) == values


def test_sregs_decode_segments_tables_and_control_registers() -> None:
    segment = struct.pack("<QIH8BBB", 0x1000, 0xFFFFF, 0x10, 11, 1, 0, 0, 1, 1, 1, 0, 0, 0)
    assert len(segment) == 24
    table = struct.pack("<QH3H", 0xFFFF_8000_0000_1000, 0x7F, 0, 0, 0)
    raw = segment * 8 + table * 2 + struct.pack("<7Q4Q", 1, 2, 0x104000, 4, 5, 0x500, 7, 0, 0, 0, 1)
    assert len(raw) == llkvm.SREGS_SIZE
    sregs = llkvm.sregs_from_bytes(raw)
    assert sregs["cs"]["selector"] == 0x10 and sregs["cs"]["l"] == 1 and sregs["cs"]["type"] == 11
    assert sregs["idt"] == {"base": 0xFFFF_8000_0000_1000, "limit": 0x7F}
    assert (sregs["cr0"], sregs["cr3"], sregs["efer"]) == (1, 0x104000, 0x500)
    assert sregs["interrupt_bitmap"] == [0, 0, 0, 1]


def test_memory_region_ioeventfd_irqfd_layouts() -> None:
    region = llkvm.memory_region(32763, llkvm.KVM_MEM_READONLY, 0x1_0000_0000, 0x10000, 0x7F00)
    assert struct.unpack("<IIQQQ", region) == (
        32763, llkvm.KVM_MEM_READONLY, 0x1_0000_0000, 0x10000, 0x7F00,
    )  # fmt: skip
    ev = llkvm.ioeventfd(0xD000_0000, 4, 17, llkvm.KVM_IOEVENTFD_FLAG_DATAMATCH, 0x42)
    assert struct.unpack_from("<QQIiI", ev) == (
        0x42, 0xD000_0000, 4, 17, llkvm.KVM_IOEVENTFD_FLAG_DATAMATCH,
    )  # fmt: skip
    irq = llkvm.irqfd(5, 20, llkvm.KVM_IRQFD_FLAG_RESAMPLE, 6)
    assert struct.unpack_from("<4I", irq) == (5, 20, llkvm.KVM_IRQFD_FLAG_RESAMPLE, 6)


def test_cpuid2_parsing_is_bounded_by_the_buffer() -> None:
    entry = struct.pack("<7I3I", 0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69, 0, 0, 0)
    raw = struct.pack("<II", 200, 0) + entry * 2  # claims 200 entries, carries 2
    entries = llkvm.cpuid2_from_bytes(raw)
    assert len(entries) == 2
    assert entries[0]["ebx"] == 0x756E6547


# ---- vCPU state decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer", "mode"),
    [
        (0x10, 0, 0, "real"),
        (0x11, 0, 0, "protected-no-paging"),
        (0x8000_0011, 0, 0, "32-bit"),
        (0x8000_0011, 0x20, 0, "pae"),
        (0x8000_0011, 0x20, 0x500, "4-level"),
        (0x8000_0011, 0x1020, 0x500, "5-level"),
    ],
)
def test_paging_mode(cr0: int, cr4: int, efer: int, mode: str) -> None:
    assert paging_mode(cr0, cr4, efer) == mode


def test_page_table_root_masks_flags_and_pcid() -> None:
    long_mode = (0x8000_0011, 0x20, 0x500)
    assert page_table_root(long_mode[0], 0x104018, long_mode[1], long_mode[2]) == 0x104000
    # PCID 0x5 in the low bits (CR4.PCIDE), and a bit above 52 set
    assert page_table_root(0x8000_0011, (1 << 60) | 0x2000_0005, 0x20020, 0x500) == 0x2000_0000
    assert page_table_root(0x8000_0011, 0x1234_5FE8, 0x20, 0) == 0x1234_5FE0  # PAE: 32-byte
    assert page_table_root(0x8000_0011, 0x1234_5FE8, 0, 0) == 0x1234_5000
    assert page_table_root(0x11, 0x1234_5000, 0, 0) is None


def test_privilege_level() -> None:
    assert privilege_level(0x10, 0x33, 0) == 0  # real mode: always 0
    assert privilege_level(0x11, 0x33, 0) == 3
    assert privilege_level(0x11, 0x08, 0) == 0
    assert privilege_level(0x11, 0x08, 1 << 17) == 3  # virtual-8086


# ---- discovery ----------------------------------------------------------------------------------

MAPS = """\
55d0c0000000-55d0c0100000 r-xp 00001000 fe:00 123   /usr/bin/qemu-system-x86_64
7f00000a0000-7f00000a3000 rw-s 00000000 00:10 12   anon_inode:kvm-vcpu:0
7f00000b0000-7f00000b3000 rw-s 00000000 00:10 12   anon_inode:kvm-vcpu:1
7f00000c0000-7f00000c2000 r-xp 00000000 00:00 0    [vdso]
7f00000d0000-7f00000d1000 rw-p 00000000 00:00 0
7f00000e0000-7f00000e1000 r--p 00000000 fe:00 9    /tmp/a file with spaces
"""


def test_parse_maps_keeps_paths_with_spaces_and_anonymous_lines() -> None:
    maps = parse_maps(MAPS)
    assert len(maps) == 6
    assert maps[0].perms == "r-xp" and maps[0].offset == 0x1000
    assert maps[4].path == ""
    assert maps[5].path == "/tmp/a file with spaces"
    assert maps[1].size == 0x3000


def test_handles_from_fd_links_and_maps() -> None:
    links = {
        0: "/dev/null",
        8: "/dev/kvm",
        9: "anon_inode:kvm-vm",
        14: "anon_inode:kvm-vcpu:0",
        15: "anon_inode:kvm-vcpu:1",
        16: "anon_inode:[eventfd]",
    }
    handles = handles_from(42, links, parse_maps(MAPS))
    assert (handles.vm_fd, handles.system_fd) == (9, 8)
    assert [(v.index, v.fd, v.kvm_run_size) for v in handles.vcpus] == [
        (0, 14, 0x3000),
        (1, 15, 0x3000),
    ]
    assert handles.vcpu(1).kvm_run_address == 0x7F00000B0000
    with pytest.raises(KeyError):
        handles.vcpu(2)


@pytest.mark.parametrize(
    "links",
    [
        {3: "/dev/kvm", 4: "anon_inode:[eventfd]"},  # no VM
        {3: "anon_inode:kvm-vm", 4: "anon_inode:kvm-vm"},  # two VMs
        {3: "anon_inode:kvm-vm", 4: "anon_inode:kvm-vcpu:0", 5: "anon_inode:kvm-vcpu:0"},
    ],
)
def test_handles_from_refuses_what_is_not_one_vm(links: dict[int, str]) -> None:
    with pytest.raises(NotAKvmHypervisor):
        handles_from(42, links, [])


def test_syscall_instruction_found_in_own_executable_memory() -> None:
    address = find_syscall_instruction(os.getpid())
    with open(f"/proc/{os.getpid()}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        assert mem.read(2) == b"\x0f\x05"
    with open("/proc/self/maps") as maps:
        vdso = next(m for m in parse_maps(maps.read()) if m.path == "[vdso]")
    assert vdso.start <= address < vdso.end  # the vDSO is preferred


# ---- the C loop serving trapped MMIO ----------------------------------------------------------

MSG = struct.Struct("<QQQIIii")  # struct dvs_hv_mmio_msg


@pytest.mark.timeout(30)
def test_mmio_bank_serves_reads_and_writes_over_a_socketpair() -> None:
    guardian_end, dvs_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop = os.eventfd(0, os.EFD_CLOEXEC)
    bank = MmioBank(0xC000_0000, 0x100)
    bank.view[0x10:0x14] = (0xCAFEBABE).to_bytes(4, "little")
    server = threading.Thread(target=bank.serve, args=(dvs_end.fileno(), stop))
    server.start()
    try:
        guardian_end.settimeout(10)

        def read(seq: int, gpa: int, length: int) -> int:
            guardian_end.send(MSG.pack(seq, gpa, 0, length, 0, 1, 0))
            reply = MSG.unpack(guardian_end.recv(MSG.size))
            assert reply[0] == seq and reply[1] == gpa
            value: int = reply[2]
            return value

        assert read(1, 0xC000_0010, 4) == 0xCAFEBABE
        assert read(2, 0xC000_0010, 2) == 0xBABE
        guardian_end.send(MSG.pack(3, 0xC000_0020, 0x1122334455667788, 8, 1, 1, 0))
        assert read(4, 0xC000_0020, 8) == 0x1122334455667788
        # outside the bank (below, above, straddling the end): all-ones, nothing stored
        assert read(5, 0xBFFF_FFF0, 4) == 0xFFFF_FFFF_FFFF_FFFF
        assert read(6, 0xC000_00FE, 4) == 0xFFFF_FFFF_FFFF_FFFF
        guardian_end.send(MSG.pack(7, 0xC000_0100, 0xAA, 1, 1, 1, 0))
        # malformed: a length the guest cannot produce, and a short message
        guardian_end.send(MSG.pack(8, 0xC000_0000, 0, 16, 0, 1, 0))
        guardian_end.send(b"short")
        assert read(9, 0xC000_0000, 1) == 0
        assert bytes(bank.view[0x20:0x28]) == (0x1122334455667788).to_bytes(8, "little")
        assert bank.reads == 6 and bank.writes == 2
        assert bank.outside == 5
        assert bank.last_write == (0xC000_0100, 0xAA)
    finally:
        os.eventfd_write(stop, 1)
        server.join(timeout=10)
        os.close(stop)
        guardian_end.close()
        dvs_end.close()
    assert not server.is_alive()
