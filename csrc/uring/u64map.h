/*
 * u64map.h -- a small open-addressing hash map from uint64_t keys to pointers, used by the
 * memory disk (page number -> page) and the sealed volume (node cache, block -> arena
 * slot). Linear probing with backward-shift deletion, so there are no tombstones; the
 * table doubles at 50% load. Key UINT64_MAX is reserved as "empty". Header-only.
 */
#ifndef DVS_U64MAP_H
#define DVS_U64MAP_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#define U64MAP_EMPTY UINT64_MAX

struct u64map {
	uint64_t *keys;
	void **vals;
	uint64_t cap; /* power of two, or 0 before the first insert */
	uint64_t len;
};

static inline uint64_t u64map_hash(uint64_t k)
{
	/* splitmix64 finaliser: sequential keys spread over the table */
	k ^= k >> 30;
	k *= 0xbf58476d1ce4e5b9ULL;
	k ^= k >> 27;
	k *= 0x94d049bb133111ebULL;
	return k ^ (k >> 31);
}

static inline void u64map_free(struct u64map *m)
{
	free(m->keys);
	free(m->vals);
	m->keys = NULL;
	m->vals = NULL;
	m->cap = m->len = 0;
}

static inline void *u64map_get(const struct u64map *m, uint64_t key)
{
	if (!m->cap)
		return NULL;
	uint64_t mask = m->cap - 1;
	for (uint64_t i = u64map_hash(key) & mask;; i = (i + 1) & mask) {
		if (m->keys[i] == key)
			return m->vals[i];
		if (m->keys[i] == U64MAP_EMPTY)
			return NULL;
	}
}

static inline int u64map_grow(struct u64map *m)
{
	uint64_t cap = m->cap ? m->cap * 2 : 64;
	uint64_t *keys = malloc(cap * sizeof(*keys));
	void **vals = malloc(cap * sizeof(*vals));
	if (!keys || !vals) {
		free(keys);
		free(vals);
		return -ENOMEM;
	}
	for (uint64_t i = 0; i < cap; i++)
		keys[i] = U64MAP_EMPTY;
	for (uint64_t j = 0; j < m->cap; j++) {
		if (m->keys[j] == U64MAP_EMPTY)
			continue;
		uint64_t i = u64map_hash(m->keys[j]) & (cap - 1);
		while (keys[i] != U64MAP_EMPTY)
			i = (i + 1) & (cap - 1);
		keys[i] = m->keys[j];
		vals[i] = m->vals[j];
	}
	free(m->keys);
	free(m->vals);
	m->keys = keys;
	m->vals = vals;
	m->cap = cap;
	return 0;
}

/* Insert or replace. */
static inline int u64map_put(struct u64map *m, uint64_t key, void *val)
{
	if ((m->len + 1) * 2 > m->cap) {
		int ret = u64map_grow(m);
		if (ret)
			return ret;
	}
	uint64_t mask = m->cap - 1;
	uint64_t i = u64map_hash(key) & mask;
	while (m->keys[i] != U64MAP_EMPTY && m->keys[i] != key)
		i = (i + 1) & mask;
	if (m->keys[i] == U64MAP_EMPTY)
		m->len++;
	m->keys[i] = key;
	m->vals[i] = val;
	return 0;
}

/* Remove key; returns its value or NULL. */
static inline void *u64map_del(struct u64map *m, uint64_t key)
{
	if (!m->cap)
		return NULL;
	uint64_t mask = m->cap - 1;
	uint64_t i = u64map_hash(key) & mask;
	while (m->keys[i] != key) {
		if (m->keys[i] == U64MAP_EMPTY)
			return NULL;
		i = (i + 1) & mask;
	}
	void *val = m->vals[i];
	/* backward shift: pull later members of the probe run into the hole */
	uint64_t hole = i;
	for (uint64_t j = (i + 1) & mask; m->keys[j] != U64MAP_EMPTY; j = (j + 1) & mask) {
		uint64_t home = u64map_hash(m->keys[j]) & mask;
		/* j may move to hole iff home is not in the cyclic range (hole, j] */
		if (((j - home) & mask) >= ((j - hole) & mask)) {
			m->keys[hole] = m->keys[j];
			m->vals[hole] = m->vals[j];
			hole = j;
		}
	}
	m->keys[hole] = U64MAP_EMPTY;
	m->len--;
	return val;
}

/* Iterate: for (uint64_t it = 0; u64map_next(m, &it, &k, &v);) ... (no mutation inside) */
static inline int u64map_next(const struct u64map *m, uint64_t *it, uint64_t *key, void **val)
{
	while (*it < m->cap) {
		uint64_t i = (*it)++;
		if (m->keys[i] != U64MAP_EMPTY) {
			*key = m->keys[i];
			*val = m->vals[i];
			return 1;
		}
	}
	return 0;
}

#endif
