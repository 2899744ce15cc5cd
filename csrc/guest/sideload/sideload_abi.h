/*
 * sideload_abi.h -- the data page shared by the host (dvs/vm/sideload.py) and the side-loaded
 * payload. The host fills it before arming the redirect; the payload updates `calls` and
 * `state`; the host polls them with process_vm_readv. Layout is fixed (little-endian, packed by
 * construction: every field naturally aligned) and mirrored in sideload.py.
 */
#ifndef DVS_SIDELOAD_ABI_H
#define DVS_SIDELOAD_ABI_H

#include <stdint.h>

#define SIDELOAD_MAGIC 0x64766d736c6f6164ULL /* "daolsmvd" */

enum sideload_state {
	SIDELOAD_ARMED = 0,   /* host armed the redirect; payload not entered yet */
	SIDELOAD_ENTERED = 1, /* first entry: slot restored, printk running */
	SIDELOAD_DONE = 2,    /* printk returned; only the exit sequence remains */
};

struct sideload_args {
	uint64_t magic;      /* 0x00 SIDELOAD_MAGIC */
	uint64_t printk;     /* 0x08 address of _printk (or printk) */
	uint64_t slot;       /* 0x10 address of the function pointer we redirected */
	uint64_t original;   /* 0x18 its original value (we jump there afterwards) */
	uint64_t redirected; /* 0x20 the value the host wrote into the slot */
	uint32_t state;      /* 0x28 enum sideload_state */
	uint32_t calls;      /* 0x2c how often the entry ran (must end as 1) */
	uint64_t restored;   /* 0x30 1 if the payload's compare-and-swap restored the slot */
	char format[64];     /* 0x38 printk format, e.g. "\0016dvs-sideload: %s\n" */
	char marker[128];    /* 0x78 the marker text */
};

#endif
