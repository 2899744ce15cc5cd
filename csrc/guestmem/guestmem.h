/*
 * guestmem.h -- guest-physical memory as seen from the host: the one interface that the
 * virtqueue walker, the virtio devices and VM introspection share.
 *
 * A guest's RAM is a set of regions [gpa, gpa+size) backed by host virtual memory at hva.
 * Two backends, chosen by pid:
 *  - pid == 0, "local": hva are addresses in *this* process -- a test buffer, or guest RAM
 *    shared with us (vhost-user passes the guest's memfd, which we mmap).
 *  - pid > 0, "remote": hva are addresses in the hypervisor process pid (QEMU's anonymous
 *    RAM mapping); transfers use process_vm_readv/writev, batched.
 * Every guest-physical range is checked against the regions before any byte moves: a range
 * that is not entirely inside guest RAM fails with -EFAULT and moves nothing. Guest memory is
 * shared with a running guest, so callers must not assume two reads see the same bytes;
 * copy what you validate, then use the copy.
 */
#ifndef DVS_GUESTMEM_H
#define DVS_GUESTMEM_H

#include <stdint.h>

/* cffi:begin */
#define DVS_GUEST_MAX_REGIONS 64

struct dvs_guest_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t hva;
};

struct dvs_guest_mem {
	int32_t pid; /* 0: local backend; > 0: remote process */
	uint32_t n_regions;
	struct dvs_guest_region regions[64]; /* DVS_GUEST_MAX_REGIONS; sorted by gpa, disjoint */
};

/* One copy between a local buffer and guest-physical memory. */
struct dvs_guest_xfer {
	uint64_t gpa;
	uint64_t local;
	uint64_t len;
};

/* Validate and store the region table (sorted by gpa, disjoint, no wrap-around). */
int dvs_guest_mem_init(struct dvs_guest_mem *mem, int32_t pid,
		       const struct dvs_guest_region *regions, uint32_t n_regions);

/* Copy a batch in one direction (write != 0: local -> guest). All ranges are checked first;
 * -EFAULT if any lies (partly) outside guest RAM, then nothing is copied. */
int dvs_guest_mem_rw(const struct dvs_guest_mem *mem, int write,
		     const struct dvs_guest_xfer *xfers, uint32_t n_xfers);
/* cffi:end */

/* C-only helpers for the walker and devices. */
/* 1 if [gpa, gpa+len) lies inside guest RAM (may span adjacent regions). */
int dvs_guest_mem_contains(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len);
/* Local backend: a host pointer to [gpa, gpa+len) when it lies inside ONE region; NULL
 * otherwise (remote backend, outside RAM, or straddling regions). */
void *dvs_guest_mem_local_ptr(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len);
/* Local backend: describe [gpa, gpa+len) as host iovecs (split at region boundaries) for
 * zero-copy preadv/pwritev/readv into guest RAM. Returns the number of iovecs used, -EFAULT
 * if the range leaves guest RAM, -E2BIG if more than max_iov are needed, -EOPNOTSUPP for the
 * remote backend (the caller copies through a bounce buffer instead). */
struct iovec;
int dvs_guest_mem_iov(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len,
		      struct iovec *iov, uint32_t max_iov);
int dvs_guest_mem_read(const struct dvs_guest_mem *mem, uint64_t gpa, void *dst, uint64_t len);
int dvs_guest_mem_write(const struct dvs_guest_mem *mem, uint64_t gpa, const void *src,
			uint64_t len);

#endif
