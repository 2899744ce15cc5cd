/*
 * engine.c -- the engine facade: one request format and one call shape over the io_uring
 * ring, the thread-pool fallback and the fault-injecting memory disk, so the sealed volume
 * (and tests) do not care which one runs underneath. Which engine a host gets is policy,
 * decided in Python from dvs.probe (io_uring usable or not).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "uring/backends.h"
#include "uring/uring.h"

struct dvs_engine {
	uint32_t kind;
	struct dvs_ring *ring;
	struct dvs_threads *threads;
	struct dvs_memdisk *mem;
};

int dvs_engine_create(const struct dvs_engine_params *p, struct dvs_engine **out)
{
	if (!p || !out || p->entries == 0)
		return -EINVAL;
	struct dvs_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->kind = p->kind;
	int ret;
	switch (p->kind) {
	case DVS_ENGINE_RING: {
		struct dvs_ring_params rp = {
			.entries = p->entries,
			.flags = p->ring_flags,
			.sq_idle_ms = p->sq_idle_ms,
			.sq_cpu = p->sq_cpu,
		};
		ret = dvs_ring_create(&rp, &e->ring);
		break;
	}
	case DVS_ENGINE_THREADS:
		ret = dvs_threads_create(p->entries, p->threads, &e->threads);
		break;
	case DVS_ENGINE_MEMDISK:
		ret = dvs_memdisk_create(p->entries, &e->mem);
		break;
	default:
		ret = -EINVAL;
	}
	if (ret < 0) {
		free(e);
		return ret;
	}
	*out = e;
	return 0;
}

int dvs_engine_register_files(struct dvs_engine *e, const int32_t *fds, uint32_t n)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_register_files(e->ring, fds, n);
	case DVS_ENGINE_THREADS:
		return dvs_threads_register_files(e->threads, fds, n);
	default:
		return dvs_memdisk_register_files(e->mem, n);
	}
}

int dvs_engine_register_buffers(struct dvs_engine *e, const struct dvs_buf *bufs, uint32_t n)
{
	/* only the ring pins buffers; the others use the addresses as given */
	return e->kind == DVS_ENGINE_RING ? dvs_ring_register_buffers(e->ring, bufs, n) : 0;
}

int dvs_engine_enable(struct dvs_engine *e)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_enable(e->ring);
	case DVS_ENGINE_THREADS:
		return dvs_threads_enable(e->threads);
	default:
		return 0;
	}
}

int dvs_engine_update_file(struct dvs_engine *e, uint32_t index, int32_t fd)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_update_files(e->ring, index, &fd, 1);
	case DVS_ENGINE_THREADS:
		return dvs_threads_update_file(e->threads, index, fd);
	default:
		return -EOPNOTSUPP;
	}
}

int dvs_engine_submit(struct dvs_engine *e, const struct dvs_io *ios, uint32_t n)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_submit(e->ring, ios, n);
	case DVS_ENGINE_THREADS:
		return dvs_threads_submit(e->threads, ios, n);
	default:
		return dvs_memdisk_submit(e->mem, ios, n);
	}
}

int dvs_engine_reap(struct dvs_engine *e, struct dvs_io_done *out, uint32_t max,
		    uint32_t min_wait)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_reap(e->ring, out, max, min_wait);
	case DVS_ENGINE_THREADS:
		return dvs_threads_reap(e->threads, out, max, min_wait);
	default:
		return dvs_memdisk_reap(e->mem, out, max);
	}
}

int dvs_engine_submit_and_reap(struct dvs_engine *e, const struct dvs_io *ios, uint32_t n,
			       uint32_t *accepted, struct dvs_io_done *out, uint32_t max,
			       uint32_t min_wait)
{
	*accepted = 0;
	if (e->kind == DVS_ENGINE_RING)
		return dvs_ring_submit_and_reap(e->ring, ios, n, accepted, out, max, min_wait);
	if (n) {
		int ret = dvs_engine_submit(e, ios, n);
		if (ret < 0)
			return ret;
		*accepted = (uint32_t)ret;
	}
	return dvs_engine_reap(e, out, max, min_wait);
}

int dvs_engine_stats(struct dvs_engine *e, struct dvs_io_stats *out)
{
	switch (e->kind) {
	case DVS_ENGINE_RING:
		return dvs_ring_stats(e->ring, out);
	case DVS_ENGINE_THREADS:
		return dvs_threads_stats(e->threads, out);
	default:
		return dvs_memdisk_stats(e->mem, out);
	}
}

int dvs_engine_kind(struct dvs_engine *e)
{
	return (int)e->kind;
}

int dvs_engine_max_in_flight(struct dvs_engine *e)
{
	switch (e->kind) {
	case DVS_ENGINE_RING: {
		struct dvs_ring_info info;
		dvs_ring_info(e->ring, &info);
		return (int)info.max_in_flight;
	}
	case DVS_ENGINE_THREADS:
		return dvs_threads_max_in_flight(e->threads);
	default:
		return dvs_memdisk_max_in_flight(e->mem);
	}
}

struct dvs_ring *dvs_engine_ring(struct dvs_engine *e)
{
	return e->kind == DVS_ENGINE_RING ? e->ring : NULL;
}

int dvs_engine_destroy(struct dvs_engine *e)
{
	if (!e)
		return 0;
	dvs_ring_destroy(e->ring);
	dvs_threads_destroy(e->threads);
	dvs_memdisk_destroy(e->mem);
	free(e);
	return 0;
}

/* ---- memory-disk controls ---- */

static struct dvs_memdisk *memdisk_of(struct dvs_engine *e)
{
	return e && e->kind == DVS_ENGINE_MEMDISK ? e->mem : NULL;
}

int dvs_memdisk_fail_after(struct dvs_engine *e, int64_t ops)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_set_fail_after(m, ops) : -EOPNOTSUPP;
}

int dvs_memdisk_crash(struct dvs_engine *e, uint32_t mode, uint64_t seed)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_power_loss(m, mode, seed) : -EOPNOTSUPP;
}

int dvs_memdisk_peek(struct dvs_engine *e, uint32_t file, uint64_t page, uint8_t *out4k)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_peek_page(m, file, page, out4k) : -EOPNOTSUPP;
}

int dvs_memdisk_poke(struct dvs_engine *e, uint32_t file, uint64_t page, const uint8_t *in4k)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_poke_page(m, file, page, in4k) : -EOPNOTSUPP;
}

int64_t dvs_memdisk_pages(struct dvs_engine *e, uint32_t file, uint64_t *out, uint64_t max)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_page_list(m, file, out, max) : -EOPNOTSUPP;
}

int64_t dvs_memdisk_unflushed(struct dvs_engine *e)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_log_len(m) : -EOPNOTSUPP;
}

int dvs_memdisk_snapshot(struct dvs_engine *e, uint32_t file, uint32_t into_file)
{
	struct dvs_memdisk *m = memdisk_of(e);
	return m ? dvs_memdisk_copy_file(m, file, into_file) : -EOPNOTSUPP;
}
