/*
 * guestmem.c -- bounded access to guest-physical memory (see guestmem.h).
 *
 * Lookups are a binary search over at most 64 sorted regions. Ranges are split at region
 * boundaries, because adjacent guest-physical regions need not be adjacent in the host
 * (QEMU splits RAM around the PCI hole and ROM areas). The remote backend gathers the
 * pieces of a whole batch into one process_vm_readv/writev where it can.
 */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#include "guestmem/guestmem.h"
#include "sys/sys.h"

int dvs_guest_mem_init(struct dvs_guest_mem *mem, int32_t pid,
		       const struct dvs_guest_region *regions, uint32_t n_regions)
{
	if (pid < 0 || n_regions > DVS_GUEST_MAX_REGIONS)
		return -EINVAL;
	for (uint32_t i = 0; i < n_regions; i++) {
		const struct dvs_guest_region *r = &regions[i];
		if (r->size == 0 || r->gpa + r->size < r->gpa || r->hva + r->size < r->hva)
			return -EINVAL;
		if (i && regions[i - 1].gpa + regions[i - 1].size > r->gpa)
			return -EINVAL; /* unsorted or overlapping */
	}
	memset(mem, 0, sizeof(*mem));
	mem->pid = pid;
	mem->n_regions = n_regions;
	memcpy(mem->regions, regions, n_regions * sizeof(*regions));
	return 0;
}

/* Index of the region containing gpa, or -1. */
static int find_region(const struct dvs_guest_mem *mem, uint64_t gpa)
{
	uint32_t lo = 0, hi = mem->n_regions;
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		const struct dvs_guest_region *r = &mem->regions[mid];
		if (gpa < r->gpa)
			hi = mid;
		else if (gpa - r->gpa >= r->size)
			lo = mid + 1;
		else
			return (int)mid;
	}
	return -1;
}

int dvs_guest_mem_contains(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	if (gpa + len < gpa)
		return 0;
	while (len) {
		int i = find_region(mem, gpa);
		if (i < 0)
			return 0;
		const struct dvs_guest_region *r = &mem->regions[i];
		uint64_t avail = r->size - (gpa - r->gpa);
		uint64_t step = len < avail ? len : avail;
		gpa += step;
		len -= step;
	}
	return 1;
}

void *dvs_guest_mem_local_ptr(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len)
{
	if (mem->pid != 0)
		return NULL;
	int i = find_region(mem, gpa);
	if (i < 0)
		return NULL;
	const struct dvs_guest_region *r = &mem->regions[i];
	if (len > r->size - (gpa - r->gpa))
		return NULL;
	return (void *)(uintptr_t)(r->hva + (gpa - r->gpa));
}

int dvs_guest_mem_iov(const struct dvs_guest_mem *mem, uint64_t gpa, uint64_t len,
		      struct iovec *iov, uint32_t max_iov)
{
	if (mem->pid != 0)
		return -EOPNOTSUPP;
	if (!dvs_guest_mem_contains(mem, gpa, len))
		return -EFAULT;
	uint32_t n = 0;
	while (len) {
		const struct dvs_guest_region *r = &mem->regions[find_region(mem, gpa)];
		uint64_t avail = r->size - (gpa - r->gpa);
		uint64_t step = len < avail ? len : avail;
		if (n == max_iov)
			return -E2BIG;
		iov[n].iov_base = (void *)(uintptr_t)(r->hva + (gpa - r->gpa));
		iov[n].iov_len = step;
		n++;
		gpa += step;
		len -= step;
	}
	return (int)n;
}

#define SEG_BATCH 64

int dvs_guest_mem_rw(const struct dvs_guest_mem *mem, int write,
		     const struct dvs_guest_xfer *xfers, uint32_t n_xfers)
{
	for (uint32_t i = 0; i < n_xfers; i++)
		if (!dvs_guest_mem_contains(mem, xfers[i].gpa, xfers[i].len))
			return -EFAULT;

	struct dvs_mem_seg segs[SEG_BATCH];
	uint32_t n_segs = 0;
	uint64_t pending = 0;
	for (uint32_t i = 0; i < n_xfers; i++) {
		uint64_t gpa = xfers[i].gpa, local = xfers[i].local, len = xfers[i].len;
		while (len) {
			const struct dvs_guest_region *r = &mem->regions[find_region(mem, gpa)];
			uint64_t avail = r->size - (gpa - r->gpa);
			uint64_t step = len < avail ? len : avail;
			uint64_t hva = r->hva + (gpa - r->gpa);
			if (mem->pid == 0) {
				void *guest = (void *)(uintptr_t)hva, *buf = (void *)(uintptr_t)local;
				if (write)
					memcpy(guest, buf, step);
				else
					memcpy(buf, guest, step);
			} else {
				segs[n_segs++] = (struct dvs_mem_seg){ local, hva, step };
				pending += step;
				if (n_segs == SEG_BATCH) {
					int64_t moved = dvs_process_vm_rw(mem->pid, write, segs, n_segs);
					if (moved < 0)
						return (int)moved;
					if ((uint64_t)moved != pending)
						return -EFAULT;
					n_segs = 0;
					pending = 0;
				}
			}
			gpa += step;
			local += step;
			len -= step;
		}
	}
	if (n_segs) {
		int64_t moved = dvs_process_vm_rw(mem->pid, write, segs, n_segs);
		if (moved < 0)
			return (int)moved;
		if ((uint64_t)moved != pending)
			return -EFAULT; /* the hypervisor unmapped part of its RAM */
	}
	return 0;
}

int dvs_guest_mem_read(const struct dvs_guest_mem *mem, uint64_t gpa, void *dst, uint64_t len)
{
	struct dvs_guest_xfer x = { gpa, (uint64_t)(uintptr_t)dst, len };
	return dvs_guest_mem_rw(mem, 0, &x, 1);
}

int dvs_guest_mem_write(const struct dvs_guest_mem *mem, uint64_t gpa, const void *src,
			uint64_t len)
{
	struct dvs_guest_xfer x = { gpa, (uint64_t)(uintptr_t)src, len };
	return dvs_guest_mem_rw(mem, 1, &x, 1);
}
