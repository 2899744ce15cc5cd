/*
 * Entry of the minimal KVM guest: PVH boot, long-mode switch, interrupt stubs.
 *
 * Semantics relied on:
 *  - PVH direct boot (Xen's "HVM direct boot ABI", which QEMU's -kernel honours for an ELF with
 *    a XEN_ELFNOTE_PHYS32_ENTRY note): QEMU loads the ELF's PT_LOAD segments at their physical
 *    addresses, and its pvh.bin option ROM jumps to the note's address in 32-bit protected mode,
 *    paging off, CS a flat 32-bit code segment, DS/ES/SS flat data, EFLAGS.IF clear, EBX = GPA of
 *    the hvm_start_info. GDTR, IDTR and ESP are undefined: we load our own before using them.
 *    QEMU reads the note's descriptor as a u64 for an ELF64 and finds it at
 *    12 + align_up(namesz, p_align) bytes into the note, so the note segment is 4-aligned.
 *  - Long mode: CR4.PAE, CR3 = PML4, EFER.LME, then CR0.PG activates IA-32e mode; a far jump to a
 *    descriptor with L=1 enters 64-bit code. 2 MiB pages (PS in the page directory) need no PAE
 *    extension beyond that.
 *  - 64-bit interrupt delivery (no IST, same privilege): the CPU aligns RSP to 16 and pushes
 *    SS, RSP, RFLAGS, CS, RIP and, for some exceptions, an error code, on the current stack.
 *  - Under kvm-pvm every instruction the guest runs at CPL 0 is emulated by the host kernel.
 *    Everything used here was seen to work there: far jumps into long mode, LGDT/LIDT, MOV to
 *    CR0/CR3/CR4, WRMSR, REP STOS, INVLPG, port I/O, HLT, interrupt delivery and IRETQ
 *    (so NMIs are unblocked again after the handler).
 */
#include "guest_abi.h"

#define GDT_CODE64 0x08
#define GDT_DATA   0x10
#define GDT_CODE32 0x18

#define PTE_PRESENT  0x001
#define PTE_WRITABLE 0x002
#define PTE_LARGE    0x080 /* PS: 2 MiB page in a page-directory entry */

#define CR0_PG  0x80000000
#define CR0_WP  0x00010000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xC0000080
#define EFER_LME 0x00000100

/* ---- the PVH note (type 18 = XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen") ---- */
	.section .note.pvh, "a"
	.balign 4
	.long 4                 /* namesz: "Xen\0" */
	.long 8                 /* descsz: QEMU reads a u64 from an ELF64 note */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.quad pvh_entry32

/* ---- 32-bit entry ---- */
	.section .text.entry32, "ax"
	.code32
	.globl pvh_entry32
pvh_entry32:
	cli
	cld
	movl %ebx, %esi                 /* keep the hvm_start_info GPA for dvs_guest_main */
	lgdt gdt_descriptor
	ljmp $GDT_CODE32, $1f           /* our own flat CS before touching any segment */
1:	movw $GDT_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl $boot_stack_top, %esp

	/* Page tables live in .bss; do not trust the loader to have zeroed them. */
	movl $page_tables_start, %edi
	movl $(page_tables_end - page_tables_start) / 4, %ecx
	xorl %eax, %eax
	rep stosl

	/* PML4[0] -> the low PDPT (identity 0-4 GiB), PML4[1] -> the window PDPT (VA 512 GiB). */
	movl $pdpt_low + (PTE_PRESENT | PTE_WRITABLE), pml4
	movl $pdpt_window + (PTE_PRESENT | PTE_WRITABLE), pml4 + 8
	movl $dvs_guest_window_pd + (PTE_PRESENT | PTE_WRITABLE), pdpt_window

	/* Low PDPT entries 0..3 -> the four page directories that follow each other in .bss. */
	movl $pdpt_low, %edi
	movl $pd_low + (PTE_PRESENT | PTE_WRITABLE), %eax
	movl $4, %ecx
2:	movl %eax, (%edi)
	addl $8, %edi
	addl $4096, %eax
	loop 2b

	/* 2048 2 MiB pages: entry j maps GPA j << 21 (all below 4 GiB: high dwords stay 0). */
	movl $pd_low, %edi
	movl $(PTE_PRESENT | PTE_WRITABLE | PTE_LARGE), %eax
	movl $2048, %ecx
3:	movl %eax, (%edi)
	addl $8, %edi
	addl $0x200000, %eax
	loop 3b

	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_WP), %eax
	movl %eax, %cr0
	ljmp $GDT_CODE64, $entry64

/* ---- 64-bit entry ---- */
	.code64
entry64:
	movw $GDT_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movq $boot_stack_top, %rsp
	movl %esi, %edi                 /* arg 0: hvm_start_info GPA (zero-extended) */
	call dvs_guest_main
4:	cli                             /* dvs_guest_main never returns; be safe if it does */
	hlt
	jmp 4b

/*
 * Where a host that rewrites the vCPU's RIP should send it (DVS_GUEST_DIVERT_ENTRY, placed by
 * guest.ld). Only RIP is trusted: RSP may point anywhere, so take the boot stack afresh (the
 * main loop never returns, nothing on the old stack is needed) and clear DF for C.
 */
	.section .text.divert, "ax"
	.globl dvs_guest_divert_entry
dvs_guest_divert_entry:
	cld
	movq $boot_stack_top, %rsp
	call dvs_guest_diverted
5:	cli
	hlt
	jmp 5b

	.text
/*
 * One stub per vector. Vectors 8, 10-14, 17, 21, 29 and 30 come with a CPU-pushed error code
 * (bit n of ERROR_CODE_VECTORS); the others push a 0 so every frame has the same shape
 * (struct interrupt_frame in guest.c).
 */
#define ERROR_CODE_VECTORS 0x60227D00
	.macro interrupt_stub vector
	.balign 16
interrupt_stub_\vector:
	.if \vector >= 32
	pushq $0
	.elseif ((ERROR_CODE_VECTORS >> \vector) & 1) == 0
	pushq $0
	.endif
	pushq $\vector
	jmp interrupt_common
	.endm

	.altmacro
	.macro stub_address vector
	.quad interrupt_stub_\vector
	.endm

	.set vector, 0
	.rept 256
	interrupt_stub %vector
	.set vector, vector + 1
	.endr

interrupt_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi                 /* 40 + 16 + 120 bytes pushed: RSP is 16-aligned here */
	cld
	call dvs_guest_interrupt
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp                  /* vector and error code */
	iretq

/* ---- data ---- */
	.section .rodata
	.balign 8
	.globl dvs_guest_interrupt_stubs
dvs_guest_interrupt_stubs:
	.set vector, 0
	.rept 256
	stub_address %vector
	.set vector, vector + 1
	.endr

	.balign 8
gdt:
	.quad 0                         /* null */
	.quad 0x00209A0000000000        /* 0x08: 64-bit code, DPL 0 (L=1, P, S, type execute/read) */
	.quad 0x00CF92000000FFFF        /* 0x10: flat 4 GiB data, read/write */
	.quad 0x00CF9A000000FFFF        /* 0x18: flat 4 GiB 32-bit code */
gdt_end:
gdt_descriptor:
	.word gdt_end - gdt - 1
	.quad gdt                       /* lgdt in 32-bit mode reads only 4 bytes of base: fine */

	.section .bss
	.balign 4096
page_tables_start:
pml4:           .skip 4096
pdpt_low:       .skip 4096
pdpt_window:    .skip 4096
	.globl dvs_guest_window_pd
dvs_guest_window_pd: .skip 4096
pd_low:         .skip 4 * 4096
page_tables_end:

	.balign 16
boot_stack:     .skip 16384
boot_stack_top:
