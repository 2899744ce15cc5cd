/*
 * kvm_abi.c -- compile-time proof that the dvs_kvm_* mirrors in kvm_abi.h have the kernel's
 * layout (linux/kvm.h of the build host; the KVM UAPI is append-only, so the layout holds
 * for every newer kernel too). Nothing here runs.
 */
#include <stddef.h>

#include "kvm/kvm_abi.h"

#define SAME_SIZE(ours, theirs) _Static_assert(sizeof(struct ours) == sizeof(struct theirs), \
					       #ours " differs in size from " #theirs)
#define SAME_FIELD(ours, theirs, field)                                                       \
	_Static_assert(offsetof(struct ours, field) == offsetof(struct theirs, field),       \
		       #ours "." #field " is at another offset than in " #theirs)

SAME_SIZE(dvs_kvm_regs, kvm_regs);
SAME_FIELD(dvs_kvm_regs, kvm_regs, rax);
SAME_FIELD(dvs_kvm_regs, kvm_regs, r15);
SAME_FIELD(dvs_kvm_regs, kvm_regs, rip);
SAME_FIELD(dvs_kvm_regs, kvm_regs, rflags);

SAME_SIZE(dvs_kvm_segment, kvm_segment);
SAME_FIELD(dvs_kvm_segment, kvm_segment, selector);
SAME_FIELD(dvs_kvm_segment, kvm_segment, type);
SAME_FIELD(dvs_kvm_segment, kvm_segment, dpl);
SAME_FIELD(dvs_kvm_segment, kvm_segment, l);
SAME_FIELD(dvs_kvm_segment, kvm_segment, unusable);
SAME_SIZE(dvs_kvm_dtable, kvm_dtable);
SAME_SIZE(dvs_kvm_sregs, kvm_sregs);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, tr);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, gdt);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, cr0);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, cr3);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, efer);
SAME_FIELD(dvs_kvm_sregs, kvm_sregs, interrupt_bitmap);

SAME_SIZE(dvs_kvm_translation, kvm_translation);
SAME_FIELD(dvs_kvm_translation, kvm_translation, valid);
SAME_FIELD(dvs_kvm_translation, kvm_translation, usermode);

SAME_SIZE(dvs_kvm_cpuid_entry2, kvm_cpuid_entry2);
SAME_FIELD(dvs_kvm_cpuid_entry2, kvm_cpuid_entry2, edx);
SAME_FIELD(dvs_kvm_cpuid2, kvm_cpuid2, entries);

SAME_SIZE(dvs_kvm_userspace_memory_region, kvm_userspace_memory_region);
SAME_FIELD(dvs_kvm_userspace_memory_region, kvm_userspace_memory_region, guest_phys_addr);
SAME_FIELD(dvs_kvm_userspace_memory_region, kvm_userspace_memory_region, userspace_addr);

SAME_SIZE(dvs_kvm_ioeventfd, kvm_ioeventfd);
SAME_FIELD(dvs_kvm_ioeventfd, kvm_ioeventfd, fd);
SAME_FIELD(dvs_kvm_ioeventfd, kvm_ioeventfd, flags);

SAME_SIZE(dvs_kvm_irqfd, kvm_irqfd);
SAME_FIELD(dvs_kvm_irqfd, kvm_irqfd, resamplefd);

#define SAME_RUN_FIELD(ours, theirs)                                                         \
	_Static_assert(offsetof(struct dvs_kvm_run_head, ours) == offsetof(struct kvm_run, theirs), \
		       "dvs_kvm_run_head." #ours " is at another offset than kvm_run." #theirs)
SAME_RUN_FIELD(exit_reason, exit_reason);
SAME_RUN_FIELD(cr8, cr8);
SAME_RUN_FIELD(exit, mmio);
SAME_RUN_FIELD(exit.mmio.phys_addr, mmio.phys_addr);
SAME_RUN_FIELD(exit.mmio.data, mmio.data);
SAME_RUN_FIELD(exit.mmio.len, mmio.len);
SAME_RUN_FIELD(exit.mmio.is_write, mmio.is_write);
SAME_RUN_FIELD(exit.io.port, io.port);
SAME_RUN_FIELD(exit.io.data_offset, io.data_offset);
_Static_assert(DVS_KVM_RUN_EXIT_REASON_OFFSET == offsetof(struct kvm_run, exit_reason),
	       "exit_reason offset");
_Static_assert(DVS_KVM_RUN_EXIT_OFFSET == offsetof(struct kvm_run, mmio), "exit union offset");
_Static_assert(DVS_KVM_MAX_CPUID_ENTRIES == 256, "cpuid2 entries array size");
