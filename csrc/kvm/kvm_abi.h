/*
 * kvm_abi.h -- the KVM structures and ioctl numbers dvs uses from outside a hypervisor.
 *
 * KVM's UAPI (linux/kvm.h, x86-64) is stable: structure layouts and ioctl numbers never change
 * once released. The structures are mirrored here with fixed-width types under dvs_kvm_* names
 * so that cffi (which cannot parse linux/kvm.h) knows their exact layout and Python packs and
 * unpacks them through cffi instead of hand-written struct formats; kvm_abi.c checks every
 * size and field offset against the kernel header at compile time, so a mismatch cannot build.
 *
 * The ioctls themselves run inside the hypervisor process (syscall injection, csrc/ptrace/):
 * KVM refuses VM and vCPU ioctls from any process whose mm is not the VM creator's (they fail
 * with EIO), so these structures travel through the injection scratch buffer.
 */
#ifndef DVS_KVM_ABI_H
#define DVS_KVM_ABI_H

#include <stdint.h>
#include <linux/kvm.h>

/* cffi:begin */
/* cffi:constants
   KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_VCPU_MMAP_SIZE KVM_CHECK_EXTENSION KVM_RUN
   KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_TRANSLATE KVM_GET_CPUID2
   KVM_SET_USER_MEMORY_REGION KVM_IOEVENTFD KVM_IRQFD
   KVM_CAP_NR_MEMSLOTS KVM_CAP_IOEVENTFD KVM_CAP_IRQFD KVM_CAP_IRQFD_RESAMPLE KVM_CAP_NR_VCPUS
   KVM_CAP_MAX_VCPUS KVM_CAP_USER_MEMORY KVM_CAP_IOEVENTFD_ANY_LENGTH KVM_CAP_READONLY_MEM
   KVM_CAP_EXT_CPUID KVM_CAP_IMMEDIATE_EXIT KVM_CAP_IRQCHIP
   KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
   KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
   KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
   KVM_EXIT_UNKNOWN KVM_EXIT_IO KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_SHUTDOWN
   KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
*/
#define DVS_KVM_MAX_CPUID_ENTRIES 256

struct dvs_kvm_regs {
	uint64_t rax, rbx, rcx, rdx;
	uint64_t rsi, rdi, rsp, rbp;
	uint64_t r8, r9, r10, r11;
	uint64_t r12, r13, r14, r15;
	uint64_t rip, rflags;
};

struct dvs_kvm_segment {
	uint64_t base;
	uint32_t limit;
	uint16_t selector;
	uint8_t type;
	uint8_t present, dpl, db, s, l, g, avl;
	uint8_t unusable;
	uint8_t padding;
};

struct dvs_kvm_dtable {
	uint64_t base;
	uint16_t limit;
	uint16_t padding[3];
};

struct dvs_kvm_sregs {
	struct dvs_kvm_segment cs, ds, es, fs, gs, ss;
	struct dvs_kvm_segment tr, ldt;
	struct dvs_kvm_dtable gdt, idt;
	uint64_t cr0, cr2, cr3, cr4, cr8;
	uint64_t efer;
	uint64_t apic_base;
	uint64_t interrupt_bitmap[4];
};

struct dvs_kvm_translation {
	uint64_t linear_address;
	uint64_t physical_address;
	uint8_t valid;
	uint8_t writeable;
	uint8_t usermode;
	uint8_t pad[5];
};

struct dvs_kvm_cpuid_entry2 {
	uint32_t function;
	uint32_t index;
	uint32_t flags;
	uint32_t eax, ebx, ecx, edx;
	uint32_t padding[3];
};

struct dvs_kvm_cpuid2 {
	uint32_t nent;
	uint32_t padding;
	struct dvs_kvm_cpuid_entry2 entries[256]; /* DVS_KVM_MAX_CPUID_ENTRIES */
};

struct dvs_kvm_userspace_memory_region {
	uint32_t slot;
	uint32_t flags;
	uint64_t guest_phys_addr;
	uint64_t memory_size;
	uint64_t userspace_addr;
};

struct dvs_kvm_ioeventfd {
	uint64_t datamatch;
	uint64_t addr;
	uint32_t len;
	int32_t fd;
	uint32_t flags;
	uint8_t pad[36];
};

struct dvs_kvm_irqfd {
	uint32_t fd;
	uint32_t gsi;
	uint32_t flags;
	uint32_t resamplefd;
	uint8_t pad[16];
};

/* The head of struct kvm_run (the page a vCPU fd maps at offset 0) and the MMIO exit. */
struct dvs_kvm_run_mmio {
	uint64_t phys_addr;
	uint8_t data[8];
	uint32_t len;
	uint8_t is_write;
};

struct dvs_kvm_run_io {
	uint8_t direction;
	uint8_t size;
	uint16_t port;
	uint32_t count;
	uint64_t data_offset;
};

struct dvs_kvm_run_head {
	uint8_t request_interrupt_window;
	uint8_t immediate_exit;
	uint8_t padding1[6];
	uint32_t exit_reason;
	uint8_t ready_for_interrupt_injection;
	uint8_t if_flag;
	uint16_t flags;
	uint64_t cr8;
	uint64_t apic_base;
	union {
		struct dvs_kvm_run_mmio mmio;
		struct dvs_kvm_run_io io;
		uint8_t raw[256];
	} exit;
};

/* Offsets the Python side needs to read a kvm_run page without the full structure. */
#define DVS_KVM_RUN_EXIT_REASON_OFFSET 8
#define DVS_KVM_RUN_EXIT_OFFSET 32
/* cffi:end */

#endif /* DVS_KVM_ABI_H */
