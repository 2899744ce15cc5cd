/*
 * memdisk.c -- a fault-injecting in-memory disk behind the engine interface.
 *
 * It models a drive with a volatile write cache, the failure model crash-consistent
 * storage has to survive: a completed write is visible to later reads at once, but it is
 * durable only once a later FSYNC/FDATASYNC of the same file has completed. Until then,
 * power loss (dvs_memdisk_crash) may lose it, keep it, apply it out of order relative to
 * other unflushed writes, or tear it at 512-byte sector boundaries. A "writer death"
 * (dvs_memdisk_fail_after) makes every request after a chosen point fail without effect,
 * which is what a SIGKILL between two submissions looks like to the disk.
 *
 * Requests execute synchronously at submit in order (so LINK and DRAIN hold trivially);
 * completions wait in a queue for reap. Pages are 4 KiB and sparse (absent = zeros); the
 * unflushed log keeps a copy of every written page in issue order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "uring/backends.h"
#include "uring/u64map.h"

#define PAGE 4096u
#define SECTOR 512u

struct mfile {
	struct u64map visible; /* page -> 4 KiB */
	struct u64map durable;
};

struct logent {
	uint32_t file;
	uint64_t page;
	uint8_t *data;
};

struct dvs_memdisk {
	uint32_t entries;
	struct mfile *files;
	uint32_t n_files;
	struct logent *log;
	uint64_t n_log, cap_log;
	int64_t fail_after; /* < 0: disarmed */
	struct dvs_io_done *done;
	uint32_t done_head, done_len;
	struct dvs_io_stats stats;
};

static uint64_t rng_next(uint64_t *state)
{
	/* splitmix64: reproducible crashes from a seed */
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void free_pages(struct u64map *m)
{
	uint64_t it = 0, key;
	void *val;
	while (u64map_next(m, &it, &key, &val))
		free(val);
	u64map_free(m);
}

/* Store a copy of data as page `page` of map m (replacing what was there). */
static int store_page(struct u64map *m, uint64_t page, const uint8_t *data)
{
	uint8_t *p = u64map_get(m, page);
	if (!p) {
		p = malloc(PAGE);
		if (!p)
			return -ENOMEM;
		int ret = u64map_put(m, page, p);
		if (ret) {
			free(p);
			return ret;
		}
	}
	memcpy(p, data, PAGE);
	return 0;
}

int dvs_memdisk_create(uint32_t entries, struct dvs_memdisk **out)
{
	if (entries == 0 || entries > 65536)
		return -EINVAL;
	struct dvs_memdisk *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->entries = entries;
	m->fail_after = -1;
	m->done = calloc(entries, sizeof(*m->done));
	if (!m->done) {
		free(m);
		return -ENOMEM;
	}
	*out = m;
	return 0;
}

int dvs_memdisk_register_files(struct dvs_memdisk *m, uint32_t n)
{
	if (m->files)
		return -EBUSY;
	m->files = calloc(n ? n : 1, sizeof(*m->files));
	if (!m->files)
		return -ENOMEM;
	m->n_files = n;
	return 0;
}

static int log_append(struct dvs_memdisk *m, uint32_t file, uint64_t page, const uint8_t *data)
{
	if (m->n_log == m->cap_log) {
		uint64_t cap = m->cap_log ? m->cap_log * 2 : 256;
		struct logent *log = realloc(m->log, cap * sizeof(*log));
		if (!log)
			return -ENOMEM;
		m->log = log;
		m->cap_log = cap;
	}
	uint8_t *copy = malloc(PAGE);
	if (!copy)
		return -ENOMEM;
	memcpy(copy, data, PAGE);
	m->log[m->n_log++] = (struct logent){ .file = file, .page = page, .data = copy };
	return 0;
}

/* FSYNC of one file: its logged pages become durable, in issue order. */
static int make_durable(struct dvs_memdisk *m, uint32_t file)
{
	uint64_t kept = 0;
	int err = 0;
	for (uint64_t i = 0; i < m->n_log; i++) {
		struct logent *e = &m->log[i];
		if (e->file != file) {
			m->log[kept++] = *e;
			continue;
		}
		int ret = store_page(&m->files[file].durable, e->page, e->data);
		if (ret)
			err = ret;
		free(e->data);
	}
	m->n_log = kept;
	return err;
}

/* Forget the unflushed writes of one file. */
static void drop_log(struct dvs_memdisk *m, uint32_t file)
{
	uint64_t kept = 0;
	for (uint64_t i = 0; i < m->n_log; i++) {
		if (m->log[i].file == file)
			free(m->log[i].data);
		else
			m->log[kept++] = m->log[i];
	}
	m->n_log = kept;
}

static int32_t execute(struct dvs_memdisk *m, const struct dvs_io *io)
{
	if (io->file < 0 || (uint32_t)io->file >= m->n_files)
		return -EBADF;
	struct mfile *f = &m->files[io->file];
	switch (io->opcode) {
	case DVS_OP_NOP:
		return 0;
	case DVS_OP_FSYNC:
	case DVS_OP_FDATASYNC:
		return make_durable(m, (uint32_t)io->file);
	case DVS_OP_READ:
	case DVS_OP_WRITE:
		break;
	default:
		return -EINVAL;
	}
	if (io->offset % PAGE || io->len % PAGE || io->len == 0)
		return -EINVAL;
	uint64_t first = io->offset / PAGE;
	uint32_t pages = io->len / PAGE;
	uint8_t *buf = (uint8_t *)(uintptr_t)io->addr;
	for (uint32_t i = 0; i < pages; i++) {
		if (io->opcode == DVS_OP_READ) {
			const uint8_t *p = u64map_get(&f->visible, first + i);
			if (p)
				memcpy(buf + (uint64_t)i * PAGE, p, PAGE);
			else
				memset(buf + (uint64_t)i * PAGE, 0, PAGE);
		} else {
			int ret = store_page(&f->visible, first + i, buf + (uint64_t)i * PAGE);
			if (!ret)
				ret = log_append(m, (uint32_t)io->file, first + i,
						 buf + (uint64_t)i * PAGE);
			if (ret)
				return ret;
		}
	}
	if (io->opcode == DVS_OP_READ)
		m->stats.bytes_read += io->len;
	else
		m->stats.bytes_written += io->len;
	return (int32_t)io->len;
}

int dvs_memdisk_submit(struct dvs_memdisk *m, const struct dvs_io *ios, uint32_t n)
{
	uint32_t accepted = 0;
	int cancel = 0;
	while (accepted < n && m->done_len < m->entries) {
		const struct dvs_io *io = &ios[accepted];
		if (io->reserved || io->opcode > DVS_OP_FDATASYNC) {
			if (!accepted)
				return -EINVAL;
			break;
		}
		int32_t res;
		if (cancel) {
			res = -ECANCELED;
		} else if (m->fail_after == 0) {
			res = -EIO; /* the writer is dead: nothing reaches the disk any more */
		} else {
			if (m->fail_after > 0)
				m->fail_after--;
			res = execute(m, io);
		}
		int failed = res < 0 || ((io->opcode == DVS_OP_READ || io->opcode == DVS_OP_WRITE) &&
					 (uint32_t)res < io->len);
		cancel = (io->flags & DVS_IO_LINK) && (cancel || failed);
		uint32_t at = (m->done_head + m->done_len) % m->entries;
		m->done[at] = (struct dvs_io_done){ .user_data = io->user_data, .res = res };
		m->done_len++;
		accepted++;
	}
	if (accepted < n)
		m->stats.queue_full++;
	m->stats.submitted += accepted;
	return (int)accepted;
}

int dvs_memdisk_reap(struct dvs_memdisk *m, struct dvs_io_done *out, uint32_t max)
{
	uint32_t n = 0;
	while (n < max && m->done_len) {
		out[n++] = m->done[m->done_head];
		m->done_head = (m->done_head + 1) % m->entries;
		m->done_len--;
	}
	m->stats.completed += n;
	return (int)n;
}

int dvs_memdisk_stats(struct dvs_memdisk *m, struct dvs_io_stats *out)
{
	*out = m->stats;
	out->in_flight = m->done_len;
	return 0;
}

int dvs_memdisk_max_in_flight(struct dvs_memdisk *m)
{
	return (int)m->entries;
}

int dvs_memdisk_destroy(struct dvs_memdisk *m)
{
	if (!m)
		return 0;
	for (uint32_t i = 0; i < m->n_files; i++) {
		free_pages(&m->files[i].visible);
		free_pages(&m->files[i].durable);
	}
	for (uint64_t i = 0; i < m->n_log; i++)
		free(m->log[i].data);
	free(m->log);
	free(m->files);
	free(m->done);
	free(m);
	return 0;
}

/* ---- fault injection ---- */

int dvs_memdisk_set_fail_after(struct dvs_memdisk *m, int64_t ops)
{
	m->fail_after = ops < 0 ? -1 : ops;
	return 0;
}

static int copy_map(struct u64map *dst, const struct u64map *src)
{
	uint64_t it = 0, key;
	void *val;
	while (u64map_next(src, &it, &key, &val)) {
		int ret = store_page(dst, key, val);
		if (ret)
			return ret;
	}
	return 0;
}

int dvs_memdisk_power_loss(struct dvs_memdisk *m, uint32_t mode, uint64_t seed)
{
	if (mode > DVS_CRASH_TEAR)
		return -EINVAL;
	uint64_t state = seed;
	uint64_t *order = malloc((m->n_log ? m->n_log : 1) * sizeof(uint64_t));
	if (!order)
		return -ENOMEM;
	uint64_t kept = 0;
	for (uint64_t i = 0; i < m->n_log; i++)
		if (mode != DVS_CRASH_DROP_ALL && (rng_next(&state) & 1))
			order[kept++] = i;
	if (mode >= DVS_CRASH_REORDER) {
		for (uint64_t i = kept; i > 1; i--) { /* Fisher-Yates */
			uint64_t j = rng_next(&state) % i;
			uint64_t tmp = order[i - 1];
			order[i - 1] = order[j];
			order[j] = tmp;
		}
	}
	int ret = 0;
	for (uint64_t k = 0; k < kept && !ret; k++) {
		struct logent *e = &m->log[order[k]];
		struct u64map *durable = &m->files[e->file].durable;
		if (mode == DVS_CRASH_TEAR && (rng_next(&state) & 3) == 0) {
			/* a torn page: some sectors new, the others as they were */
			uint8_t page[PAGE];
			const uint8_t *old = u64map_get(durable, e->page);
			if (old)
				memcpy(page, old, PAGE);
			else
				memset(page, 0, PAGE);
			uint64_t mask = rng_next(&state);
			for (uint32_t s = 0; s < PAGE / SECTOR; s++)
				if (mask & (1ULL << s))
					memcpy(page + s * SECTOR, e->data + s * SECTOR, SECTOR);
			ret = store_page(durable, e->page, page);
		} else {
			ret = store_page(durable, e->page, e->data);
		}
	}
	free(order);
	for (uint64_t i = 0; i < m->n_log; i++)
		free(m->log[i].data);
	m->n_log = 0;
	/* after the reboot, what is visible is what was durable */
	for (uint32_t f = 0; f < m->n_files && !ret; f++) {
		free_pages(&m->files[f].visible);
		ret = copy_map(&m->files[f].visible, &m->files[f].durable);
	}
	m->fail_after = -1;
	m->done_head = m->done_len = 0;
	return ret ? ret : (int)(kept > INT32_MAX ? INT32_MAX : kept);
}

int dvs_memdisk_peek_page(struct dvs_memdisk *m, uint32_t file, uint64_t page, uint8_t *out)
{
	if (file >= m->n_files)
		return -EBADF;
	const uint8_t *p = u64map_get(&m->files[file].visible, page);
	if (p)
		memcpy(out, p, PAGE);
	else
		memset(out, 0, PAGE);
	return p != NULL;
}

int dvs_memdisk_poke_page(struct dvs_memdisk *m, uint32_t file, uint64_t page,
			  const uint8_t *in)
{
	if (file >= m->n_files)
		return -EBADF;
	int ret = store_page(&m->files[file].visible, page, in);
	return ret ? ret : store_page(&m->files[file].durable, page, in);
}

int64_t dvs_memdisk_page_list(struct dvs_memdisk *m, uint32_t file, uint64_t *out, uint64_t max)
{
	if (file >= m->n_files)
		return -EBADF;
	uint64_t it = 0, key, n = 0;
	void *val;
	while (u64map_next(&m->files[file].visible, &it, &key, &val)) {
		if (n < max)
			out[n] = key;
		n++;
	}
	return (int64_t)n;
}

int64_t dvs_memdisk_log_len(struct dvs_memdisk *m)
{
	return (int64_t)m->n_log;
}

int dvs_memdisk_copy_file(struct dvs_memdisk *m, uint32_t file, uint32_t into)
{
	if (file >= m->n_files || into >= m->n_files || file == into)
		return -EBADF;
	/* the durable image only: a snapshot is what a copy of the file on disk would hold */
	drop_log(m, into);
	free_pages(&m->files[into].durable);
	free_pages(&m->files[into].visible);
	int ret = copy_map(&m->files[into].durable, &m->files[file].durable);
	return ret ? ret : copy_map(&m->files[into].visible, &m->files[file].durable);
}
