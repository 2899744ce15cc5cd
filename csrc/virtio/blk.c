/*
 * blk.c -- virtio-blk requests (virtio 1.2 §5.2; see blk.h for the request layout).
 *
 * Each popped chain gets a request slot that lives until the backend completes it. Slot
 * memory is the device's, never the guest's: the chain's segment list is a validated copy,
 * the header and discard ranges are copied out of guest memory before they are checked, and
 * the status byte's address is fixed at parse time. Data moves without copies when guest RAM
 * is mapped here (vhost-user: iovecs point into the guest's memfd) and through a bounce
 * buffer when it is another process's (process_vm_readv/writev), so a request larger than
 * the bounce limit is refused there. All ranges of a discard or write-zeroes request are
 * checked before the first one is executed.
 */
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "virtio/blk.h"

#define SECTOR 512ull
#define IOV_MAX_PER_REQ 256
#define MAX_RANGES 64
#define MAX_SLOTS 256
#define BOUNCE_MAX (64ull << 20)

struct range {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

struct blk_req {
	struct dvs_blk_io io; /* first: done() gets it back */
	struct dvs_blk *blk;
	struct dvs_vq *vq;
	const struct dvs_guest_mem *mem;
	struct blk_req *next; /* free list or deferred list */
	uint32_t type;
	uint32_t rule;
	uint64_t status_gpa;
	uint64_t data_len;
	uint8_t *bounce;
	uint64_t bounce_cap;
	int copy_out;         /* READ through the bounce buffer: copy to the guest at the end */
	uint32_t n_ranges;
	uint32_t next_range;
	struct range ranges[MAX_RANGES];
	struct iovec iov[IOV_MAX_PER_REQ];
	struct dvs_vq_chain chain;
};

struct dvs_blk {
	struct dvs_blk_config cfg;
	struct dvs_blk_backend *backend;
	uint64_t capacity;
	struct blk_req *free_slots;
	struct blk_req *deferred_head, *deferred_tail;
	uint32_t n_slots;
	struct dvs_blk_stats stats;
};

static const char *const req_rule_names[DVS_BLK_REQ_RULE_MAX] = {
	[DVS_BLK_REQ_OK] = "none",
	[DVS_BLK_REQ_NO_STATUS] = "no device-writable byte for the status",
	[DVS_BLK_REQ_SHORT_HEADER] = "fewer than 16 device-readable header bytes",
	[DVS_BLK_REQ_UNALIGNED_LENGTH] = "data length is not a multiple of 512 bytes",
	[DVS_BLK_REQ_BEYOND_CAPACITY] = "sector range ends beyond the capacity",
	[DVS_BLK_REQ_WRONG_DIRECTION] = "data buffers have the wrong direction for the type",
	[DVS_BLK_REQ_READ_ONLY] = "write to a read-only device",
	[DVS_BLK_REQ_UNSUPPORTED_TYPE] = "unsupported request type",
	[DVS_BLK_REQ_GET_ID_LENGTH] = "GET_ID data is not 20 bytes",
	[DVS_BLK_REQ_RANGE_LENGTH] = "range data is not a positive multiple of 16 bytes",
	[DVS_BLK_REQ_TOO_MANY_RANGES] = "more ranges than the device's segment limit",
	[DVS_BLK_REQ_RANGE_TOO_LARGE] = "range longer than the device's sector limit",
	[DVS_BLK_REQ_UNKNOWN_FLAGS] = "reserved range flag bits set",
	[DVS_BLK_REQ_DISCARD_UNMAP] = "unmap flag set on a discard range",
	[DVS_BLK_REQ_TOO_LARGE] = "request data larger than the bounce limit",
	[DVS_BLK_REQ_BACKEND_ERROR] = "the backing store failed the operation",
};

const char *dvs_blk_request_rule_name(uint32_t rule)
{
	return rule < DVS_BLK_REQ_RULE_MAX ? req_rule_names[rule] : "unknown rule";
}

/* --- device life cycle ---------------------------------------------------------------- */

static uint32_t clamp(uint32_t v, uint32_t lo, uint32_t hi, uint32_t dflt)
{
	if (v == 0)
		v = dflt;
	return v < lo ? lo : v > hi ? hi : v;
}

int dvs_blk_create(const struct dvs_blk_config *cfg, struct dvs_blk_backend *backend,
		   struct dvs_blk **out)
{
	if (!backend)
		return -EINVAL;
	struct dvs_blk *blk = calloc(1, sizeof(*blk));
	if (!blk) {
		dvs_blk_backend_destroy(backend);
		return -ENOMEM;
	}
	blk->cfg = *cfg;
	blk->backend = backend;
	int64_t bytes = dvs_blk_backend_size(backend);
	if (bytes < 0) {
		dvs_blk_destroy(blk);
		return (int)bytes;
	}
	uint64_t max_capacity = (uint64_t)bytes / SECTOR;
	blk->capacity = cfg->capacity ? cfg->capacity : max_capacity;
	if (blk->capacity > max_capacity || cfg->num_queues > DVS_BLK_MAX_QUEUES) {
		dvs_blk_destroy(blk);
		return -EINVAL;
	}
	struct dvs_blk_config *c = &blk->cfg;
	c->num_queues = clamp(c->num_queues, 1, DVS_BLK_MAX_QUEUES, 1);
	c->seg_max = clamp(c->seg_max, 1, IOV_MAX_PER_REQ / 2 - 2, 126);
	c->blk_size = c->blk_size ? c->blk_size : 512;
	if (c->blk_size < 512 || (c->blk_size & (c->blk_size - 1))) {
		dvs_blk_destroy(blk);
		return -EINVAL;
	}
	c->max_discard_seg = clamp(c->max_discard_seg, 1, MAX_RANGES, 16);
	c->max_write_zeroes_seg = clamp(c->max_write_zeroes_seg, 1, MAX_RANGES, 16);
	c->max_discard_sectors = clamp(c->max_discard_sectors, 1, UINT32_MAX, 1u << 22);
	c->max_write_zeroes_sectors = clamp(c->max_write_zeroes_sectors, 1, UINT32_MAX, 1u << 22);
	*out = blk;
	return 0;
}

void dvs_blk_destroy(struct dvs_blk *blk)
{
	if (!blk)
		return;
	while (blk->free_slots) {
		struct blk_req *r = blk->free_slots;
		blk->free_slots = r->next;
		free(r->bounce);
		free(r);
	}
	/* Deferred slots were never accepted by the backend; in-flight ones are the caller's
	 * to drain (dvs_blk_poll) before destroying the device. */
	while (blk->deferred_head) {
		struct blk_req *r = blk->deferred_head;
		blk->deferred_head = r->next;
		free(r->bounce);
		free(r);
	}
	dvs_blk_backend_destroy(blk->backend);
	free(blk);
}

uint64_t dvs_blk_features(const struct dvs_blk *blk)
{
	uint64_t f = (1ull << DVS_VIRTIO_F_VERSION_1) | (1ull << DVS_VIRTIO_F_INDIRECT_DESC) |
		     (1ull << DVS_VIRTIO_F_EVENT_IDX) | (1ull << DVS_VIRTIO_BLK_F_SEG_MAX) |
		     (1ull << DVS_VIRTIO_BLK_F_BLK_SIZE) | (1ull << DVS_VIRTIO_BLK_F_FLUSH);
	if (blk->cfg.read_only)
		f |= 1ull << DVS_VIRTIO_BLK_F_RO;
	else
		f |= (1ull << DVS_VIRTIO_BLK_F_DISCARD) | (1ull << DVS_VIRTIO_BLK_F_WRITE_ZEROES);
	if (blk->cfg.num_queues > 1)
		f |= 1ull << DVS_VIRTIO_BLK_F_MQ;
	return f;
}

uint64_t dvs_blk_capacity(const struct dvs_blk *blk)
{
	return blk->capacity;
}

uint16_t dvs_blk_max_segs(const struct dvs_blk *blk)
{
	return (uint16_t)(blk->cfg.seg_max + 2); /* + header + status */
}

static void put_le16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static void put_le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put_le64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

int dvs_blk_config_space(const struct dvs_blk *blk, uint8_t *buf, uint32_t len)
{
	uint8_t c[DVS_VIRTIO_BLK_CONFIG_BYTES] = { 0 };
	const struct dvs_blk_config *cfg = &blk->cfg;
	put_le64(c + 0, blk->capacity);
	put_le32(c + 12, cfg->seg_max);
	put_le32(c + 20, cfg->blk_size);
	put_le16(c + 34, (uint16_t)cfg->num_queues);
	put_le32(c + 36, cfg->max_discard_sectors);
	put_le32(c + 40, cfg->max_discard_seg);
	put_le32(c + 44, cfg->blk_size / 512); /* discard_sector_alignment */
	put_le32(c + 48, cfg->max_write_zeroes_sectors);
	put_le32(c + 52, cfg->max_write_zeroes_seg);
	c[56] = 1; /* write_zeroes_may_unmap */
	uint32_t n = len < sizeof(c) ? len : (uint32_t)sizeof(c);
	memcpy(buf, c, n);
	return (int)n;
}

int dvs_blk_get_stats(const struct dvs_blk *blk, struct dvs_blk_stats *stats)
{
	*stats = blk->stats;
	return 0;
}

int dvs_blk_event_fd(struct dvs_blk *blk)
{
	return blk->backend->ops->event_fd(blk->backend);
}

/* --- slots ------------------------------------------------------------------------------ */

static struct blk_req *get_slot(struct dvs_blk *blk)
{
	struct blk_req *r = blk->free_slots;
	if (r) {
		blk->free_slots = r->next;
		return r;
	}
	if (blk->n_slots == MAX_SLOTS)
		return NULL;
	r = calloc(1, sizeof(*r));
	if (r)
		blk->n_slots++;
	return r;
}

static void put_slot(struct dvs_blk *blk, struct blk_req *r)
{
	r->next = blk->free_slots;
	blk->free_slots = r;
}

/* --- completion -------------------------------------------------------------------------- */

static void finish(struct blk_req *r, uint8_t status)
{
	struct dvs_blk *blk = r->blk;
	const struct dvs_vq_chain *ch = &r->chain;
	if (status == DVS_VIRTIO_BLK_S_OK && r->copy_out &&
	    dvs_vq_chain_write(r->mem, ch, 0, r->bounce, r->data_len) != (int64_t)r->data_len)
		status = DVS_VIRTIO_BLK_S_IOERR;
	uint32_t used_len;
	if (status == DVS_VIRTIO_BLK_S_OK &&
	    (r->type == DVS_VIRTIO_BLK_T_IN || r->type == DVS_VIRTIO_BLK_T_GET_ID))
		used_len = (uint32_t)ch->writable_bytes; /* data + status, all written */
	else
		used_len = ch->writable_bytes == 1 ? 1 : 0; /* only the status is known written */
	if (ch->writable_bytes)
		(void)dvs_guest_mem_write(r->mem, r->status_gpa, &status, 1);
	else
		used_len = 0;
	if (status != DVS_VIRTIO_BLK_S_OK) {
		blk->stats.errors++;
		if (r->rule == DVS_BLK_REQ_OK)
			r->rule = DVS_BLK_REQ_BACKEND_ERROR;
	}
	if (r->rule) {
		blk->stats.rule_counts[r->rule]++;
		blk->stats.last_rule = r->rule;
	}
	struct dvs_vq_used_elem e = { ch->head, used_len };
	(void)dvs_vq_push(r->vq, r->mem, &e, 1);
	blk->stats.in_flight--;
	put_slot(blk, r);
}

static void reject(struct blk_req *r, uint32_t rule, uint8_t status)
{
	r->rule = rule;
	r->copy_out = 0;
	finish(r, status);
}

static int submit(struct blk_req *r);

static void io_done(struct dvs_blk_io *io, int64_t result)
{
	struct blk_req *r = (struct blk_req *)io; /* io is the first member */
	struct dvs_blk *blk = r->blk;
	if (result < 0) {
		r->rule = DVS_BLK_REQ_BACKEND_ERROR;
		finish(r, DVS_VIRTIO_BLK_S_IOERR);
		return;
	}
	switch (r->type) {
	case DVS_VIRTIO_BLK_T_IN:
		blk->stats.bytes_read += r->data_len;
		break;
	case DVS_VIRTIO_BLK_T_OUT:
		blk->stats.bytes_written += r->data_len;
		break;
	case DVS_VIRTIO_BLK_T_DISCARD:
	case DVS_VIRTIO_BLK_T_WRITE_ZEROES:
		if (r->next_range < r->n_ranges) { /* the next range of the same request */
			int err = submit(r);
			if (err == -EAGAIN)
				return; /* deferred: resubmitted after the next completion */
			if (err < 0)
				finish(r, DVS_VIRTIO_BLK_S_IOERR);
			return;
		}
		break;
	}
	finish(r, DVS_VIRTIO_BLK_S_OK);
}

/* Hand the request's current operation to the backend. For discard/write-zeroes the current
 * operation is ranges[next_range]. 0: accepted; -EAGAIN: deferred; other: failed. */
static int submit(struct blk_req *r)
{
	struct dvs_blk *blk = r->blk;
	if (r->type == DVS_VIRTIO_BLK_T_DISCARD || r->type == DVS_VIRTIO_BLK_T_WRITE_ZEROES) {
		const struct range *g = &r->ranges[r->next_range];
		r->io.op = r->type == DVS_VIRTIO_BLK_T_DISCARD ? DVS_BLK_IO_DISCARD
							       : DVS_BLK_IO_WRITE_ZEROES;
		r->io.flags = (g->flags & 1) ? DVS_BLK_IO_F_UNMAP : 0;
		r->io.offset = g->sector * SECTOR;
		r->io.len = (uint64_t)g->num_sectors * SECTOR;
		r->io.iov = NULL;
		r->io.iovcnt = 0;
		r->next_range++;
	}
	r->io.done = io_done;
	int err = blk->backend->ops->submit(blk->backend, &r->io);
	if (err == -EAGAIN) {
		if (r->io.op == DVS_BLK_IO_DISCARD || r->io.op == DVS_BLK_IO_WRITE_ZEROES)
			r->next_range--;
		r->next = NULL;
		if (blk->deferred_tail)
			blk->deferred_tail->next = r;
		else
			blk->deferred_head = r;
		blk->deferred_tail = r;
		blk->stats.deferred++;
	} else if (err < 0) {
		r->rule = DVS_BLK_REQ_BACKEND_ERROR;
	}
	return err;
}

/* Submit and settle the outcome: -EAGAIN if deferred, else 0 (accepted or finished). */
static int start_io(struct blk_req *r)
{
	int err = submit(r);
	if (err == -EAGAIN)
		return -EAGAIN;
	if (err < 0)
		finish(r, DVS_VIRTIO_BLK_S_IOERR);
	return 0;
}

/* --- parsing ---------------------------------------------------------------------------- */

/* iovecs for `len` bytes of the chain's readable (writable == 0) or writable part, starting
 * `offset` bytes in. -E2BIG / -EOPNOTSUPP: use the bounce buffer instead. */
static int chain_iov(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *ch, int writable,
		     uint64_t offset, uint64_t len, struct iovec *iov, uint32_t max_iov)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < ch->n_segs && len; i++) {
		const struct dvs_vq_seg *s = &ch->segs[i];
		if ((int)s->writable != writable)
			continue;
		if (offset >= s->len) {
			offset -= s->len;
			continue;
		}
		uint64_t step = s->len - offset;
		if (step > len)
			step = len;
		int got = dvs_guest_mem_iov(mem, s->gpa + offset, step, iov + n, max_iov - n);
		if (got < 0)
			return got;
		n += (uint32_t)got;
		offset = 0;
		len -= step;
	}
	return (int)n;
}

/* Merge iovecs that are adjacent in host memory (a guest buffer spanning pages that are
 * contiguous in guest RAM): fewer, larger transfers for the engine. */
static uint32_t coalesce(struct iovec *iov, uint32_t n)
{
	uint32_t out = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (out && (char *)iov[out - 1].iov_base + iov[out - 1].iov_len == iov[i].iov_base)
			iov[out - 1].iov_len += iov[i].iov_len;
		else
			iov[out++] = iov[i];
	}
	return out;
}

static int ensure_bounce(struct blk_req *r, uint64_t len)
{
	if (len > BOUNCE_MAX)
		return -E2BIG;
	if (r->bounce_cap < len) {
		uint8_t *b = realloc(r->bounce, len ? len : 1);
		if (!b)
			return -ENOMEM;
		r->bounce = b;
		r->bounce_cap = len;
	}
	return 0;
}

/* Set up io.iov for a READ (data lands in the writable part) or WRITE (data comes from the
 * readable part after the 16-byte header). Returns 0 or a request rule. */
static uint32_t map_data(struct blk_req *r, int read)
{
	const struct dvs_vq_chain *ch = &r->chain;
	int writable = read ? 1 : 0;
	uint64_t offset = read ? 0 : 16;
	int n = chain_iov(r->mem, ch, writable, offset, r->data_len, r->iov, IOV_MAX_PER_REQ);
	r->copy_out = 0;
	if (n >= 0) {
		r->io.iov = r->iov;
		r->io.iovcnt = coalesce(r->iov, (uint32_t)n);
		return DVS_BLK_REQ_OK;
	}
	/* Remote guest memory, or more pieces than iovecs: go through a bounce buffer. */
	if (ensure_bounce(r, r->data_len))
		return DVS_BLK_REQ_TOO_LARGE;
	if (!read && dvs_vq_chain_read(r->mem, ch, 16, r->bounce, r->data_len) !=
			     (int64_t)r->data_len)
		return DVS_BLK_REQ_BACKEND_ERROR;
	r->iov[0].iov_base = r->bounce;
	r->iov[0].iov_len = r->data_len;
	r->io.iov = r->iov;
	r->io.iovcnt = 1;
	r->copy_out = read;
	return DVS_BLK_REQ_OK;
}

static int in_capacity(const struct dvs_blk *blk, uint64_t sector, uint64_t sectors)
{
	return sector <= blk->capacity && sectors <= blk->capacity - sector;
}

/* Validate the ranges of a discard / write-zeroes request and copy them into the slot. */
static uint32_t parse_ranges(struct blk_req *r, int discard, uint8_t *status)
{
	struct dvs_blk *blk = r->blk;
	const struct dvs_vq_chain *ch = &r->chain;
	*status = DVS_VIRTIO_BLK_S_IOERR;
	if (blk->cfg.read_only)
		return DVS_BLK_REQ_READ_ONLY;
	if (ch->writable_bytes != 1)
		return DVS_BLK_REQ_WRONG_DIRECTION;
	uint64_t bytes = ch->readable_bytes - 16;
	if (bytes == 0 || bytes % 16)
		return DVS_BLK_REQ_RANGE_LENGTH;
	uint64_t n = bytes / 16;
	uint32_t max_seg = discard ? blk->cfg.max_discard_seg : blk->cfg.max_write_zeroes_seg;
	uint32_t max_sectors =
		discard ? blk->cfg.max_discard_sectors : blk->cfg.max_write_zeroes_sectors;
	if (n > max_seg)
		return DVS_BLK_REQ_TOO_MANY_RANGES;
	uint8_t raw[MAX_RANGES * 16];
	if (dvs_vq_chain_read(r->mem, ch, 16, raw, bytes) != (int64_t)bytes)
		return DVS_BLK_REQ_BACKEND_ERROR;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t sector;
		uint32_t num, flags;
		memcpy(&sector, raw + 16 * i, 8);
		memcpy(&num, raw + 16 * i + 8, 4);
		memcpy(&flags, raw + 16 * i + 12, 4);
		struct range *g = &r->ranges[i];
		g->sector = le64toh(sector);
		g->num_sectors = le32toh(num);
		g->flags = le32toh(flags);
		if (g->flags & ~1u) {
			*status = DVS_VIRTIO_BLK_S_UNSUPP;
			return DVS_BLK_REQ_UNKNOWN_FLAGS;
		}
		if (discard && (g->flags & 1)) {
			*status = DVS_VIRTIO_BLK_S_UNSUPP;
			return DVS_BLK_REQ_DISCARD_UNMAP;
		}
		if (g->num_sectors > max_sectors)
			return DVS_BLK_REQ_RANGE_TOO_LARGE;
		if (!in_capacity(blk, g->sector, g->num_sectors))
			return DVS_BLK_REQ_BEYOND_CAPACITY;
	}
	r->n_ranges = (uint32_t)n;
	r->next_range = 0;
	return DVS_BLK_REQ_OK;
}

/* Parse one popped chain and start it. The slot is finished (pushed) or owned by the backend
 * or the deferred list afterwards. Returns -EAGAIN if it was deferred. */
static int start_request(struct blk_req *r)
{
	struct dvs_blk *blk = r->blk;
	const struct dvs_vq_chain *ch = &r->chain;
	blk->stats.requests++;
	blk->stats.in_flight++;
	r->rule = DVS_BLK_REQ_OK;
	r->copy_out = 0;
	r->data_len = 0;
	r->n_ranges = 0;
	r->type = UINT32_MAX;

	if (ch->writable_bytes == 0) {
		reject(r, DVS_BLK_REQ_NO_STATUS, DVS_VIRTIO_BLK_S_IOERR);
		return 0;
	}
	for (int i = ch->n_segs - 1; i >= 0; i--) { /* the status is the last writable byte */
		if (ch->segs[i].writable && ch->segs[i].len) {
			r->status_gpa = ch->segs[i].gpa + ch->segs[i].len - 1;
			break;
		}
	}
	uint8_t hdr[16];
	if (ch->readable_bytes < 16 || dvs_vq_chain_read(r->mem, ch, 0, hdr, 16) != 16) {
		reject(r, DVS_BLK_REQ_SHORT_HEADER, DVS_VIRTIO_BLK_S_IOERR);
		return 0;
	}
	uint32_t type;
	uint64_t sector;
	memcpy(&type, hdr, 4);
	memcpy(&sector, hdr + 8, 8);
	r->type = type = le32toh(type);
	sector = le64toh(sector);

	uint32_t rule = DVS_BLK_REQ_OK;
	uint8_t status = DVS_VIRTIO_BLK_S_IOERR;
	switch (type) {
	case DVS_VIRTIO_BLK_T_IN:
	case DVS_VIRTIO_BLK_T_OUT: {
		int read = type == DVS_VIRTIO_BLK_T_IN;
		if (read) {
			blk->stats.reads++;
			if (ch->readable_bytes != 16)
				rule = DVS_BLK_REQ_WRONG_DIRECTION;
			r->data_len = ch->writable_bytes - 1;
		} else {
			blk->stats.writes++;
			if (blk->cfg.read_only)
				rule = DVS_BLK_REQ_READ_ONLY;
			else if (ch->writable_bytes != 1)
				rule = DVS_BLK_REQ_WRONG_DIRECTION;
			r->data_len = ch->readable_bytes - 16;
		}
		if (!rule && r->data_len % SECTOR)
			rule = DVS_BLK_REQ_UNALIGNED_LENGTH;
		if (!rule && !in_capacity(blk, sector, r->data_len / SECTOR))
			rule = DVS_BLK_REQ_BEYOND_CAPACITY;
		if (!rule)
			rule = map_data(r, read);
		if (rule)
			break;
		r->io.op = read ? DVS_BLK_IO_READ : DVS_BLK_IO_WRITE;
		r->io.flags = 0;
		r->io.offset = sector * SECTOR;
		r->io.len = r->data_len;
		return start_io(r);
	}
	case DVS_VIRTIO_BLK_T_FLUSH:
		blk->stats.flushes++;
		r->io.op = DVS_BLK_IO_FLUSH;
		r->io.flags = 0;
		r->io.offset = 0;
		r->io.len = 0;
		r->io.iov = NULL;
		r->io.iovcnt = 0;
		return start_io(r);
	case DVS_VIRTIO_BLK_T_GET_ID: {
		blk->stats.get_ids++;
		if (ch->readable_bytes != 16)
			rule = DVS_BLK_REQ_WRONG_DIRECTION;
		else if (ch->writable_bytes - 1 != DVS_VIRTIO_BLK_ID_BYTES)
			rule = DVS_BLK_REQ_GET_ID_LENGTH;
		else if (dvs_vq_chain_write(r->mem, ch, 0, blk->cfg.id, DVS_VIRTIO_BLK_ID_BYTES) !=
			 DVS_VIRTIO_BLK_ID_BYTES)
			rule = DVS_BLK_REQ_BACKEND_ERROR;
		if (rule)
			break;
		finish(r, DVS_VIRTIO_BLK_S_OK);
		return 0;
	}
	case DVS_VIRTIO_BLK_T_DISCARD:
	case DVS_VIRTIO_BLK_T_WRITE_ZEROES: {
		int discard = type == DVS_VIRTIO_BLK_T_DISCARD;
		if (discard)
			blk->stats.discards++;
		else
			blk->stats.write_zeroes++;
		rule = parse_ranges(r, discard, &status);
		if (rule)
			break;
		return start_io(r);
	}
	default:
		rule = DVS_BLK_REQ_UNSUPPORTED_TYPE;
		status = DVS_VIRTIO_BLK_S_UNSUPP;
		break;
	}
	reject(r, rule, status);
	return 0;
}

/* --- the queue loop ------------------------------------------------------------------- */

static void resubmit_deferred(struct dvs_blk *blk)
{
	while (blk->deferred_head) {
		struct blk_req *r = blk->deferred_head;
		blk->deferred_head = r->next;
		if (!blk->deferred_head)
			blk->deferred_tail = NULL;
		int err = submit(r); /* re-queues itself at the tail on -EAGAIN */
		if (err == -EAGAIN)
			return;
		if (err < 0)
			finish(r, DVS_VIRTIO_BLK_S_IOERR);
	}
}

int dvs_blk_poll(struct dvs_blk *blk, int wait)
{
	int n = 0;
	if (blk->backend->ops->poll) {
		n = blk->backend->ops->poll(blk->backend, wait);
		if (n < 0)
			return n;
	}
	resubmit_deferred(blk);
	return n;
}

int dvs_blk_process(struct dvs_blk *blk, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		    struct dvs_blk_result *result)
{
	return dvs_blk_process_flags(blk, vq, mem, 0, result);
}

int dvs_blk_process_flags(struct dvs_blk *blk, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
			  uint32_t flags, struct dvs_blk_result *result)
{
	memset(result, 0, sizeof(*result));
	if (!vq->ready)
		return vq->rule ? -EPROTO : -EINVAL;
	uint64_t pushed_before = vq->pushed;
	int ret = 0;
	resubmit_deferred(blk);
	if (blk->deferred_head) {
		result->stalled = 1;
		goto out;
	}
	/* A guest that keeps the ring full must not keep this thread here forever. */
	uint32_t budget = 2u * vq->size;
	ret = dvs_vq_disable_kicks(vq, mem);
	if (ret < 0)
		goto out;
	for (;;) {
		while (budget) {
			struct blk_req *r = get_slot(blk);
			if (!r) {
				result->stalled = 1;
				goto out;
			}
			ret = dvs_vq_pop(vq, mem, &r->chain);
			if (ret <= 0) {
				put_slot(blk, r);
				if (ret < 0)
					goto out;
				break;
			}
			r->blk = blk;
			r->vq = vq;
			r->mem = mem;
			result->handled++;
			budget--;
			if (start_request(r) == -EAGAIN) {
				result->stalled = 1;
				ret = 0;
				goto out;
			}
		}
		if (!budget) {
			result->more = 1;
			break;
		}
		if (flags & DVS_BLK_KEEP_KICKS_OFF)
			break; /* empty; the caller polls */
		ret = dvs_vq_enable_kicks(vq, mem);
		if (ret <= 0)
			break; /* empty with kicks on, or an error */
		ret = dvs_vq_disable_kicks(vq, mem);
		if (ret < 0)
			break;
	}
out:
	result->completed = (uint32_t)(vq->pushed - pushed_before);
	if (result->completed) {
		int notify = dvs_vq_should_notify(vq, mem);
		if (notify > 0)
			result->notify = 1;
	}
	if (ret < 0)
		return ret;
	return (int)result->handled;
}
