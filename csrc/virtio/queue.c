/*
 * queue.c -- split-virtqueue walker, device side (virtio 1.2 §2.7; see virtqueue.h).
 *
 * Memory ordering (§2.7.13, §2.7.14, §2.7.7-2.7.10). The driver runs concurrently on another
 * CPU (a vCPU thread of the hypervisor). Three orderings matter on the device side:
 *   1. acquire after reading avail->idx: the ring entries and descriptors it publishes are
 *      read only after the index (pairs with the driver's barrier before its idx store);
 *   2. release before storing used->idx: the used elements and the data written into the
 *      buffers become visible before the index that publishes them;
 *   3. a full barrier between a store and a later load of the other side's field: storing
 *      used->idx then reading used_event/flags, and storing avail_event/flags then
 *      re-reading avail->idx. Without it either side can miss a notification.
 * With the remote backend every access is a process_vm_readv/writev system call, which the
 * kernel completes before returning; the fences still order this thread's accesses.
 *
 * Every guest value is copied into a local before it is checked and used: the guest may
 * change guest memory at any time, so a value is never read twice.
 */
#include <endian.h>
#include <errno.h>
#include <stdatomic.h>
#include <string.h>

#include "virtio/virtqueue.h"

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

static const char *const rule_names[DVS_VQ_RULE_MAX] = {
	[DVS_VQ_OK] = "none",
	[DVS_VQ_ERR_QUEUE_SIZE] = "queue size is not a power of two in 1..32768",
	[DVS_VQ_ERR_RING_ALIGNMENT] =
		"ring area misaligned (descriptor table 16, available ring 2, used ring 4 bytes)",
	[DVS_VQ_ERR_RING_OUTSIDE_MEMORY] = "ring area lies outside guest RAM",
	[DVS_VQ_ERR_AVAIL_IDX_AHEAD] =
		"available index is more than the queue size ahead of the device",
	[DVS_VQ_ERR_HEAD_OUT_OF_RANGE] = "available ring names a descriptor beyond the table",
	[DVS_VQ_ERR_HEAD_IN_FLIGHT] =
		"descriptor head made available again while the device owns it",
	[DVS_VQ_ERR_NEXT_OUT_OF_RANGE] = "next index beyond the descriptor table",
	[DVS_VQ_ERR_CHAIN_TOO_LONG] = "descriptor chain longer than the queue size (loop)",
	[DVS_VQ_ERR_CHAIN_OVER_DEVICE_LIMIT] =
		"descriptor chain has more segments than the device accepts",
	[DVS_VQ_ERR_CHAIN_BYTES] = "descriptor chain longer than 2^32 bytes in total",
	[DVS_VQ_ERR_BUFFER_OUTSIDE_MEMORY] = "buffer lies outside guest RAM",
	[DVS_VQ_ERR_READABLE_AFTER_WRITABLE] =
		"device-readable descriptor after a device-writable one",
	[DVS_VQ_ERR_INDIRECT_NOT_NEGOTIATED] =
		"indirect descriptor without VIRTIO_F_INDIRECT_DESC",
	[DVS_VQ_ERR_INDIRECT_WITH_NEXT] = "descriptor has both INDIRECT and NEXT set",
	[DVS_VQ_ERR_INDIRECT_NESTED] = "indirect descriptor inside an indirect table",
	[DVS_VQ_ERR_INDIRECT_LENGTH] = "indirect table length is zero or not a multiple of 16",
	[DVS_VQ_ERR_INDIRECT_OUTSIDE_MEMORY] = "indirect table lies outside guest RAM",
	[DVS_VQ_ERR_CONSOLE_RX_READABLE] = "console receive buffer is device-readable",
	[DVS_VQ_ERR_CONSOLE_TX_WRITABLE] = "console transmit buffer is device-writable",
};

const char *dvs_vq_rule_name(uint32_t rule)
{
	if (rule >= DVS_VQ_RULE_MAX || rule_names[rule] == NULL)
		return "unknown rule";
	return rule_names[rule];
}

static int fail(struct dvs_vq *vq, uint32_t rule, uint64_t detail)
{
	if (vq->rule == DVS_VQ_OK) { /* keep the first rule broken: later ones follow from it */
		vq->rule = rule;
		vq->rule_detail = detail;
	}
	return -EPROTO;
}

uint32_t dvs_vq_device_status(uint32_t status, struct dvs_vq *const *queues, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (queues[i]->rule != DVS_VQ_OK)
			return status | DVS_VIRTIO_STATUS_NEEDS_RESET;
	return status;
}

int dvs_vq_fail(struct dvs_vq *vq, uint32_t rule, uint64_t detail)
{
	if (rule == DVS_VQ_OK || rule >= DVS_VQ_RULE_MAX)
		return -EINVAL;
	return fail(vq, rule, detail);
}

/* --- 16- and 32-bit fields of the rings ------------------------------------------------- */

static int load16(const struct dvs_guest_mem *mem, uint64_t hva, uint64_t gpa, uint16_t *out)
{
	uint16_t raw;
	if (hva) {
		/* single-copy atomic: the driver may be storing this field right now */
		raw = __atomic_load_n((const uint16_t *)(uintptr_t)hva, __ATOMIC_RELAXED);
	} else {
		int err = dvs_guest_mem_read(mem, gpa, &raw, sizeof(raw));
		if (err)
			return err;
	}
	*out = le16toh(raw);
	return 0;
}

static int store16(const struct dvs_guest_mem *mem, uint64_t hva, uint64_t gpa, uint16_t value)
{
	uint16_t raw = htole16(value);
	if (hva) {
		__atomic_store_n((uint16_t *)(uintptr_t)hva, raw, __ATOMIC_RELAXED);
		return 0;
	}
	return dvs_guest_mem_write(mem, gpa, &raw, sizeof(raw));
}

static int read_desc(const struct dvs_guest_mem *mem, uint64_t table_hva, uint64_t table_gpa,
		     uint32_t index, struct desc *out)
{
	uint8_t raw[16];
	if (table_hva) {
		memcpy(raw, (const void *)(uintptr_t)(table_hva + 16ull * index), sizeof(raw));
	} else {
		int err = dvs_guest_mem_read(mem, table_gpa + 16ull * index, raw, sizeof(raw));
		if (err)
			return err;
	}
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
	memcpy(&addr, raw, 8);
	memcpy(&len, raw + 8, 4);
	memcpy(&flags, raw + 12, 2);
	memcpy(&next, raw + 14, 2);
	out->addr = le64toh(addr);
	out->len = le32toh(len);
	out->flags = le16toh(flags);
	out->next = le16toh(next);
	return 0;
}

/* --- set-up --------------------------------------------------------------------------- */

static uint64_t avail_bytes(uint16_t size) { return 6 + 2ull * size; }
static uint64_t used_bytes(uint16_t size) { return 6 + 8ull * size; }

int dvs_vq_init(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		const struct dvs_vq_config *cfg)
{
	if (cfg->max_segs == 0 || cfg->max_segs > DVS_VQ_MAX_SEGS)
		return -EINVAL;
	memset(vq, 0, sizeof(*vq));
	vq->max_segs = cfg->max_segs;
	uint32_t size = cfg->size;
	if (size == 0 || size > DVS_VQ_MAX_SIZE || (size & (size - 1)))
		return fail(vq, DVS_VQ_ERR_QUEUE_SIZE, size);
	if (cfg->desc_gpa % 16)
		return fail(vq, DVS_VQ_ERR_RING_ALIGNMENT, cfg->desc_gpa);
	if (cfg->avail_gpa % 2)
		return fail(vq, DVS_VQ_ERR_RING_ALIGNMENT, cfg->avail_gpa);
	if (cfg->used_gpa % 4)
		return fail(vq, DVS_VQ_ERR_RING_ALIGNMENT, cfg->used_gpa);
	if (!dvs_guest_mem_contains(mem, cfg->desc_gpa, 16ull * size))
		return fail(vq, DVS_VQ_ERR_RING_OUTSIDE_MEMORY, cfg->desc_gpa);
	if (!dvs_guest_mem_contains(mem, cfg->avail_gpa, avail_bytes(size)))
		return fail(vq, DVS_VQ_ERR_RING_OUTSIDE_MEMORY, cfg->avail_gpa);
	if (!dvs_guest_mem_contains(mem, cfg->used_gpa, used_bytes(size)))
		return fail(vq, DVS_VQ_ERR_RING_OUTSIDE_MEMORY, cfg->used_gpa);
	vq->size = (uint16_t)size;
	vq->last_avail_idx = cfg->last_avail_idx;
	vq->used_idx = cfg->used_idx;
	vq->event_idx = (cfg->features >> DVS_VIRTIO_F_EVENT_IDX) & 1;
	vq->indirect = (cfg->features >> DVS_VIRTIO_F_INDIRECT_DESC) & 1;
	vq->desc_gpa = cfg->desc_gpa;
	vq->avail_gpa = cfg->avail_gpa;
	vq->used_gpa = cfg->used_gpa;
	/* Local backend: address the rings directly when each lies inside one region. */
	vq->desc_hva = (uintptr_t)dvs_guest_mem_local_ptr(mem, cfg->desc_gpa, 16ull * size);
	vq->avail_hva = (uintptr_t)dvs_guest_mem_local_ptr(mem, cfg->avail_gpa, avail_bytes(size));
	vq->used_hva = (uintptr_t)dvs_guest_mem_local_ptr(mem, cfg->used_gpa, used_bytes(size));
	vq->ready = 1;
	return 0;
}

/* --- ownership of heads --------------------------------------------------------------- */

static int owned(const struct dvs_vq *vq, uint16_t head)
{
	return (vq->owned[head / 64] >> (head % 64)) & 1;
}

static void set_owned(struct dvs_vq *vq, uint16_t head, int on)
{
	uint64_t bit = 1ull << (head % 64);
	if (on)
		vq->owned[head / 64] |= bit;
	else
		vq->owned[head / 64] &= ~bit;
}

/* --- popping a chain ------------------------------------------------------------------ */

static int walk_chain(struct dvs_vq *vq, const struct dvs_guest_mem *mem, uint16_t head,
		      struct dvs_vq_chain *chain)
{
	uint64_t table_gpa = vq->desc_gpa, table_hva = vq->desc_hva;
	uint32_t entries = vq->size, index = head, buffers = 0;
	int in_indirect = 0, seen_writable = 0;
	uint64_t total = 0;

	chain->head = head;
	chain->n_segs = 0;
	chain->n_readable = 0;
	chain->indirect = 0;
	chain->readable_bytes = 0;
	chain->writable_bytes = 0;

	/* Each iteration either appends a buffer (at most vq->size of them, checked below) or
	 * enters the one indirect table a chain may have, so this loop is bounded by size + 1. */
	for (;;) {
		struct desc d;
		int err = read_desc(mem, table_hva, table_gpa, index, &d);
		if (err)
			return err;
		if (d.flags & DVS_VIRTQ_DESC_F_INDIRECT) {
			if (in_indirect)
				return fail(vq, DVS_VQ_ERR_INDIRECT_NESTED, index);
			if (!vq->indirect)
				return fail(vq, DVS_VQ_ERR_INDIRECT_NOT_NEGOTIATED, index);
			if (d.flags & DVS_VIRTQ_DESC_F_NEXT)
				return fail(vq, DVS_VQ_ERR_INDIRECT_WITH_NEXT, index);
			if (d.len == 0 || d.len % 16)
				return fail(vq, DVS_VQ_ERR_INDIRECT_LENGTH, d.len);
			if (!dvs_guest_mem_contains(mem, d.addr, d.len))
				return fail(vq, DVS_VQ_ERR_INDIRECT_OUTSIDE_MEMORY, d.addr);
			/* the WRITE flag of the descriptor naming the table is ignored (§2.7.5.3.2) */
			in_indirect = 1;
			chain->indirect = 1;
			table_gpa = d.addr;
			table_hva = (uintptr_t)dvs_guest_mem_local_ptr(mem, d.addr, d.len);
			entries = d.len / 16;
			index = 0;
			continue;
		}
		if (++buffers > vq->size)
			return fail(vq, DVS_VQ_ERR_CHAIN_TOO_LONG, buffers);
		if (chain->n_segs == vq->max_segs)
			return fail(vq, DVS_VQ_ERR_CHAIN_OVER_DEVICE_LIMIT, vq->max_segs);
		int writable = (d.flags & DVS_VIRTQ_DESC_F_WRITE) != 0;
		if (!writable && seen_writable)
			return fail(vq, DVS_VQ_ERR_READABLE_AFTER_WRITABLE, index);
		total += d.len;
		if (total > (1ull << 32))
			return fail(vq, DVS_VQ_ERR_CHAIN_BYTES, total);
		if (!dvs_guest_mem_contains(mem, d.addr, d.len))
			return fail(vq, DVS_VQ_ERR_BUFFER_OUTSIDE_MEMORY, d.addr);
		struct dvs_vq_seg *seg = &chain->segs[chain->n_segs++];
		seg->gpa = d.addr;
		seg->len = d.len;
		seg->writable = (uint32_t)writable;
		if (writable) {
			seen_writable = 1;
			chain->writable_bytes += d.len;
		} else {
			chain->n_readable++;
			chain->readable_bytes += d.len;
		}
		if (!(d.flags & DVS_VIRTQ_DESC_F_NEXT))
			return 0;
		if (d.next >= entries)
			return fail(vq, DVS_VQ_ERR_NEXT_OUT_OF_RANGE, d.next);
		index = d.next;
	}
}

int dvs_vq_pop(struct dvs_vq *vq, const struct dvs_guest_mem *mem, struct dvs_vq_chain *chain)
{
	if (!vq->ready)
		return vq->rule ? -EPROTO : -EINVAL;
	if (vq->rule)
		return -EPROTO;
	uint16_t avail_idx;
	int err = load16(mem, vq->avail_hva ? vq->avail_hva + 2 : 0, vq->avail_gpa + 2, &avail_idx);
	if (err)
		return err;
	uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);
	if (pending > vq->size)
		return fail(vq, DVS_VQ_ERR_AVAIL_IDX_AHEAD, avail_idx);
	if (pending == 0)
		return 0;
	/* Orders the avail->idx load above before the loads of the ring entry and of the
	 * descriptors it publishes (pairs with the driver's barrier before its idx store). */
	atomic_thread_fence(memory_order_acquire);
	uint32_t slot = vq->last_avail_idx % vq->size;
	uint16_t head;
	err = load16(mem, vq->avail_hva ? vq->avail_hva + 4 + 2ull * slot : 0,
		     vq->avail_gpa + 4 + 2ull * slot, &head);
	if (err)
		return err;
	if (head >= vq->size)
		return fail(vq, DVS_VQ_ERR_HEAD_OUT_OF_RANGE, head);
	if (owned(vq, head))
		return fail(vq, DVS_VQ_ERR_HEAD_IN_FLIGHT, head);
	err = walk_chain(vq, mem, head, chain);
	if (err)
		return err;
	set_owned(vq, head, 1);
	vq->in_flight++;
	vq->last_avail_idx++;
	vq->popped++;
	return 1;
}

/* --- returning chains ----------------------------------------------------------------- */

int dvs_vq_push(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		const struct dvs_vq_used_elem *elems, uint32_t n)
{
	if (!vq->ready)
		return -EINVAL;
	if (n > vq->in_flight)
		return -EINVAL;
	/* Every id must be a head the device owns, each once: release them as we check, and
	 * take them back if one fails (a device bug, not the guest's: nothing is written). */
	for (uint32_t i = 0; i < n; i++) {
		if (elems[i].id >= vq->size || !owned(vq, (uint16_t)elems[i].id)) {
			while (i--)
				set_owned(vq, (uint16_t)elems[i].id, 1);
			return -EINVAL;
		}
		set_owned(vq, (uint16_t)elems[i].id, 0);
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t slot = (uint16_t)(vq->used_idx + i) % vq->size;
		uint32_t raw[2] = { htole32(elems[i].id), htole32(elems[i].len) };
		uint64_t off = 4 + 8ull * slot;
		if (vq->used_hva) {
			memcpy((void *)(uintptr_t)(vq->used_hva + off), raw, sizeof(raw));
		} else {
			int err = dvs_guest_mem_write(mem, vq->used_gpa + off, raw, sizeof(raw));
			if (err)
				return err;
		}
	}
	vq->in_flight -= (uint16_t)n;
	vq->used_idx += (uint16_t)n;
	vq->pushed += n;
	/* Orders the used elements (and the data the device wrote into those buffers before
	 * calling push) before the used->idx store that publishes them (§2.7.8.2). */
	atomic_thread_fence(memory_order_release);
	return store16(mem, vq->used_hva ? vq->used_hva + 2 : 0, vq->used_gpa + 2, vq->used_idx);
}

/* --- notification suppression --------------------------------------------------------- */

int dvs_vq_should_notify(struct dvs_vq *vq, const struct dvs_guest_mem *mem)
{
	if (!vq->ready)
		return -EINVAL;
	/* Orders the used->idx store of push before the load of used_event / flags below; a
	 * driver re-enabling interrupts concurrently then either sees our index or we see its
	 * request (the store->load case that only a full barrier orders). */
	atomic_thread_fence(memory_order_seq_cst);
	if (vq->event_idx) {
		uint16_t old = vq->signalled_used, now = vq->used_idx, used_event;
		int valid = vq->signalled_valid;
		vq->signalled_used = now;
		vq->signalled_valid = 1;
		if (!valid)
			return 1;
		uint64_t off = 4 + 2ull * vq->size;
		int err = load16(mem, vq->avail_hva ? vq->avail_hva + off : 0, vq->avail_gpa + off,
				 &used_event);
		if (err)
			return err;
		/* notify iff used_event lies in [old, now): the driver asked to hear about it */
		return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
	}
	uint16_t flags;
	int err = load16(mem, vq->avail_hva, vq->avail_gpa, &flags);
	if (err)
		return err;
	return !(flags & DVS_VIRTQ_AVAIL_F_NO_INTERRUPT);
}

int dvs_vq_enable_kicks(struct dvs_vq *vq, const struct dvs_guest_mem *mem)
{
	if (!vq->ready)
		return -EINVAL;
	if (vq->rule)
		return -EPROTO;
	int err;
	if (vq->event_idx) {
		uint64_t off = 4 + 8ull * vq->size;
		err = store16(mem, vq->used_hva ? vq->used_hva + off : 0, vq->used_gpa + off,
			      vq->last_avail_idx);
	} else {
		err = store16(mem, vq->used_hva, vq->used_gpa, 0);
	}
	if (err)
		return err;
	/* Orders the avail_event / flags store above before the avail->idx load below: a
	 * driver that published a buffer before seeing our store did not kick, so we must
	 * see its index here and process the buffer ourselves. */
	atomic_thread_fence(memory_order_seq_cst);
	uint16_t avail_idx;
	err = load16(mem, vq->avail_hva ? vq->avail_hva + 2 : 0, vq->avail_gpa + 2, &avail_idx);
	if (err)
		return err;
	return avail_idx != vq->last_avail_idx;
}

int dvs_vq_pending(const struct dvs_vq *vq, const struct dvs_guest_mem *mem)
{
	if (!vq->ready || vq->rule)
		return vq->rule ? -EPROTO : -EINVAL;
	uint16_t avail_idx;
	int err = load16(mem, vq->avail_hva ? vq->avail_hva + 2 : 0, vq->avail_gpa + 2, &avail_idx);
	if (err)
		return err;
	return (uint16_t)(avail_idx - vq->last_avail_idx);
}

int dvs_vq_disable_kicks(struct dvs_vq *vq, const struct dvs_guest_mem *mem)
{
	if (!vq->ready)
		return -EINVAL;
	if (vq->event_idx)
		return 0; /* avail_event already names a slot the driver has passed */
	return store16(mem, vq->used_hva, vq->used_gpa, DVS_VIRTQ_USED_F_NO_NOTIFY);
}

/* --- sequential access to a chain's bytes -------------------------------------------- */

static int64_t chain_rw(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *chain,
			int write, uint64_t offset, void *buf, uint64_t len)
{
	struct dvs_guest_xfer xfers[16];
	uint32_t n = 0;
	uint64_t done = 0;
	uint8_t *local = buf;
	for (uint32_t i = 0; i < chain->n_segs && done < len; i++) {
		const struct dvs_vq_seg *s = &chain->segs[i];
		if ((int)s->writable != write)
			continue;
		if (offset >= s->len) {
			offset -= s->len;
			continue;
		}
		uint64_t step = s->len - offset;
		if (step > len - done)
			step = len - done;
		xfers[n++] = (struct dvs_guest_xfer){ s->gpa + offset, (uintptr_t)(local + done), step };
		offset = 0;
		done += step;
		if (n == 16) {
			int err = dvs_guest_mem_rw(mem, write, xfers, n);
			if (err)
				return err;
			n = 0;
		}
	}
	if (n) {
		int err = dvs_guest_mem_rw(mem, write, xfers, n);
		if (err)
			return err;
	}
	return (int64_t)done;
}

int64_t dvs_vq_chain_read(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *chain,
			  uint64_t offset, void *dst, uint64_t len)
{
	return chain_rw(mem, chain, 0, offset, dst, len);
}

int64_t dvs_vq_chain_write(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *chain,
			   uint64_t offset, const void *src, uint64_t len)
{
	return chain_rw(mem, chain, 1, offset, (void *)src, len);
}
