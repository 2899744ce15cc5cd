/*
 * payload.c -- a position-independent payload the host side-loads into a running Linux guest
 * and makes the guest kernel execute exactly once (dvs/vm/sideload.py explains the mechanism).
 *
 * Semantics relied on:
 *  - We are entered through a function pointer that the kernel re-reads on every call (a
 *    work_struct's `func`). Restoring that pointer first, with a compare-and-swap from the
 *    value the host wrote to the original one, guarantees no second entry through it; the
 *    `state` compare-and-swap guarantees printk runs once even if two CPUs raced in.
 *  - Kernel functions are called through addresses the host resolved from the guest's own
 *    symbol tables and wrote into `sideload_args` (an import table), so there are no
 *    relocations: everything is RIP-relative inside our pages.
 *  - Built freestanding, -fPIC -mno-red-zone -mgeneral-regs-only -fno-stack-protector
 *    -fcf-protection=branch (ENDBR64 at every indirect-call target, for IBT kernels).
 */
#include "sideload_abi.h"

__attribute__((visibility("hidden"), section(".data.args")))
struct sideload_args sideload_args = { .magic = SIDELOAD_MAGIC };

typedef int (*printk_fn)(const char *fmt, ...);

void sideload_main(void *arg);

__attribute__((used, visibility("hidden"))) void sideload_main(void *arg)
{
	struct sideload_args *a = &sideload_args;
	(void)arg;
	__atomic_fetch_add(&a->calls, 1, __ATOMIC_SEQ_CST);
	uint64_t expected = a->redirected;
	if (__atomic_compare_exchange_n((uint64_t *)a->slot, &expected, a->original, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		__atomic_store_n(&a->restored, 1, __ATOMIC_SEQ_CST);
	uint32_t armed = SIDELOAD_ARMED;
	if (!__atomic_compare_exchange_n(&a->state, &armed, SIDELOAD_ENTERED, 0, __ATOMIC_SEQ_CST,
					 __ATOMIC_SEQ_CST))
		return;
	((printk_fn)a->printk)(a->format, a->marker);
	__atomic_store_n(&a->state, SIDELOAD_DONE, __ATOMIC_SEQ_CST);
}
