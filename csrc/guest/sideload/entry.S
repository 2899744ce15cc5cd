/*
 * entry.S -- where the redirected kernel call lands (see payload.c and dvs/vm/sideload.py).
 *
 * The kernel calls the redirected function pointer like the original one: `void fn(void *arg)`
 * from a kworker (process context, interrupts on, no locks held), argument in %rdi. We keep
 * %rdi for the original function, run the C part, then tail-jump to the original so the
 * kernel's work continues as if nothing happened (it re-queues itself). The kernel is built
 * without a red zone and we do not rely on 16-byte stack alignment (no SSE: -mgeneral-regs-only).
 */
	.section .text.entry, "ax"
	.globl sideload_entry
	.type sideload_entry, @function
sideload_entry:
	endbr64
	pushq %rdi
	call sideload_main
	popq %rdi
	jmp *sideload_args+0x18(%rip)	/* args.original */
	.size sideload_entry, . - sideload_entry
	.section .note.GNU-stack, "", @progbits
