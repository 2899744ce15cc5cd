/*
 * volume.c -- the sealed volume (format and protocol in shield.h).
 *
 * What the code relies on:
 * - The engine executes requests in any order except where IO_LINK / IO_DRAIN say
 *   otherwise, and a completed write is durable only after a later FDATASYNC completes
 *   (the memory disk enforces exactly this model; a real disk with a write cache too).
 * - Nothing read from the file is trusted before its tag checks out against an entry we
 *   already trust (the superblock's own tag against the key; then root, inner nodes,
 *   leaves, data). Decryption writes into the destination and wipes it when the tag fails,
 *   so a failing call never returns plaintext.
 *
 * Memory layout of the arena (registered with the ring, so transfers use READ_FIXED /
 * WRITE_FIXED): [superblock slot 0][slot 1][read staging x read_slots][write slots x
 * write_slots]. Ciphertext is written by sealing straight into a write slot and read by
 * opening straight out of a staging slot: one pass of AES-GCM is the only copy.
 * Reads of more than a quarter of the staging area run as a four-stage pipeline (read_pipelined).
 * After two adjacent such reads, freed stages take the next range's ciphertext (readahead);
 * it is opened only by the call that asks for it, and dropped (after its transfers land)
 * by any other call. With DVS_VOL_CRYPTO_HELPER, AES-GCM of 32 blocks or more is shared
 * with a helper thread (pool.h); every block is checked before the call returns.
 * Write slots are the write-back queue: a block waits there (DIRTY) until enough gathered,
 * a flush, or DVS_WRITE_SUBMIT; then it is written (INFLIGHT) and its slot freed when the
 * write completes. A read of a block that sits in a write slot opens it from there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "shield/crypto.h"
#include "shield/pool.h"
#include "shield/shield.h"
#include "uring/u64map.h"

#define BLK 4096u
#define FANOUT 128u
#define MAX_LEVELS 6
#define RESERVE_STEP (1ULL << 32) /* counters reserved per durable superblock write */
#define SB_MARGIN 8               /* counters kept back (superblocks used to take some) */
#define SB_UNSYNCED 1ULL          /* payload flag: written with its flush, before the sync */
#define MAX_RUN 64                /* blocks per coalesced request */
#define MAX_CHAIN 32              /* write runs a flush links into its commit chain */
#define N_PLANS 4                 /* stages of a pipelined read (a power of two) */
#define PAR_MIN 32                /* blocks from which AES-GCM is shared with a second core */
#define SLOT_NONE 2
#define META_BLOCK UINT64_MAX
#define MAGIC "DVSSHLD1"

#define KIND_DATA 1u
#define KIND_META 2u

#define UD_SYNC 1ULL
#define UD_WRUN 2ULL
#define UD_PLAN 4ULL
#define UD(type, payload) (((type) << 56) | (payload))

struct entry {
	uint64_t counter;
	uint32_t salt;
	uint32_t flags; /* bit 0: slot */
	uint8_t tag[16];
};
_Static_assert(sizeof(struct entry) == 32, "entry is 32 bytes on disk");

struct node {
	struct entry e[FANOUT]; /* the decrypted node: exactly one block */
	uint64_t index;
	uint32_t level;
	uint8_t dirty;
	uint8_t committed_slot; /* where the committed version lives; SLOT_NONE: nowhere */
	uint8_t pending_slot;   /* where this flush writes it */
	uint8_t pad;
	uint64_t rewritten[2];  /* leaves: child rewritten in this epoch (slot chosen) */
	uint64_t epoch_slot[2]; /* leaves: the slot chosen for it */
};

struct sb_header {
	char magic[8];
	uint32_t version;
	uint32_t block_size;
	uint32_t slot;
	uint32_t kdf;
	uint32_t scrypt_log2_n;
	uint32_t scrypt_r;
	uint32_t scrypt_p;
	uint32_t levels;
	uint8_t kdf_salt[32];
	uint8_t volume_id[16];
	uint64_t capacity_blocks;
	uint64_t meta_base;
	uint64_t data_base;
	uint8_t seal_nonce[12]; /* random: SIV needs no unique nonce; it hides equal payloads */
	uint32_t reserved0;
	uint8_t key_check[16];
	uint8_t reserved[112];
};
_Static_assert(sizeof(struct sb_header) == 256, "superblock header is 256 bytes");

struct sb_payload {
	uint64_t epoch;
	uint64_t nonce_limit;
	uint64_t size;
	uint64_t flags;      /* SB_UNSYNCED */
	struct entry root;
	uint64_t flush_from; /* UNSYNCED: the first counter of this epoch's writes */
	uint8_t reserved[56];
};
_Static_assert(sizeof(struct sb_payload) == 128, "superblock payload is 128 bytes");
#define SB_TAG_OFF (256 + 128)
#define SB_END (SB_TAG_OFF + 16)

struct aad {
	uint8_t volume_id[16];
	uint32_t kind;
	uint32_t level;
	uint64_t index;
	uint64_t counter;
};

struct nodelist {
	struct node **v;
	uint64_t n, cap;
};

/* A planned read of up to `cap` blocks into staging slots [base, base+cap): which blocks
 * went to which slot and how each disk request fared. N_PLANS plans let a sequential read
 * decrypt one chunk while the next chunks' transfers run. */
struct read_plan {
	uint32_t base, cap;
	uint32_t staged;   /* blocks staged for disk reads */
	uint32_t n_req;    /* disk requests */
	uint32_t pending;  /* requests not completed yet */
	uint32_t *stage_of; /* staged slot -> index in the caller's block list */
	uint32_t *served;   /* blocks served without a disk read (see plan_serve) */
	uint32_t n_served;
	uint32_t *req_first; /* request -> its first staged slot */
	int32_t *res;
	const uint64_t *list;
	uint64_t first;
	uint32_t n;
	uint8_t *out;
};

static int plan_init(struct read_plan *p, uint32_t base, uint32_t cap)
{
	memset(p, 0, sizeof(*p));
	p->base = base;
	p->cap = cap;
	p->stage_of = calloc(cap, sizeof(uint32_t));
	p->req_first = calloc(cap, sizeof(uint32_t));
	p->res = calloc(cap, sizeof(int32_t));
	p->served = calloc(cap, sizeof(uint32_t));
	return p->stage_of && p->req_first && p->res && p->served ? 0 : -ENOMEM;
}

static void plan_free(struct read_plan *p)
{
	free(p->stage_of);
	free(p->req_first);
	free(p->res);
	free(p->served);
}

enum { W_FREE = 0, W_DIRTY, W_INFLIGHT };

struct dvs_shield_volume {
	struct dvs_engine *eng;
	uint32_t file;
	uint8_t *arena;
	uint16_t buf;
	uint32_t read_slots, write_slots;
	uint32_t flags;
	/* geometry */
	uint64_t capacity;
	uint32_t levels;
	uint64_t level_count[MAX_LEVELS];
	uint64_t level_base[MAX_LEVELS];
	uint64_t data_base;
	/* identity and keys */
	struct sb_header header; /* template; slot and seal nonce are set per write */
	struct dvs_gcm gcm;
	uint8_t sb_key[64];      /* AES-256-SIV key of the superblock */
	uint32_t salt;
	uint64_t next_counter, nonce_limit;
	/* committed state (what the newest durable superblock says) */
	uint64_t epoch;
	struct entry committed_root;
	uint64_t committed_size;
	/* current state */
	struct entry root;
	uint64_t size;
	int tree_dirty;
	struct u64map nodes;
	struct nodelist dirty[MAX_LEVELS];
	struct u64map dirty_blocks; /* data block -> write slot + 1 */
	uint8_t *wstate;
	uint64_t *wblock;
	uint64_t *wphys;
	uint32_t wcursor, n_wdirty, n_winflight;
	uint32_t sb_slot;    /* the slot holding the committed state; the next commit takes the other */
	int mirrored;        /* the other slot holds the committed state too (format, clean close) */
	uint64_t flush_from; /* next_counter when the committed state was made: the epoch's writes
			      * have counters from here on */
	/* I/O */
	struct dvs_io *ios;
	uint32_t n_ios, cap_ios;
	struct dvs_io_done *done;
	uint32_t cap_done;
	int32_t *sync_res;
	uint32_t n_sync, cap_sync, sync_pending;
	uint32_t outstanding;
	struct read_plan *plans; /* N_PLANS, see read_pipelined */
	int failed;          /* sticky: a write or sync failed; the volume must be reopened */
	int ready;           /* formatted or opened: close flushes */
	uint8_t *scratch;    /* one block of plaintext: the partial block (see byte access) */
	uint64_t part_block; /* which block scratch holds, when part_valid */
	uint8_t part_valid;  /* scratch holds the current plaintext of part_block */
	uint8_t part_dirty;  /* ... with bytes written that are not sealed yet */
	/* a second core for AES-GCM on requests of PAR_MIN blocks or more (pool.h) */
	struct dvs_crypto_pool *pool;
	int pool_tried;
	struct seal_item *seals; /* write_slots: blocks assigned but not sealed yet */
	uint32_t n_seals;
	/* sequential readahead (read_pipelined): the ciphertext of the next range in flight */
	uint64_t seq_next;   /* where the last read_blocks ended */
	uint64_t ra_first;
	uint32_t ra_n;       /* 0: none */
	uint32_t ra_live, ra_issued;
	struct dvs_shield_status st;
};

struct seal_item {
	const uint8_t *in;
	uint8_t *out;
	struct entry *e; /* counter, salt and slot set; the tag is written by the seal */
	uint64_t block;
};

/* ---- small helpers ---- */

static uint64_t node_key(uint32_t level, uint64_t index)
{
	return ((uint64_t)level << 56) | index;
}

static uint8_t *sbuf(struct dvs_shield_volume *v, uint32_t s)
{
	return v->arena + (uint64_t)s * BLK;
}

static uint8_t *stage(struct dvs_shield_volume *v, uint32_t i)
{
	return v->arena + (uint64_t)(2 + i) * BLK;
}

static uint8_t *wslot(struct dvs_shield_volume *v, uint32_t i)
{
	return v->arena + (uint64_t)(2 + v->read_slots + i) * BLK;
}

/* A chunk per leaf: the leaf's two slots, then its 128 data blocks as two groups of 64,
 * each group slot 0 then slot 1. The file grows with the data (not with the capacity), and
 * up to 64 consecutive blocks of one slot are contiguous on disk. */
#define GROUP 64u
#define CHUNK (2u + 2u * FANOUT)

static uint64_t data_phys(const struct dvs_shield_volume *v, uint64_t block, uint32_t slot)
{
	uint64_t in_chunk = block % FANOUT;
	return v->data_base + (block / FANOUT) * CHUNK + 2 + (in_chunk / GROUP) * 2 * GROUP +
	       (uint64_t)slot * GROUP + in_chunk % GROUP;
}

static uint64_t meta_phys(const struct dvs_shield_volume *v, uint32_t level, uint64_t index,
			  uint32_t slot)
{
	if (level == 0)
		return v->data_base + index * CHUNK + slot;
	return v->level_base[level] + 2 * index + slot;
}

static void set_fail(struct dvs_shield_volume *v, int code, uint32_t kind, uint32_t level,
		     uint64_t index)
{
	v->st.fail_code = code;
	v->st.fail_kind = kind;
	v->st.fail_level = level;
	v->st.fail_index = index;
}

/* Geometry from capacity: levels of the tree, where each level and the data start. */
static int geometry(uint64_t capacity, uint32_t *levels, uint64_t *count, uint64_t *base,
		    uint64_t *data_base)
{
	if (capacity == 0 || capacity > DVS_SHIELD_MAX_CAPACITY)
		return -EINVAL;
	uint64_t c = (capacity + FANOUT - 1) / FANOUT;
	uint32_t l = 0;
	uint64_t at = 2; /* after the two superblock slots: the inner levels, two slots each */
	for (;;) {
		if (l >= MAX_LEVELS)
			return -EINVAL;
		count[l] = c;
		base[l] = l ? at : 0; /* leaves live in the chunks */
		if (l)
			at += 2 * c;
		l++;
		if (c == 1)
			break;
		c = (c + FANOUT - 1) / FANOUT;
	}
	*levels = l;
	*data_base = (at + 255) / 256 * 256; /* the chunks start 1 MiB aligned */
	return 0;
}

static void make_nonce(uint8_t nonce[12], uint64_t counter, uint32_t salt)
{
	memcpy(nonce, &counter, 8);
	memcpy(nonce + 8, &salt, 4);
}

static void make_aad(const struct dvs_shield_volume *v, struct aad *a, uint32_t kind,
		     uint32_t level, uint64_t index, uint64_t counter)
{
	memcpy(a->volume_id, v->header.volume_id, 16);
	a->kind = kind;
	a->level = level;
	a->index = index;
	a->counter = counter;
}

/* Seal/open one data block with context g, touching nothing of the volume but reading
 * its id: safe on the pool's helper thread. */
static int seal_data_with(const struct dvs_shield_volume *v, struct dvs_gcm *g, uint64_t index,
			  struct entry *e, const uint8_t *in, uint8_t *out)
{
	uint8_t nonce[12];
	struct aad a;
	make_nonce(nonce, e->counter, e->salt);
	make_aad(v, &a, KIND_DATA, 0, index, e->counter);
	return dvs_gcm_seal(g, nonce, (const uint8_t *)&a, sizeof(a), in, out, BLK, e->tag);
}

static int open_data_with(const struct dvs_shield_volume *v, struct dvs_gcm *g, uint64_t index,
			  const struct entry *e, const uint8_t *in, uint8_t *out)
{
	uint8_t nonce[12];
	struct aad a;
	make_nonce(nonce, e->counter, e->salt);
	make_aad(v, &a, KIND_DATA, 0, index, e->counter);
	return dvs_gcm_open(g, nonce, (const uint8_t *)&a, sizeof(a), in, out, BLK, e->tag);
}

/* The pool, started at the first request large enough to share (NULL: one core). */
static struct dvs_crypto_pool *crypto_pool(struct dvs_shield_volume *v)
{
	if (!v->pool_tried) {
		v->pool_tried = 1;
		if ((v->flags & DVS_VOL_CRYPTO_HELPER) && sysconf(_SC_NPROCESSORS_ONLN) > 1) {
			v->seals = calloc(v->write_slots, sizeof(*v->seals));
			if (!v->seals || dvs_pool_start(&v->pool, &v->gcm)) {
				free(v->seals);
				v->seals = NULL;
				v->pool = NULL;
			}
		}
	}
	return v->pool;
}

static int seal_block(struct dvs_shield_volume *v, uint32_t kind, uint32_t level, uint64_t index,
		      struct entry *e, const uint8_t *in, uint8_t *out)
{
	uint8_t nonce[12];
	struct aad a;
	make_nonce(nonce, e->counter, e->salt);
	make_aad(v, &a, kind, level, index, e->counter);
	v->st.blocks_sealed++;
	return dvs_gcm_seal(&v->gcm, nonce, (const uint8_t *)&a, sizeof(a), in, out, BLK, e->tag);
}

static int open_block(struct dvs_shield_volume *v, uint32_t kind, uint32_t level, uint64_t index,
		      const struct entry *e, const uint8_t *in, uint8_t *out)
{
	uint8_t nonce[12];
	struct aad a;
	make_nonce(nonce, e->counter, e->salt);
	make_aad(v, &a, kind, level, index, e->counter);
	v->st.blocks_opened++;
	int ret = dvs_gcm_open(&v->gcm, nonce, (const uint8_t *)&a, sizeof(a), in, out, BLK, e->tag);
	if (ret == -EBADMSG)
		set_fail(v, ret, kind == KIND_DATA ? DVS_FAIL_DATA : DVS_FAIL_META, level, index);
	return ret;
}

/* ---- the request queue and completions ---- */

static int queue_io(struct dvs_shield_volume *v, uint8_t op, uint8_t flags, void *addr,
		    uint32_t len, uint64_t off, uint64_t user_data)
{
	if (v->n_ios == v->cap_ios) {
		uint32_t cap = v->cap_ios ? v->cap_ios * 2 : 64;
		struct dvs_io *ios = realloc(v->ios, cap * sizeof(*ios));
		if (!ios)
			return -ENOMEM;
		v->ios = ios;
		v->cap_ios = cap;
	}
	struct dvs_io *io = &v->ios[v->n_ios++];
	memset(io, 0, sizeof(*io));
	io->opcode = op;
	io->flags = flags;
	io->addr = (uint64_t)(uintptr_t)addr;
	io->len = len;
	io->offset = off;
	io->file = (int32_t)v->file;
	io->buf = addr ? v->buf : DVS_IO_NO_BUF;
	io->user_data = user_data;
	return 0;
}

/* A synchronous request: its result lands in sync_res[index]. */
static int queue_sync(struct dvs_shield_volume *v, uint8_t op, uint8_t flags, void *addr,
		      uint32_t len, uint64_t off, uint32_t *index)
{
	if (v->n_sync == v->cap_sync) {
		uint32_t cap = v->cap_sync ? v->cap_sync * 2 : 64;
		int32_t *res = realloc(v->sync_res, cap * sizeof(*res));
		if (!res)
			return -ENOMEM;
		v->sync_res = res;
		v->cap_sync = cap;
	}
	uint32_t i = v->n_sync++;
	v->sync_res[i] = -EINPROGRESS;
	if (index)
		*index = i;
	return queue_io(v, op, flags, addr, len, off, UD(UD_SYNC, i));
}

static void complete_wrun(struct dvs_shield_volume *v, uint64_t payload, int32_t res)
{
	uint32_t first = (uint32_t)(payload & 0xffffff);
	uint32_t count = (uint32_t)((payload >> 24) & 0xffff);
	if (res != (int32_t)(count * BLK) && !v->failed)
		v->failed = res < 0 ? res : -EIO;
	for (uint32_t s = first; s < first + count && s < v->write_slots; s++) {
		if (v->wblock[s] != META_BLOCK) {
			void *cur = u64map_get(&v->dirty_blocks, v->wblock[s]);
			if ((uintptr_t)cur == (uintptr_t)s + 1)
				u64map_del(&v->dirty_blocks, v->wblock[s]);
		}
		v->wstate[s] = W_FREE;
		v->n_winflight--;
	}
	if (res > 0)
		v->st.blocks_written += (uint64_t)res / BLK;
}

static void dispatch(struct dvs_shield_volume *v, int n);

/* Reap completions (waiting for min_wait) and account for them. */
static int pump(struct dvs_shield_volume *v, uint32_t min_wait)
{
	if (min_wait > v->outstanding)
		min_wait = v->outstanding;
	int n = dvs_engine_reap(v->eng, v->done, v->cap_done, min_wait);
	if (n < 0)
		return n;
	if (n == 0 && min_wait) {
		/* the engine has nothing in flight for us (a memory disk that "lost power"):
		 * waiting would never end */
		v->outstanding = 0;
		v->sync_pending = 0;
		if (!v->failed)
			v->failed = -EIO;
		return -EIO;
	}
	dispatch(v, n);
	return n;
}

/* Account for n completions in v->done. */
static void dispatch(struct dvs_shield_volume *v, int n)
{
	for (int i = 0; i < n; i++) {
		uint64_t ud = v->done[i].user_data;
		int32_t res = v->done[i].res;
		uint64_t type = ud >> 56, payload = ud & ((1ULL << 56) - 1);
		v->outstanding--;
		if (type == UD_SYNC && payload < v->n_sync) {
			v->sync_res[payload] = res;
			v->sync_pending--;
		} else if (type == UD_WRUN) {
			complete_wrun(v, payload, res);
		} else if (type == UD_PLAN) {
			struct read_plan *p = &v->plans[(payload >> 24) & (N_PLANS - 1)];
			uint32_t k = (uint32_t)(payload & 0xffffff);
			if (k < p->n_req && p->res[k] == -EINPROGRESS) {
				p->res[k] = res;
				p->pending--;
			}
		}
	}
}

/* Account for ios[first, first+n) accepted by the engine. */
static void accepted_ios(struct dvs_shield_volume *v, uint32_t first, uint32_t n)
{
	for (uint32_t i = first; i < first + n; i++)
		if ((v->ios[i].user_data >> 56) == UD_SYNC)
			v->sync_pending++;
	v->outstanding += n;
}

/* Hand every queued request to the engine, reaping when its queue is full. */
static int submit_queued(struct dvs_shield_volume *v)
{
	uint32_t sent = 0;
	while (sent < v->n_ios) {
		int ret = dvs_engine_submit(v->eng, v->ios + sent, v->n_ios - sent);
		if (ret < 0) {
			v->n_ios = 0;
			return ret;
		}
		accepted_ios(v, sent, (uint32_t)ret);
		sent += (uint32_t)ret;
		if (sent < v->n_ios) {
			ret = pump(v, 1);
			if (ret < 0) {
				v->n_ios = 0;
				return ret;
			}
		}
	}
	v->n_ios = 0;
	return 0;
}

/* Hand the queued requests over and wait for `want` completions in the same engine
 * crossing (one io_uring_enter carries the submission and the wait); what the queue did
 * not take goes through submit_queued. */
static int submit_and_wait(struct dvs_shield_volume *v, uint32_t want)
{
	if (!v->n_ios)
		return 0;
	uint32_t taken = 0;
	if (want > v->outstanding + v->n_ios)
		want = v->outstanding + v->n_ios;
	int n = dvs_engine_submit_and_reap(v->eng, v->ios, v->n_ios, &taken, v->done, v->cap_done,
					   want);
	accepted_ios(v, 0, taken);
	if (taken < v->n_ios)
		memmove(v->ios, v->ios + taken, (v->n_ios - taken) * sizeof(*v->ios));
	v->n_ios -= taken;
	if (n < 0) {
		v->n_ios = 0;
		return n;
	}
	dispatch(v, n);
	return submit_queued(v);
}

static uint32_t queued_syncs(const struct dvs_shield_volume *v)
{
	uint32_t k = 0;
	for (uint32_t i = 0; i < v->n_ios; i++)
		k += (v->ios[i].user_data >> 56) == UD_SYNC;
	return k;
}

/* Wait for every synchronous request; one sleep for all of them where possible (each
 * wake-up is a context switch, and a chain completes member by member). */
static int wait_sync(struct dvs_shield_volume *v)
{
	int ret = submit_and_wait(v, v->sync_pending + queued_syncs(v));
	while (!ret && v->sync_pending) {
		int n = pump(v, v->sync_pending);
		if (n < 0)
			ret = n;
	}
	return ret;
}

static int wait_all(struct dvs_shield_volume *v)
{
	int ret = submit_and_wait(v, v->outstanding + v->n_ios);
	while (!ret && v->outstanding) {
		int n = pump(v, v->outstanding);
		if (n < 0)
			ret = n;
	}
	return ret;
}

/* ---- write slots ---- */

/* Runs of DIRTY write slots that are contiguous in the file. (No IO_DRAIN on chains: the
 * callers wait for everything in flight first, and a drained head is forced into a kernel
 * worker, which costs a context switch per flush.) */
static uint32_t count_runs(const struct dvs_shield_volume *v)
{
	uint32_t runs = 0;
	for (uint32_t s = 0; s < v->write_slots;) {
		if (v->wstate[s] != W_DIRTY) {
			s++;
			continue;
		}
		uint32_t len = 1;
		while (s + len < v->write_slots && len < MAX_RUN && v->wstate[s + len] == W_DIRTY &&
		       v->wphys[s + len] == v->wphys[s] + len)
			len++;
		runs++;
		s += len;
	}
	return runs;
}

/* Queue the DIRTY slots as write runs; with `link`, as one IO_LINK chain whose head drains
 * everything before it (the caller appends the rest of the chain and submits). */
static int queue_dirty(struct dvs_shield_volume *v, int link)
{
	uint32_t s = 0, queued = 0;
	while (s < v->write_slots) {
		if (v->wstate[s] != W_DIRTY) {
			s++;
			continue;
		}
		uint32_t len = 1;
		while (s + len < v->write_slots && len < MAX_RUN && v->wstate[s + len] == W_DIRTY &&
		       v->wphys[s + len] == v->wphys[s] + len)
			len++;
		for (uint32_t i = 0; i < len; i++)
			v->wstate[s + i] = W_INFLIGHT;
		v->n_wdirty -= len;
		v->n_winflight += len;
		uint8_t flags = link ? DVS_IO_LINK : 0;
		int ret = queue_io(v, DVS_OP_WRITE, flags, wslot(v, s), len * BLK, v->wphys[s] * BLK,
				   UD(UD_WRUN, ((uint64_t)len << 24) | s));
		if (ret)
			return ret;
		queued++;
		s += len;
	}
	return 0;
}

static int submit_dirty(struct dvs_shield_volume *v)
{
	int ret = queue_dirty(v, 0);
	return ret ? ret : submit_queued(v);
}

static int alloc_wslot(struct dvs_shield_volume *v)
{
	for (;;) {
		if (v->n_wdirty + v->n_winflight < v->write_slots) {
			for (uint32_t i = 0; i < v->write_slots; i++) {
				uint32_t s = (v->wcursor + i) % v->write_slots;
				if (v->wstate[s] == W_FREE) {
					v->wcursor = (s + 1) % v->write_slots;
					return (int)s;
				}
			}
		}
		int ret = v->n_wdirty ? submit_dirty(v) : 0;
		if (!ret)
			ret = pump(v, 1);
		if (ret < 0)
			return ret;
		if (v->failed)
			return v->failed;
	}
}

/* ---- the tree ---- */

static struct node *node_get(struct dvs_shield_volume *v, uint32_t level, uint64_t index)
{
	return u64map_get(&v->nodes, node_key(level, index));
}

/* The entry that authenticates node (level, index): in its parent, or the root. */
static struct entry *parent_entry(struct dvs_shield_volume *v, uint32_t level, uint64_t index)
{
	if (level == v->levels - 1)
		return &v->root;
	struct node *p = node_get(v, level + 1, index / FANOUT);
	return p ? &p->e[index % FANOUT] : NULL;
}

static int mark_dirty(struct dvs_shield_volume *v, struct node *n)
{
	v->tree_dirty = 1;
	if (n->dirty)
		return 0;
	struct nodelist *l = &v->dirty[n->level];
	if (l->n == l->cap) {
		uint64_t cap = l->cap ? l->cap * 2 : 64;
		struct node **nv = realloc(l->v, cap * sizeof(*nv));
		if (!nv)
			return -ENOMEM;
		l->v = nv;
		l->cap = cap;
	}
	l->v[l->n++] = n;
	n->dirty = 1;
	return 0;
}

static struct node *new_node(uint32_t level, uint64_t index)
{
	struct node *n = aligned_alloc(64, (sizeof(struct node) + 63) / 64 * 64);
	if (!n)
		return NULL;
	memset(n, 0, sizeof(*n));
	n->level = level;
	n->index = index;
	n->committed_slot = SLOT_NONE;
	return n;
}

/* Load (and authenticate) the nodes of level l named in idx[0..n) (sorted, no duplicates)
 * that are not cached yet; their parents must be cached. Reads go out in batches of up to
 * read_slots, one engine crossing per batch. */
static int load_level(struct dvs_shield_volume *v, uint32_t l, const uint64_t *idx, uint64_t n)
{
	struct node **pending = malloc(v->read_slots * sizeof(*pending));
	if (!pending)
		return -ENOMEM;
	int ret = 0;
	uint64_t at = 0;
	while (at < n && !ret) {
		uint32_t staged = 0;
		v->n_sync = 0;
		for (; at < n && staged < v->read_slots; at++) {
			uint64_t j = idx[at];
			if (node_get(v, l, j))
				continue;
			struct entry *pe = parent_entry(v, l, j);
			struct node *node = new_node(l, j);
			if (!node || !pe) {
				free(node);
				ret = -ENOMEM;
				break;
			}
			if (!pe->counter) {
				/* never written: an all-zero node, no I/O */
				if (u64map_put(&v->nodes, node_key(l, j), node)) {
					free(node);
					ret = -ENOMEM;
					break;
				}
				continue;
			}
			node->committed_slot = pe->flags & 1;
			pending[staged] = node;
			ret = queue_sync(v, DVS_OP_READ, 0, stage(v, staged), BLK,
					 meta_phys(v, l, j, pe->flags & 1) * BLK, NULL);
			if (ret) {
				free(node);
				break;
			}
			staged++;
		}
		if (!ret && staged)
			ret = wait_sync(v);
		for (uint32_t i = 0; i < staged; i++) {
			struct node *node = pending[i];
			if (!ret && v->sync_res[i] < 0) {
				ret = v->sync_res[i];
			} else if (!ret && v->sync_res[i] != (int32_t)BLK) {
				/* the node is not (all) there: it cannot authenticate */
				set_fail(v, -EBADMSG, DVS_FAIL_META, l, node->index);
				ret = -EBADMSG;
			}
			if (!ret)
				ret = open_block(v, KIND_META, l, node->index,
						 parent_entry(v, l, node->index), stage(v, i),
						 (uint8_t *)node->e);
			if (!ret)
				ret = u64map_put(&v->nodes, node_key(l, node->index), node);
			if (ret) {
				free(node);
				continue;
			}
			v->st.nodes_loaded++;
		}
		v->st.blocks_read += staged;
	}
	free(pending);
	return ret;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Nodes j0..j1 of level l and every node above them, one batch per level from the root:
 * at level lev the ancestors of a range are the range divided by FANOUT^(lev - l). */
static int load_ranges_from_root(struct dvs_shield_volume *v, uint32_t l, uint64_t j0,
				 uint64_t j1)
{
	for (int lev = (int)v->levels - 1; lev >= (int)l; lev--) {
		uint64_t shift = 1;
		for (int k = (int)l; k < lev; k++)
			shift *= FANOUT;
		uint64_t a = j0 / shift, m = j1 / shift - a + 1;
		uint64_t *idx = malloc(m * sizeof(uint64_t));
		if (!idx)
			return -ENOMEM;
		for (uint64_t i = 0; i < m; i++)
			idx[i] = a + i;
		int ret = load_level(v, (uint32_t)lev, idx, m);
		free(idx);
		if (ret)
			return ret;
	}
	return 0;
}

/* Load the leaves of the given data blocks (a list, or first..first+n-1 when list is NULL)
 * and every node above them, level by level from the root: one batch per level. */
static int ensure_leaves(struct dvs_shield_volume *v, const uint64_t *list, uint64_t first,
			 uint64_t n)
{
	if (!n)
		return 0;
	if (!list) /* a range: the nodes of each level form a range too */
		return load_ranges_from_root(v, 0, first / FANOUT, (first + n - 1) / FANOUT);
	uint64_t *idx = malloc(n * sizeof(uint64_t));
	if (!idx)
		return -ENOMEM;
	int ret = 0;
	for (int l = (int)v->levels - 1; l >= 0 && !ret; l--) {
		uint64_t shift = FANOUT;
		for (int k = 0; k < l; k++)
			shift *= FANOUT;
		for (uint64_t i = 0; i < n; i++)
			idx[i] = list[i] / shift;
		qsort(idx, n, sizeof(uint64_t), cmp_u64);
		uint64_t m = 0;
		for (uint64_t i = 0; i < n; i++)
			if (!m || idx[m - 1] != idx[i])
				idx[m++] = idx[i];
		ret = load_level(v, (uint32_t)l, idx, m);
	}
	free(idx);
	return ret;
}

/* Nodes of level l with index in [j0, j1] and their ancestors. */
static int ensure_nodes(struct dvs_shield_volume *v, uint32_t l, uint64_t j0, uint64_t j1)
{
	uint64_t span = 1;
	for (uint32_t k = 0; k <= l; k++)
		span *= FANOUT;
	if (l >= v->levels)
		return 0;
	/* the data-block range under those nodes, clipped to the capacity */
	uint64_t first = j0 * span, last = (j1 + 1) * span - 1;
	if (last >= v->capacity)
		last = v->capacity - 1;
	if (first > last)
		return 0;
	if (l == 0)
		return load_ranges_from_root(v, 0, first / FANOUT, last / FANOUT);
	return load_ranges_from_root(v, l, j0, j1);
}

static struct entry *data_entry(struct dvs_shield_volume *v, uint64_t block, struct node **leaf)
{
	struct node *n = node_get(v, 0, block / FANOUT);
	if (leaf)
		*leaf = n;
	return &n->e[block % FANOUT];
}

/* The slot a write of leaf child k goes to in this epoch: the one the committed state
 * does not use, chosen once per epoch. */
static uint32_t choose_data_slot(struct node *leaf, uint32_t k)
{
	uint32_t w = k >> 6;
	uint64_t bit = 1ULL << (k & 63);
	if (leaf->rewritten[w] & bit)
		return (leaf->epoch_slot[w] & bit) ? 1 : 0;
	const struct entry *e = &leaf->e[k];
	uint32_t s = (e->counter && !(e->flags & 1)) ? 1 : 0;
	leaf->rewritten[w] |= bit;
	if (s)
		leaf->epoch_slot[w] |= bit;
	else
		leaf->epoch_slot[w] &= ~bit;
	return s;
}

/* ---- superblock ---- */

/* Seal the superblock for `epoch` into arena slot s (destined for superblock slot s). */
static int seal_superblock(struct dvs_shield_volume *v, uint32_t s, uint64_t epoch,
			   const struct entry *root, uint64_t size, uint64_t limit, uint64_t flags)
{
	uint8_t *b = sbuf(v, s);
	memset(b, 0, BLK);
	struct sb_header h = v->header;
	h.slot = s;
	int ret = dvs_random(h.seal_nonce, sizeof(h.seal_nonce));
	if (ret)
		return ret;
	memcpy(b, &h, sizeof(h));
	struct sb_payload p;
	memset(&p, 0, sizeof(p));
	p.epoch = epoch;
	p.nonce_limit = limit;
	p.size = size;
	p.flags = flags;
	p.root = *root;
	p.flush_from = (flags & SB_UNSYNCED) ? v->flush_from : 0;
	v->st.blocks_sealed++;
	ret = dvs_siv_seal(v->sb_key, b, sizeof(h), (const uint8_t *)&p, b + 256, sizeof(p),
			   b + SB_TAG_OFF);
	dvs_wipe(&p, sizeof(p));
	return ret;
}

/* How a commit makes its superblock durable. */
enum commit_mode {
	/* the caller linked the flush's writes in front: [writes ->] superblock (UNSYNCED) ->
	 * FDATASYNC; an open authenticates those writes before it trusts the superblock */
	COMMIT_WITH_WRITES,
	/* the writes completed before: FDATASYNC -> superblock -> FDATASYNC */
	COMMIT_AFTER_BARRIER,
	/* nothing new is referenced (a nonce reservation; the committed state is durable):
	 * superblock -> FDATASYNC */
	COMMIT_STATE_DURABLE,
};

/* Make a state durable in the slot the committed state does not use. Appended to whatever
 * the caller queued (linked members run in order; a failed or short member cancels the
 * rest, so the superblock is not even written when a write before it failed). */
static int commit_superblock(struct dvs_shield_volume *v, uint64_t epoch,
			     const struct entry *root, uint64_t size, uint64_t limit,
			     enum commit_mode mode)
{
	int durable = !(v->flags & DVS_VOL_EPHEMERAL);
	uint32_t slot = v->sb_slot ^ 1;
	int ret = seal_superblock(v, slot, epoch, root, size, limit,
				  mode == COMMIT_WITH_WRITES ? SB_UNSYNCED : 0);
	if (ret)
		return ret;
	v->n_sync = 0;
	if (durable && mode == COMMIT_AFTER_BARRIER)
		ret = queue_sync(v, DVS_OP_FDATASYNC, DVS_IO_LINK, NULL, 0, 0, NULL);
	uint32_t sb_index = v->n_sync;
	if (!ret)
		ret = queue_sync(v, DVS_OP_WRITE, durable ? DVS_IO_LINK : 0, sbuf(v, slot), BLK,
				 (uint64_t)slot * BLK, NULL);
	if (!ret && durable)
		ret = queue_sync(v, DVS_OP_FDATASYNC, 0, NULL, 0, 0, NULL);
	/* a chain completes in order, its sync last: wait for all of it in the crossing
	 * that submits it */
	if (!ret)
		ret = submit_and_wait(v, v->outstanding + v->n_ios);
	if (!ret)
		ret = wait_sync(v);
	if (ret)
		return ret;
	for (uint32_t i = 0; i < v->n_sync; i++) {
		int32_t r = v->sync_res[i];
		if (r < 0 || (i == sb_index && r != (int32_t)BLK))
			return r < 0 ? r : -EIO;
		if (i != sb_index)
			v->st.syncs++;
	}
	if (v->failed) /* a linked data write failed: the chain was cancelled before the superblock */
		return v->failed;
	v->sb_slot = slot;
	v->mirrored = 0;
	v->st.commits++;
	return 0;
}

/* Before sealing `need` blocks: make sure their counters are covered by a durable
 * reservation (so no counter is ever used twice, even after a crash). */
static int reserve(struct dvs_shield_volume *v, uint64_t need)
{
	if (v->next_counter + need + SB_MARGIN <= v->nonce_limit)
		return 0;
	uint64_t limit = v->next_counter + need + SB_MARGIN + RESERVE_STEP;
	int ret = commit_superblock(v, v->epoch + 1, &v->committed_root, v->committed_size, limit,
				    COMMIT_STATE_DURABLE);
	if (ret) {
		v->failed = ret;
		return ret;
	}
	v->epoch++;
	v->nonce_limit = limit;
	v->st.reservations++;
	return 0;
}

/* ---- allocation and lifetime ---- */

uint64_t dvs_shield_arena_bytes(uint32_t read_slots, uint32_t write_slots)
{
	return (uint64_t)(2 + read_slots + write_slots) * BLK;
}

static int check_config(const struct dvs_shield_config *cfg)
{
	if (!cfg || cfg->read_slots < 1 || cfg->write_slots < 1 || cfg->write_slots > (1u << 24) ||
	    cfg->read_slots > (1u << 20) || !cfg->arena_addr || cfg->arena_addr % BLK ||
	    cfg->arena_len < dvs_shield_arena_bytes(cfg->read_slots, cfg->write_slots))
		return -EINVAL;
	return 0;
}

static struct dvs_shield_volume *alloc_volume(struct dvs_engine *e,
					      const struct dvs_shield_config *cfg)
{
	struct dvs_shield_volume *v = calloc(1, sizeof(*v));
	if (!v)
		return NULL;
	v->eng = e;
	v->file = cfg->file;
	v->arena = (uint8_t *)(uintptr_t)cfg->arena_addr;
	v->buf = (uint16_t)cfg->arena_buf;
	v->read_slots = cfg->read_slots;
	v->write_slots = cfg->write_slots;
	v->flags = cfg->flags;
	int cap = dvs_engine_max_in_flight(e);
	v->cap_done = cap > 0 ? (uint32_t)cap : 64;
	v->done = calloc(v->cap_done, sizeof(*v->done));
	v->wstate = calloc(v->write_slots, 1);
	v->wblock = calloc(v->write_slots, sizeof(uint64_t));
	v->wphys = calloc(v->write_slots, sizeof(uint64_t));
	v->scratch = aligned_alloc(64, BLK);
	v->plans = calloc(N_PLANS, sizeof(*v->plans));
	int plans_ok = v->plans != NULL;
	for (uint32_t i = 0; plans_ok && i < N_PLANS; i++)
		plans_ok = !plan_init(&v->plans[i], 0, v->read_slots);
	if (v->plans && !plans_ok) {
		for (uint32_t i = 0; i < N_PLANS; i++)
			plan_free(&v->plans[i]);
		free(v->plans);
		v->plans = NULL;
	}
	if (!v->done || !v->wstate || !v->wblock || !v->wphys || !v->scratch || !v->plans) {
		dvs_shield_close(v, 1);
		return NULL;
	}
	return v;
}

static int derive_keys(struct dvs_shield_volume *v, const uint8_t master[32],
		       const uint8_t volume_id[16], uint8_t key_check[16])
{
	/* one HKDF expansion: block key | key check | superblock (SIV) key */
	uint8_t keys[32 + 32 + 64];
	int ret = dvs_hkdf(master, 32, volume_id, 16, "dvs-shield v2 keys", keys, sizeof(keys));
	if (!ret) {
		memcpy(key_check, keys + 32, 16);
		memcpy(v->sb_key, keys + 64, 64);
		dvs_gcm_free(&v->gcm);
		ret = dvs_gcm_init(&v->gcm, keys);
	}
	dvs_wipe(keys, sizeof(keys));
	return ret;
}

static int check_kdf_params(uint32_t log2_n, uint32_t r, uint32_t p)
{
	if (log2_n < 10 || log2_n > 22 || r < 1 || r > 32 || p < 1 || p > 16)
		return -EINVAL;
	if ((128ULL * r << log2_n) > (1ULL << 30)) /* at most 1 GiB of scrypt memory */
		return -EINVAL;
	return 0;
}

/* The master key for a header's KDF, from what the caller holds. */
static int master_key(const struct dvs_shield_key *key, const struct dvs_shield_header *h,
		      uint8_t out[32])
{
	switch (key->kdf) {
	case DVS_KDF_RAW:
		if (h->kdf != DVS_KDF_RAW || key->secret_len != 32)
			return -EKEYREJECTED;
		memcpy(out, key->secret, 32);
		return 0;
	case DVS_KDF_SCRYPT:
		if (h->kdf != DVS_KDF_SCRYPT)
			return -EKEYREJECTED;
		return dvs_scrypt(key->secret, key->secret_len, h->kdf_salt, 32, h->scrypt_log2_n,
				  h->scrypt_r, h->scrypt_p, out);
	case DVS_KDF_DERIVED:
		if (h->kdf != DVS_KDF_SCRYPT || key->secret_len != 32 ||
		    CRYPTO_memcmp(key->salt, h->kdf_salt, 32) || key->scrypt_log2_n != h->scrypt_log2_n ||
		    key->scrypt_r != h->scrypt_r || key->scrypt_p != h->scrypt_p)
			return -EKEYREJECTED;
		memcpy(out, key->secret, 32);
		return 0;
	default:
		return -EINVAL;
	}
}

static void fill_status(struct dvs_shield_volume *v, struct dvs_shield_status *st)
{
	*st = v->st;
	memcpy(st->volume_id, v->header.volume_id, 16);
	st->epoch = v->epoch;
	st->size = v->size;
	st->capacity_blocks = v->capacity;
	st->next_counter = v->next_counter;
	st->nonce_limit = v->nonce_limit;
	st->levels = v->levels;
	st->kdf = v->header.kdf;
	st->cached_nodes = v->nodes.len;
	st->dirty_blocks = v->n_wdirty;
}

int dvs_shield_format(struct dvs_engine *e, const struct dvs_shield_key *key,
		      const struct dvs_shield_config *cfg, struct dvs_shield_volume **out,
		      struct dvs_shield_status *st)
{
	if (!e || !key || !out || check_config(cfg) || (cfg->flags & DVS_VOL_READONLY))
		return -EINVAL;
	struct dvs_shield_volume *v = alloc_volume(e, cfg);
	if (!v)
		return -ENOMEM;
	int ret = geometry(cfg->capacity_blocks, &v->levels, v->level_count, v->level_base,
			   &v->data_base);
	uint8_t master[32];
	struct sb_header *h = &v->header;
	memcpy(h->magic, MAGIC, 8);
	h->version = DVS_SHIELD_FORMAT_VERSION;
	h->block_size = BLK;
	h->levels = v->levels;
	h->capacity_blocks = cfg->capacity_blocks;
	h->meta_base = 2;
	h->data_base = v->data_base;
	v->capacity = cfg->capacity_blocks;
	if (!ret)
		ret = dvs_random(h->volume_id, 16);
	if (!ret) {
		switch (key->kdf) {
		case DVS_KDF_RAW:
			h->kdf = DVS_KDF_RAW;
			if (key->secret_len != 32)
				ret = -EINVAL;
			else
				memcpy(master, key->secret, 32);
			break;
		case DVS_KDF_SCRYPT:
		case DVS_KDF_DERIVED: {
			h->kdf = DVS_KDF_SCRYPT;
			h->scrypt_log2_n = key->scrypt_log2_n;
			h->scrypt_r = key->scrypt_r;
			h->scrypt_p = key->scrypt_p;
			ret = check_kdf_params(key->scrypt_log2_n, key->scrypt_r, key->scrypt_p);
			static const uint8_t zero[32];
			if (!ret && key->kdf == DVS_KDF_SCRYPT && !memcmp(key->salt, zero, 32))
				ret = dvs_random(h->kdf_salt, 32);
			else
				memcpy(h->kdf_salt, key->salt, 32);
			if (!ret && key->kdf == DVS_KDF_SCRYPT)
				ret = dvs_scrypt(key->secret, key->secret_len, h->kdf_salt, 32,
						 h->scrypt_log2_n, h->scrypt_r, h->scrypt_p, master);
			else if (!ret && key->secret_len == 32)
				memcpy(master, key->secret, 32);
			else if (!ret)
				ret = -EINVAL;
			break;
		}
		default:
			ret = -EINVAL;
		}
	}
	if (!ret)
		ret = derive_keys(v, master, h->volume_id, h->key_check);
	dvs_wipe(master, sizeof(master));
	uint8_t salt[4];
	if (!ret)
		ret = dvs_random(salt, 4);
	if (ret) {
		dvs_shield_close(v, 1);
		return ret;
	}
	memcpy(&v->salt, salt, 4);
	v->next_counter = 1;
	v->nonce_limit = RESERVE_STEP;
	v->flush_from = v->next_counter;
	/* Both copies of epoch 1, then a sync. LAZY_FORMAT skips the sync: the first flush
	 * makes the volume durable (a crash before leaves a file that is no volume yet -- fine
	 * for files that hold nothing before their first flush, like SQLite journals). */
	v->epoch = 1;
	v->n_sync = 0;
	ret = seal_superblock(v, 0, 1, &v->root, 0, v->nonce_limit, 0);
	if (!ret)
		ret = seal_superblock(v, 1, 1, &v->root, 0, v->nonce_limit, 0);
	int durable = !(cfg->flags & (DVS_VOL_LAZY_FORMAT | DVS_VOL_EPHEMERAL));
	if (!ret)
		ret = queue_sync(v, DVS_OP_WRITE, durable ? DVS_IO_LINK : 0, sbuf(v, 0), BLK, 0, NULL);
	if (!ret)
		ret = queue_sync(v, DVS_OP_WRITE, durable ? DVS_IO_LINK : 0, sbuf(v, 1), BLK, BLK, NULL);
	if (!ret && durable)
		ret = queue_sync(v, DVS_OP_FDATASYNC, 0, NULL, 0, 0, NULL);
	if (!ret)
		ret = wait_sync(v);
	for (uint32_t i = 0; !ret && i < v->n_sync; i++)
		if (v->sync_res[i] < 0 || (i < 2 && v->sync_res[i] != (int32_t)BLK))
			ret = v->sync_res[i] < 0 ? v->sync_res[i] : -EIO;
	if (ret) {
		dvs_shield_close(v, 1);
		return ret;
	}
	v->st.syncs += durable;
	v->sb_slot = 0;
	v->mirrored = 1;
	v->st.commits++;
	v->ready = 1;
	if (st)
		fill_status(v, st);
	*out = v;
	return 0;
}

int dvs_shield_parse_header(const uint8_t *block, uint64_t len, struct dvs_shield_header *out)
{
	if (!block || len < BLK)
		return -EINVAL;
	struct sb_header h;
	memcpy(&h, block, sizeof(h));
	if (memcmp(h.magic, MAGIC, 8))
		return -EMEDIUMTYPE;
	if (h.version != DVS_SHIELD_FORMAT_VERSION || h.block_size != BLK || h.slot > 1 ||
	    h.meta_base != 2 || h.reserved0)
		return -EBADMSG;
	for (size_t i = 0; i < sizeof(h.reserved); i++)
		if (h.reserved[i])
			return -EBADMSG;
	if (h.kdf == DVS_KDF_SCRYPT) {
		if (check_kdf_params(h.scrypt_log2_n, h.scrypt_r, h.scrypt_p))
			return -EBADMSG;
	} else if (h.kdf != DVS_KDF_RAW || h.scrypt_log2_n || h.scrypt_r || h.scrypt_p) {
		return -EBADMSG;
	}
	uint32_t levels;
	uint64_t count[MAX_LEVELS], base[MAX_LEVELS], data_base;
	if (geometry(h.capacity_blocks, &levels, count, base, &data_base) || levels != h.levels ||
	    data_base != h.data_base)
		return -EBADMSG;
	for (uint64_t i = SB_END; i < BLK; i++)
		if (block[i])
			return -EBADMSG;
	memset(out, 0, sizeof(*out));
	out->version = h.version;
	out->slot = h.slot;
	out->kdf = h.kdf;
	out->scrypt_log2_n = h.scrypt_log2_n;
	out->scrypt_r = h.scrypt_r;
	out->scrypt_p = h.scrypt_p;
	out->levels = h.levels;
	memcpy(out->kdf_salt, h.kdf_salt, 32);
	memcpy(out->volume_id, h.volume_id, 16);
	out->capacity_blocks = h.capacity_blocks;
	out->meta_base = h.meta_base;
	out->data_base = h.data_base;
	memcpy(out->seal_nonce, h.seal_nonce, sizeof(out->seal_nonce));
	return 0;
}

struct slot_view {
	int parse;      /* parse result */
	int auth;       /* 0: authenticated */
	struct dvs_shield_header h;
	struct sb_payload p;
};

static void drop_tree(struct dvs_shield_volume *v)
{
	uint64_t it = 0, key;
	void *val;
	while (u64map_next(&v->nodes, &it, &key, &val))
		free(val);
	u64map_free(&v->nodes);
	for (uint32_t l = 0; l < MAX_LEVELS; l++)
		v->dirty[l].n = 0;
}

static int read_chunk(struct dvs_shield_volume *v, const uint64_t *list, uint64_t first,
		      uint32_t n, uint8_t *out);

static int push_u64(uint64_t **a, uint64_t *n, uint64_t *cap, uint64_t x)
{
	if (*n == *cap) {
		uint64_t c = *cap ? *cap * 2 : 256;
		uint64_t *na = realloc(*a, c * sizeof(uint64_t));
		if (!na)
			return -ENOMEM;
		*a = na;
		*cap = c;
	}
	(*a)[(*n)++] = x;
	return 0;
}

/* Authenticate what the current state's last flush wrote: the nodes and blocks whose
 * counter is at least `from`. Counters only grow, so those are exactly the flush's writes,
 * and each hangs below a node the same flush rewrote: walk down from the root through
 * entries that new, one batch of reads per level, then read (and wipe) the new data
 * blocks. -EBADMSG: one of them is missing, torn or not what its parent names. */
static int verify_flush(struct dvs_shield_volume *v, uint64_t from, uint64_t *checked)
{
	if (!v->root.counter || v->root.counter < from)
		return 0; /* no node changed (the flush only set the size) */
	uint64_t *cur = NULL, *next = NULL, n = 0, m = 0, cap_cur = 0, cap_next = 0;
	uint8_t *buf = NULL;
	int ret = push_u64(&cur, &n, &cap_cur, 0);
	for (int l = (int)v->levels - 1; l >= 0 && !ret && n; l--) {
		ret = load_level(v, (uint32_t)l, cur, n);
		if (ret)
			break;
		*checked += n;
		uint64_t limit = l ? v->level_count[l - 1] : v->capacity;
		m = 0;
		for (uint64_t i = 0; i < n && !ret; i++) {
			const struct node *node = node_get(v, (uint32_t)l, cur[i]);
			for (uint32_t k = 0; k < FANOUT && !ret; k++) {
				const struct entry *e = &node->e[k];
				if (!e->counter || e->counter < from)
					continue;
				uint64_t child = cur[i] * FANOUT + k;
				if (child >= limit) {
					/* authentic but impossible: never trust it */
					set_fail(v, -EBADMSG, DVS_FAIL_META, (uint32_t)l, cur[i]);
					ret = -EBADMSG;
					break;
				}
				ret = push_u64(&next, &m, &cap_next, child);
			}
		}
		if (ret || l > 0) {
			uint64_t *t = cur, tc = cap_cur;
			cur = next;
			cap_cur = cap_next;
			n = m;
			next = t;
			cap_next = tc;
			continue;
		}
		/* level 0: next holds the data blocks the flush wrote */
		buf = aligned_alloc(64, (uint64_t)v->read_slots * BLK);
		if (!buf) {
			ret = -ENOMEM;
			break;
		}
		for (uint64_t done = 0; done < m && !ret;) {
			uint32_t chunk = (uint32_t)(m - done < v->read_slots ? m - done : v->read_slots);
			ret = read_chunk(v, next + done, 0, chunk, buf);
			done += chunk;
		}
		if (!ret)
			*checked += m;
		dvs_wipe(buf, (uint64_t)v->read_slots * BLK);
		n = 0;
	}
	free(buf);
	free(cur);
	free(next);
	return ret;
}

/* Take slot view c as the volume's state (keys, geometry, root). */
static int install_state(struct dvs_shield_volume *v, const struct slot_view *c, uint32_t slot,
			 const uint8_t master[32])
{
	memcpy(&v->header, sbuf(v, slot), sizeof(v->header));
	v->capacity = c->h.capacity_blocks;
	int ret = geometry(v->capacity, &v->levels, v->level_count, v->level_base, &v->data_base);
	if (!ret)
		ret = derive_keys(v, master, c->h.volume_id, v->header.key_check);
	v->epoch = c->p.epoch;
	v->root = v->committed_root = c->p.root;
	v->size = v->committed_size = c->p.size;
	v->sb_slot = slot;
	return ret;
}

int dvs_shield_open(struct dvs_engine *e, const struct dvs_shield_key *key,
		    const struct dvs_shield_config *cfg, struct dvs_shield_volume **out,
		    struct dvs_shield_status *st)
{
	if (!e || !key || !out || check_config(cfg))
		return -EINVAL;
	struct dvs_shield_volume *v = alloc_volume(e, cfg);
	if (!v)
		return -ENOMEM;
	int ret = 0;
	v->n_sync = 0;
	ret = queue_sync(v, DVS_OP_READ, 0, sbuf(v, 0), BLK, 0, NULL);
	if (!ret)
		ret = queue_sync(v, DVS_OP_READ, 0, sbuf(v, 1), BLK, BLK, NULL);
	if (!ret)
		ret = wait_sync(v);
	if (ret) {
		dvs_shield_close(v, 1);
		return ret;
	}
	struct slot_view sv[2];
	uint8_t master[32], prev_master[32];
	struct dvs_shield_header prev_h;
	int have_prev = 0, key_rejected = 0;
	for (uint32_t s = 0; s < 2; s++) {
		memset(&sv[s], 0, sizeof(sv[s]));
		sv[s].auth = -EBADMSG;
		if (v->sync_res[s] != (int32_t)BLK) {
			sv[s].parse = v->sync_res[s] < 0 ? v->sync_res[s] : -EMEDIUMTYPE;
			continue;
		}
		sv[s].parse = dvs_shield_parse_header(sbuf(v, s), BLK, &sv[s].h);
		if (sv[s].parse)
			continue;
		const struct dvs_shield_header *h = &sv[s].h;
		/* scrypt is slow: both slots normally share salt and parameters */
		int same = have_prev && prev_h.kdf == h->kdf &&
			   !memcmp(prev_h.kdf_salt, h->kdf_salt, 32) &&
			   prev_h.scrypt_log2_n == h->scrypt_log2_n && prev_h.scrypt_r == h->scrypt_r &&
			   prev_h.scrypt_p == h->scrypt_p;
		int kret = same ? 0 : master_key(key, h, master);
		if (same)
			memcpy(master, prev_master, 32);
		if (kret) {
			if (kret == -EKEYREJECTED)
				key_rejected = 1;
			sv[s].auth = kret;
			continue;
		}
		memcpy(prev_master, master, 32);
		prev_h = *h;
		have_prev = 1;
		uint8_t check[16];
		const struct sb_header *raw = (const struct sb_header *)sbuf(v, s);
		memcpy(v->header.volume_id, h->volume_id, 16);
		if (derive_keys(v, master, h->volume_id, check)) {
			sv[s].auth = -EIO;
			continue;
		}
		if (CRYPTO_memcmp(check, raw->key_check, 16)) {
			key_rejected = 1;
			sv[s].auth = -EKEYREJECTED;
			continue;
		}
		sv[s].auth = dvs_siv_open(v->sb_key, sbuf(v, s), 256, sbuf(v, s) + 256,
					  (uint8_t *)&sv[s].p, sizeof(sv[s].p),
					  sbuf(v, s) + SB_TAG_OFF);
		if (!sv[s].auth && sv[s].h.slot != s)
			sv[s].auth = -EBADMSG; /* a slot copied over the other */
	}
	int good[2] = { !sv[0].parse && !sv[0].auth, !sv[1].parse && !sv[1].auth };
	uint32_t damage = (good[0] ? 0 : 1u) | (good[1] ? 0 : 2u);
	if (!good[0] && !good[1]) {
		if (sv[0].parse == -EMEDIUMTYPE && sv[1].parse == -EMEDIUMTYPE)
			ret = -EMEDIUMTYPE;
		else if (key_rejected)
			ret = -EKEYREJECTED;
		else
			ret = -EBADMSG;
		set_fail(v, ret, DVS_FAIL_SUPERBLOCK, 0, 0);
	} else if (good[0] && good[1] &&
		   (memcmp(sv[0].h.volume_id, sv[1].h.volume_id, 16) ||
		    sv[0].h.capacity_blocks != sv[1].h.capacity_blocks ||
		    (sv[0].p.epoch == sv[1].p.epoch &&
		     (memcmp(&sv[0].p.root, &sv[1].p.root, sizeof(struct entry)) ||
		      sv[0].p.size != sv[1].p.size)))) {
		/* two authentic slots that cannot both be states of this volume */
		ret = -EBADMSG;
		set_fail(v, ret, DVS_FAIL_SUPERBLOCK, 0, 1);
	}
	for (uint32_t s = 0; s < 2 && !ret; s++) {
		const struct sb_payload *p = &sv[s].p;
		if (good[s] && (p->root.flags & ~1u || p->flags & ~SB_UNSYNCED ||
				p->size > sv[s].h.capacity_blocks * BLK)) {
			/* authentic yet malformed: nothing this code writes */
			ret = -EBADMSG;
			set_fail(v, ret, DVS_FAIL_SUPERBLOCK, 0, s);
		}
	}
	if (!ret && cfg->have_anchor &&
	    memcmp(cfg->anchor.volume_id, sv[good[0] ? 0 : 1].h.volume_id, 16)) {
		ret = -EXDEV;
		set_fail(v, ret, DVS_FAIL_ROLLBACK, 0, 0);
	}
	/* Candidates, newest first; of two copies of one epoch the one that needs no checking
	 * (a mirror written after its state was durable). An UNSYNCED one is trusted only once
	 * every write of its flush authenticates; else the previous state is served. */
	uint32_t order[2], n_cand = 0;
	for (uint32_t s = 0; s < 2; s++)
		if (good[s])
			order[n_cand++] = s;
	if (n_cand == 2) {
		const struct sb_payload *a = &sv[0].p, *b = &sv[1].p;
		int second_first = b->epoch > a->epoch ||
				   (b->epoch == a->epoch && (a->flags & SB_UNSYNCED) &&
				    !(b->flags & SB_UNSYNCED));
		if (second_first) {
			order[0] = 1;
			order[1] = 0;
		}
	}
	int use = -1;
	for (uint32_t i = 0; i < n_cand && !ret; i++) {
		uint32_t s = order[i];
		ret = install_state(v, &sv[s], s, master);
		if (ret || !(sv[s].p.flags & SB_UNSYNCED)) {
			use = (int)s;
			break;
		}
		uint64_t checked = 0;
		ret = verify_flush(v, sv[s].p.flush_from, &checked);
		v->st.open_verified += checked;
		if (ret == -EBADMSG) {
			/* the flush did not complete (or its blocks were tampered with) */
			damage |= 1u << s;
			if (!v->st.torn_epoch)
				v->st.torn_epoch = sv[s].p.epoch;
			drop_tree(v);
			set_fail(v, 0, DVS_FAIL_NONE, 0, 0);
			ret = 0;
			continue;
		}
		if (!ret)
			use = (int)s;
		break;
	}
	dvs_wipe(prev_master, sizeof(prev_master));
	dvs_wipe(master, sizeof(master));
	if (!ret && use < 0) {
		/* no state whose writes are all there: a volume whose first flush never
		 * completed (lazily formatted, the other slot never written) */
		if (cfg->have_anchor)
			ret = -ESTALE;
		else if (sv[0].parse == -EMEDIUMTYPE || sv[1].parse == -EMEDIUMTYPE)
			ret = -EMEDIUMTYPE;
		else
			ret = -EBADMSG;
		set_fail(v, ret, ret == -ESTALE ? DVS_FAIL_ROLLBACK : DVS_FAIL_SUPERBLOCK, 0,
			 v->st.torn_epoch);
	}
	if (!ret && damage && (cfg->flags & DVS_VOL_STRICT)) {
		ret = -EBADMSG;
		set_fail(v, ret, DVS_FAIL_SUPERBLOCK, 0, (damage & 1) ? 0 : 1);
	}
	if (!ret && cfg->have_anchor) {
		const struct dvs_shield_anchor *a = &cfg->anchor;
		const struct slot_view *c = &sv[use];
		if (c->p.epoch < a->epoch ||
		    (c->p.epoch == a->epoch &&
		     (memcmp(a->root, &c->p.root, 32) || a->size != c->p.size))) {
			ret = -ESTALE;
			set_fail(v, ret, DVS_FAIL_ROLLBACK, 0, c->p.epoch);
		}
	}
	uint8_t salt[4];
	if (!ret)
		ret = dvs_random(salt, 4);
	if (ret) {
		v->st.superblock_damage = damage;
		if (st)
			fill_status(v, st);
		dvs_wipe(sv, sizeof(sv));
		dvs_shield_close(v, 1);
		return ret;
	}
	memcpy(&v->salt, salt, 4);
	/* continue above every reservation seen, also one whose flush is discarded */
	uint64_t limit = 0;
	for (uint32_t s = 0; s < 2; s++)
		if (good[s] && sv[s].p.nonce_limit > limit)
			limit = sv[s].p.nonce_limit;
	v->next_counter = v->nonce_limit = limit;
	v->flush_from = v->next_counter;
	v->st.superblock_slot = (uint32_t)use;
	v->st.superblock_damage = damage;
	uint32_t other = (uint32_t)use ^ 1;
	v->mirrored = good[other] && !(damage & (1u << other)) &&
		      sv[other].p.epoch == sv[use].p.epoch &&
		      !memcmp(&sv[other].p.root, &sv[use].p.root, sizeof(struct entry)) &&
		      sv[other].p.size == sv[use].p.size;
	int unsynced = (sv[use].p.flags & SB_UNSYNCED) != 0;
	dvs_wipe(sv, sizeof(sv));
	if (unsynced && !(cfg->flags & (DVS_VOL_READONLY | DVS_VOL_EPHEMERAL))) {
		/* what the open found may sit in the page cache only (the writer was killed
		 * before its sync): make it durable before a flush overwrites the older state */
		v->n_sync = 0;
		ret = queue_sync(v, DVS_OP_FDATASYNC, 0, NULL, 0, 0, NULL);
		if (!ret)
			ret = wait_sync(v);
		if (!ret && v->sync_res[0] < 0)
			ret = v->sync_res[0];
		if (ret) {
			dvs_shield_close(v, 1);
			return ret;
		}
		v->st.syncs++;
	}
	v->ready = 1;
	if (st)
		fill_status(v, st);
	*out = v;
	return 0;
}

/* ---- reads ---- */

#define BLOCK_AT(list, first, j) ((list) ? (list)[j] : (first) + (j))

/* Blocks that need no disk read are noted for plan_serve (never written: zeros; waiting
 * in a write slot: opened from there); the rest are queued as coalesced reads into
 * staging. The leaves must be loaded (ensure_leaves) before: node loads use staging. */
static int plan_queue(struct dvs_shield_volume *v, struct read_plan *p, uint32_t id,
		      const uint64_t *list, uint64_t first, uint32_t n, uint8_t flags)
{
	int ret;
	p->staged = p->n_req = p->pending = p->n_served = 0;
	p->list = list;
	p->first = first;
	p->n = n;
	p->out = NULL;
	struct dvs_io *last = NULL;
	for (uint32_t j = 0; j < n; j++) {
		uint64_t b = BLOCK_AT(list, first, j);
		struct entry *e = data_entry(v, b, NULL);
		if (!e->counter || u64map_get(&v->dirty_blocks, b)) {
			p->served[p->n_served++] = j;
			continue;
		}
		uint64_t phys = data_phys(v, b, e->flags & 1);
		uint8_t *dst = stage(v, p->base + p->staged);
		if (last && last->offset + last->len == phys * BLK && last->len < MAX_RUN * BLK &&
		    last->addr + last->len == (uint64_t)(uintptr_t)dst) {
			last->len += BLK;
		} else {
			ret = queue_io(v, DVS_OP_READ, flags, dst, BLK, phys * BLK,
				       UD(UD_PLAN, ((uint64_t)id << 24) | p->n_req));
			if (ret)
				return ret;
			last = &v->ios[v->n_ios - 1];
			p->req_first[p->n_req] = p->staged;
			p->res[p->n_req] = -EINPROGRESS;
			p->n_req++;
		}
		p->stage_of[p->staged++] = j;
	}
	p->pending = p->n_req;
	return 0;
}

/* Serve the plan's blocks that need no disk read into out (the caller's buffer). */
static int plan_serve(struct dvs_shield_volume *v, struct read_plan *p, uint8_t *out)
{
	p->out = out;
	for (uint32_t i = 0; i < p->n_served; i++) {
		uint32_t j = p->served[i];
		uint64_t b = BLOCK_AT(p->list, p->first, j);
		struct entry *e = data_entry(v, b, NULL);
		void *ws = e->counter ? u64map_get(&v->dirty_blocks, b) : NULL;
		if (!ws) {
			memset(out + (uint64_t)j * BLK, 0, BLK);
			continue;
		}
		int ret = open_block(v, KIND_DATA, 0, b, e, wslot(v, (uint32_t)((uintptr_t)ws - 1)),
				     out + (uint64_t)j * BLK);
		if (ret)
			return ret;
	}
	return 0;
}

static int plan_read(struct dvs_shield_volume *v, struct read_plan *p, uint32_t id,
		     const uint64_t *list, uint64_t first, uint32_t n, uint8_t *out, uint8_t flags)
{
	int ret = ensure_leaves(v, list, first, n);
	if (!ret)
		ret = plan_queue(v, p, id, list, first, n, flags);
	if (!ret)
		ret = plan_serve(v, p, out);
	return ret;
}

static int plan_wait(struct dvs_shield_volume *v, struct read_plan *p)
{
	int ret = submit_and_wait(v, p->pending);
	while (!ret && p->pending) {
		int n = pump(v, p->pending);
		if (n < 0)
			ret = n;
	}
	return ret;
}

struct open_job {
	struct dvs_shield_volume *v;
	struct read_plan *p;
};

/* Staged block u of a plan (read-only lookups: the tree does not change during a job). */
static int open_item(void *arg, struct dvs_gcm *g, uint32_t u)
{
	struct open_job *job = arg;
	struct read_plan *p = job->p;
	uint32_t j = p->stage_of[u];
	uint64_t b = BLOCK_AT(p->list, p->first, j);
	return open_data_with(job->v, g, b, data_entry(job->v, b, NULL),
			      stage(job->v, p->base + u), p->out + (uint64_t)j * BLK);
}

/* Check every request came back whole, then authenticate and decrypt into the caller's
 * buffer, straight out of staging (sharing the work with the pool's helper for a large
 * plan); every block is checked before the call returns, and a failure wipes the whole
 * output in read_blocks. */
static int plan_finish(struct dvs_shield_volume *v, struct read_plan *p)
{
	for (uint32_t k = 0; k < p->n_req; k++) {
		uint32_t from = p->req_first[k];
		uint32_t to = k + 1 < p->n_req ? p->req_first[k + 1] : p->staged;
		int32_t res = p->res[k];
		if (res < 0)
			return res;
		if ((uint32_t)res != (to - from) * BLK) {
			/* blocks missing from the file (truncated): they cannot authenticate */
			uint64_t b = BLOCK_AT(p->list, p->first, p->stage_of[from + (uint32_t)res / BLK]);
			set_fail(v, -EBADMSG, DVS_FAIL_DATA, 0, b);
			return -EBADMSG;
		}
	}
	v->st.blocks_read += p->staged;
	struct dvs_crypto_pool *pool = p->staged >= PAR_MIN ? crypto_pool(v) : NULL;
	if (pool) {
		struct open_job job = { v, p };
		uint32_t bad = 0;
		int ret = dvs_pool_run(pool, &v->gcm, open_item, &job, p->staged, &bad);
		v->st.blocks_opened += p->staged;
		if (ret == -EBADMSG)
			set_fail(v, ret, DVS_FAIL_DATA, 0, BLOCK_AT(p->list, p->first, p->stage_of[bad]));
		return ret;
	}
	for (uint32_t u = 0; u < p->staged; u++) {
		uint32_t j = p->stage_of[u];
		uint64_t b = BLOCK_AT(p->list, p->first, j);
		int ret = open_block(v, KIND_DATA, 0, b, data_entry(v, b, NULL),
				     stage(v, p->base + u), p->out + (uint64_t)j * BLK);
		if (ret)
			return ret;
	}
	return 0;
}

/* Read blocks (a list, or first..first+n-1) into out; n <= read_slots. */
static int read_chunk(struct dvs_shield_volume *v, const uint64_t *list, uint64_t first,
		      uint32_t n, uint8_t *out)
{
	struct read_plan *p = &v->plans[0];
	p->base = 0;
	p->cap = v->read_slots;
	int ret = plan_read(v, p, 0, list, first, n, out, 0);
	if (!ret)
		ret = plan_wait(v, p);
	if (!ret)
		ret = plan_finish(v, p);
	return ret;
}

/* A long sequential read as a pipeline over N_PLANS stages of the staging area: while
 * one stage's blocks are decrypted, the transfers of the others are in flight, and a
 * stage is refilled with the next chunk as soon as it is decrypted. On a buffered file the
 * transfers go to a kernel worker (IOSQE_ASYNC), so the page-cache copy runs on another
 * CPU than AES-GCM; on an O_DIRECT file the device does the transfer and needs no worker. */
/* Let the readahead's transfers land and forget it: before anything that uses staging or
 * changes what the volume holds. Its staging holds ciphertext only; nothing of it was
 * opened. */
static void ra_drop(struct dvs_shield_volume *v)
{
	if (!v->ra_n)
		return;
	v->ra_n = 0;
	for (uint32_t s = 0; s < N_PLANS && v->eng; s++)
		while (v->plans[s].pending && v->outstanding)
			if (pump(v, 1) < 0)
				return;
}

/* Queue the stages of [first, first+n) and serve what needs no disk read into out, stage
 * by stage before anything is submitted: a completing write-back (reaped while
 * submitting) takes a block out of its write slot, and the plan chose to open it there. */
static int queue_stages(struct dvs_shield_volume *v, uint64_t first, uint32_t n, uint32_t *live,
			uint32_t *issued, uint8_t *out)
{
	uint32_t size = v->read_slots / N_PLANS;
	uint8_t flags = (v->flags & DVS_VOL_DIRECT) ? 0 : DVS_IO_ASYNC;
	int ret = 0;
	*live = *issued = 0;
	for (uint32_t s = 0; s < N_PLANS && *issued < n && !ret; s++) {
		uint32_t c = n - *issued < size ? n - *issued : size;
		v->plans[s].base = s * size;
		ret = plan_queue(v, &v->plans[s], s, NULL, first + *issued, c, flags);
		if (!ret)
			ret = plan_serve(v, &v->plans[s], out + (uint64_t)*issued * BLK);
		*issued += c;
		(*live)++;
	}
	return ret ? ret : submit_queued(v);
}

/* Sequential readahead: after two adjacent large reads, each stage that the current call
 * has decrypted is refilled at once with its part of the next range of the same size (its
 * ciphertext only), so that range's transfers overlap this call's AES-GCM and the
 * caller's turnaround, and the next call finds them landed. Allowed only while nothing is
 * written back (no dirty or in-flight write slot, no partial block): then nothing can
 * change what the plans chose until a call that drops the readahead first. */
static int ra_allowed(const struct dvs_shield_volume *v, uint64_t first, uint32_t n)
{
	return !(v->flags & DVS_VOL_NO_READAHEAD) && first <= v->capacity &&
	       n <= v->capacity - first && n <= v->read_slots && !v->n_wdirty &&
	       !v->n_winflight && !v->part_dirty && !v->failed && v->eng;
}

/* Load the leaves of the read-ahead range (through staging slots from 0: called when stage
 * 0 was just decrypted, and a range of at most read_slots blocks needs fewer nodes than a
 * stage has slots). A failure is not this call's: the range is read again, and any error
 * reported then, by the call that asks for it. */
static int ra_leaves(struct dvs_shield_volume *v, uint64_t first, uint32_t n)
{
	struct dvs_shield_status saved = v->st;
	if (!ensure_leaves(v, NULL, first, n))
		return 1;
	v->st.fail_code = saved.fail_code;
	v->st.fail_kind = saved.fail_kind;
	v->st.fail_level = saved.fail_level;
	v->st.fail_index = saved.fail_index;
	return 0;
}

static int read_pipelined(struct dvs_shield_volume *v, uint64_t first, uint32_t n, uint8_t *out)
{
	uint32_t size = v->read_slots / N_PLANS;
	uint8_t flags = (v->flags & DVS_VOL_DIRECT) ? 0 : DVS_IO_ASYNC;
	int ret = 0, ahead = v->seq_next == first && ra_allowed(v, first + n, n);
	/* O_DIRECT: a stage's part of the next range is queued as soon as the stage is
	 * decrypted: the device then serves them in order and stage 0 lands first (queued
	 * together, the virtual disk here finishes all four at once, and nothing overlaps;
	 * measured: 1.36x wall-clock, +2.3 io_uring_enter per MiB). Buffered: the kernel
	 * worker copies from the page cache far faster than AES-GCM, so all stages are queued
	 * together after the last one (no extra syscall; the turnaround overlaps). */
	int per_stage = (v->flags & DVS_VOL_DIRECT) != 0;
	uint32_t issued = 0, live = 0, head = 0, ra_live = 0, ra_issued = 0;
	if (v->ra_n && v->ra_first == first && v->ra_n == n) {
		/* the readahead queued these stages (or the first ones of them); nothing was
		 * written since (ra_allowed), so what they serve without a disk read is still
		 * what it was: zeros */
		v->ra_n = 0;
		live = v->ra_live;
		issued = v->ra_issued;
		for (uint32_t s = 0; s < live && !ret; s++)
			ret = plan_serve(v, &v->plans[s], out + (uint64_t)s * size * BLK);
	} else {
		ra_drop(v);
		/* tree nodes load through the staging area too: load them all before the
		 * pipeline starts, so no node read lands in a stage that holds data in flight */
		ret = ensure_leaves(v, NULL, first, n);
		if (!ret)
			ret = queue_stages(v, first, n, &live, &issued, out);
	}
	while (!ret && live) {
		struct read_plan *p = &v->plans[head];
		ret = plan_wait(v, p);
		if (!ret)
			ret = plan_finish(v, p);
		live--;
		if (!ret && issued < n) {
			uint32_t c = n - issued < size ? n - issued : size;
			ret = plan_read(v, p, head, NULL, first + issued, c,
					out + (uint64_t)issued * BLK, flags);
			issued += c;
			live++;
			if (!ret)
				ret = submit_queued(v);
		} else if (!ret && ahead && ra_issued < n &&
			   (per_stage ? head == ra_live : live == 0)) {
			/* stage k of the next range goes to stage k, as queue_stages lays it out */
			if (!ra_live)
				ahead = ra_leaves(v, first + n, n);
			while (ahead && ra_issued < n && !ret) {
				/* queued only: the next stage's wait carries it in the same
				 * io_uring_enter (the last one is submitted below) */
				uint32_t c = n - ra_issued < size ? n - ra_issued : size;
				ret = plan_queue(v, &v->plans[ra_live], ra_live, NULL,
						 first + n + ra_issued, c, flags);
				ra_issued += c;
				ra_live++;
				if (per_stage)
					break;
			}
		}
		head = (head + 1) % N_PLANS;
	}
	if (ret) {
		/* let the other stages' transfers land before the staging area is reused */
		v->n_ios = 0;
		for (uint32_t s = 0; s < N_PLANS; s++)
			while (v->plans[s].pending && v->outstanding)
				if (pump(v, 1) < 0)
					return ret;
		return ret;
	}
	if (ra_live && (ret = submit_queued(v))) {
		v->ra_n = n;
		ra_drop(v);
		return 0; /* this call's data is complete; the readahead is not its business */
	}
	if (ra_live) {
		v->ra_first = first + n;
		v->ra_n = n;
		v->ra_live = ra_live;
		v->ra_issued = ra_issued;
	}
	return 0;
}

static int part_seal(struct dvs_shield_volume *v);
static void part_forget(struct dvs_shield_volume *v);

static int read_blocks(struct dvs_shield_volume *v, uint64_t first, uint32_t n, uint8_t *out)
{
	if (first > v->capacity || n > v->capacity - first)
		return -EINVAL;
	int ret = 0;
	if (n > v->read_slots / N_PLANS && v->read_slots >= 4 * N_PLANS) {
		ret = read_pipelined(v, first, n, out);
	} else {
		ra_drop(v);
		for (uint32_t done = 0; done < n && !ret;) {
			uint32_t chunk = n - done < v->read_slots ? n - done : v->read_slots;
			ret = read_chunk(v, NULL, first + done, chunk, out + (uint64_t)done * BLK);
			done += chunk;
		}
	}
	v->seq_next = ret ? UINT64_MAX : first + n;
	if (ret) {
		/* all or nothing: no partial plaintext from a failing call */
		dvs_wipe(out, (uint64_t)n * BLK);
		return ret;
	}
	return (int)n;
}

int dvs_shield_read_blocks(struct dvs_shield_volume *v, uint64_t first, uint32_t n, uint8_t *out)
{
	int ret = part_seal(v);
	return ret ? ret : read_blocks(v, first, n, out);
}

int dvs_shield_read_list(struct dvs_shield_volume *v, const uint64_t *blocks, uint32_t n,
			 uint8_t *out)
{
	ra_drop(v);
	int ret = part_seal(v);
	if (ret)
		return ret;
	for (uint32_t i = 0; i < n; i++)
		if (blocks[i] >= v->capacity)
			return -EINVAL;
	for (uint32_t done = 0; done < n;) {
		uint32_t chunk = n - done < v->read_slots ? n - done : v->read_slots;
		ret = read_chunk(v, blocks + done, 0, chunk, out + (uint64_t)done * BLK);
		if (ret) {
			dvs_wipe(out, (uint64_t)n * BLK);
			return ret;
		}
		done += chunk;
	}
	return (int)n;
}

/* ---- writes ---- */

static int seal_item(void *arg, struct dvs_gcm *g, uint32_t i)
{
	struct dvs_shield_volume *v = arg;
	struct seal_item *it = &v->seals[i];
	return seal_data_with(v, g, it->block, it->e, it->in, it->out);
}

/* Seal the blocks write_chunk assigned (on both cores). Their write slots are DIRTY but
 * nothing submits them before this returns: write_chunk calls it before anything that
 * may submit (alloc_wslot when no slot is free) or reuse a slot (a rewrite). */
static int seal_pending(struct dvs_shield_volume *v)
{
	uint32_t n = v->n_seals;
	v->n_seals = 0;
	if (!n)
		return 0;
	v->st.blocks_sealed += n;
	return dvs_pool_run(v->pool, &v->gcm, seal_item, v, n, NULL);
}

static int write_chunk(struct dvs_shield_volume *v, const uint64_t *list, uint64_t first,
		       uint32_t n, const uint8_t *in)
{
	int ret = ensure_leaves(v, list, first, n);
	if (!ret)
		ret = reserve(v, n);
	int shared = n >= PAR_MIN && crypto_pool(v);
	for (uint32_t j = 0; j < n && !ret; j++) {
		uint64_t b = BLOCK_AT(list, first, j);
		void *ws = u64map_get(&v->dirty_blocks, b);
		if (v->n_seals && (ws || v->n_wdirty + v->n_winflight >= v->write_slots)) {
			ret = seal_pending(v);
			if (ret)
				break;
		}
		if (ws && v->wstate[(uintptr_t)ws - 1] == W_INFLIGHT) {
			/* two writes of one block must not race: let the first finish */
			while (!ret && u64map_get(&v->dirty_blocks, b))
				ret = pump(v, 1) < 0 ? -EIO : v->failed;
			ws = NULL;
		}
		int slot = ws ? (int)((uintptr_t)ws - 1) : alloc_wslot(v);
		if (ret || slot < 0) {
			ret = ret ? ret : slot;
			break;
		}
		struct node *leaf;
		struct entry *e = data_entry(v, b, &leaf);
		struct entry ne;
		memset(&ne, 0, sizeof(ne));
		ne.flags = choose_data_slot(leaf, (uint32_t)(b % FANOUT));
		ne.counter = v->next_counter++;
		ne.salt = v->salt;
		if (shared) {
			*e = ne; /* the tag follows in seal_pending */
			v->seals[v->n_seals++] = (struct seal_item){ in + (uint64_t)j * BLK,
								     wslot(v, (uint32_t)slot), e, b };
		} else {
			ret = seal_block(v, KIND_DATA, 0, b, &ne, in + (uint64_t)j * BLK,
					 wslot(v, (uint32_t)slot));
			if (ret)
				break;
			*e = ne;
		}
		ret = mark_dirty(v, leaf);
		if (!ws) {
			v->wstate[slot] = W_DIRTY;
			v->wblock[slot] = b;
			v->n_wdirty++;
			if (!ret)
				ret = u64map_put(&v->dirty_blocks, b, (void *)((uintptr_t)slot + 1));
		}
		v->wphys[slot] = data_phys(v, b, ne.flags & 1);
	}
	int sealed = seal_pending(v);
	return ret ? ret : sealed;
}

static int write_range(struct dvs_shield_volume *v, uint64_t first, uint64_t n, const uint8_t *in,
		       uint32_t flags)
{
	if (v->flags & DVS_VOL_READONLY)
		return -EROFS;
	if (v->failed)
		return v->failed;
	if (first > v->capacity || n > v->capacity - first)
		return -EFBIG;
	int ret = 0;
	for (uint64_t done = 0; done < n && !ret;) {
		uint32_t chunk = (uint32_t)(n - done < v->write_slots ? n - done : v->write_slots);
		ret = write_chunk(v, NULL, first + done, chunk, in + done * BLK);
		done += chunk;
	}
	if (!ret && ((flags & DVS_WRITE_SUBMIT) || v->n_wdirty >= v->write_slots / 2))
		ret = submit_dirty(v);
	if (ret && !v->failed)
		v->failed = ret;
	return ret;
}

int dvs_shield_write_list(struct dvs_shield_volume *v, const uint64_t *blocks, uint32_t n,
			  const uint8_t *in, uint32_t flags)
{
	ra_drop(v);
	if (v->flags & DVS_VOL_READONLY)
		return -EROFS;
	if (v->failed)
		return v->failed;
	uint64_t end = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (blocks[i] >= v->capacity)
			return -EFBIG;
		if (blocks[i] + 1 > end)
			end = blocks[i] + 1;
	}
	int ret = part_seal(v);
	for (uint32_t i = 0; i < n && v->part_valid; i++)
		if (blocks[i] == v->part_block)
			part_forget(v);
	for (uint32_t done = 0; done < n && !ret;) {
		uint32_t chunk = n - done < v->write_slots ? n - done : v->write_slots;
		ret = write_chunk(v, blocks + done, 0, chunk, in + (uint64_t)done * BLK);
		done += chunk;
	}
	if (!ret && ((flags & DVS_WRITE_SUBMIT) || v->n_wdirty >= v->write_slots / 2))
		ret = submit_dirty(v);
	if (ret) {
		if (!v->failed)
			v->failed = ret;
		return ret;
	}
	if (end * BLK > v->size) {
		v->size = end * BLK;
		v->tree_dirty = 1;
	}
	return (int)n;
}

int dvs_shield_write_blocks(struct dvs_shield_volume *v, uint64_t first, uint32_t n,
			    const uint8_t *in, uint32_t flags)
{
	ra_drop(v);
	int ret = part_seal(v);
	if (!ret && v->part_valid && v->part_block >= first && v->part_block - first < n)
		part_forget(v);
	if (!ret)
		ret = write_range(v, first, n, in, flags);
	if (ret)
		return ret;
	if ((first + n) * BLK > v->size) {
		v->size = (first + n) * BLK;
		v->tree_dirty = 1;
	}
	return (int)n;
}

/* ---- byte-granular access (for the SQLite VFS) ----
 * Bytes that do not cover a whole block go through one plaintext block kept in trusted
 * memory (scratch): a partial write merges into it instead of decrypting, merging and
 * sealing the block each time, and a partial read is served from it. SQLite's journal is
 * written as records of 4 + page + 4 bytes, so nearly every journal write is partial, and
 * every lock acquisition reads 16 bytes of the database header; with the block kept, an
 * appended record costs one seal when its block is complete, and a header re-read costs
 * nothing. The block is sealed (part_seal) before a flush, a truncation, and any
 * block-level call, so those see it as written; its plaintext is wiped when it leaves. */

static void part_forget(struct dvs_shield_volume *v)
{
	if (v->part_valid)
		dvs_wipe(v->scratch, BLK);
	v->part_valid = v->part_dirty = 0;
}

/* Seal the partial block if it holds unsealed bytes (it stays valid, now clean). */
static int part_seal(struct dvs_shield_volume *v)
{
	if (!v->part_dirty)
		return 0;
	v->part_dirty = 0;
	int ret = write_range(v, v->part_block, 1, v->scratch, 0);
	if (ret)
		part_forget(v);
	return ret;
}

/* Make block b the partial block: the old one sealed, b's plaintext loaded. */
static int part_load(struct dvs_shield_volume *v, uint64_t b)
{
	if (v->part_valid && v->part_block == b)
		return 0;
	int ret = part_seal(v);
	part_forget(v);
	if (!ret)
		ret = read_blocks(v, b, 1, v->scratch);
	if (ret < 0)
		return ret;
	v->part_block = b;
	v->part_valid = 1;
	return 0;
}

int64_t dvs_shield_pread(struct dvs_shield_volume *v, uint8_t *buf, uint64_t len, uint64_t off)
{
	ra_drop(v);
	if (off >= v->size || !len)
		return 0;
	if (len > v->size - off)
		len = v->size - off;
	uint64_t done = 0;
	while (done < len) {
		uint64_t pos = off + done;
		uint64_t b = pos / BLK;
		uint32_t in_block = (uint32_t)(pos % BLK);
		uint64_t left = len - done;
		int ret;
		if (in_block == 0 && left >= BLK && !(v->part_valid && v->part_block == b)) {
			uint64_t whole = left / BLK;
			if (whole > 1024)
				whole = 1024;
			if (v->part_valid && v->part_block > b && v->part_block - b < whole)
				whole = v->part_block - b; /* stop before it: it is served from memory */
			ret = read_blocks(v, b, (uint32_t)whole, buf + done);
			if (ret < 0) {
				dvs_wipe(buf, len);
				return ret;
			}
			done += whole * BLK;
			continue;
		}
		ret = part_load(v, b);
		if (ret < 0) {
			dvs_wipe(buf, len);
			return ret;
		}
		uint64_t take = BLK - in_block < left ? BLK - in_block : left;
		memcpy(buf + done, v->scratch + in_block, take);
		done += take;
	}
	return (int64_t)len;
}

int64_t dvs_shield_pwrite(struct dvs_shield_volume *v, const uint8_t *buf, uint64_t len,
			  uint64_t off)
{
	ra_drop(v);
	if (v->flags & DVS_VOL_READONLY)
		return -EROFS;
	if (v->failed)
		return v->failed;
	if (!len)
		return 0;
	if (off > v->capacity * BLK || len > v->capacity * BLK - off)
		return -EFBIG;
	uint64_t done = 0;
	while (done < len) {
		uint64_t pos = off + done;
		uint64_t b = pos / BLK;
		uint32_t in_block = (uint32_t)(pos % BLK);
		uint64_t left = len - done;
		int ret;
		if (in_block == 0 && left >= BLK) {
			uint64_t whole = left / BLK;
			if (v->part_valid && v->part_block >= b && v->part_block - b < whole)
				part_forget(v); /* overwritten whole: its bytes are superseded */
			ret = write_range(v, b, whole, buf + done, 0);
			if (ret)
				return ret;
			done += whole * BLK;
			continue;
		}
		/* a partial block: merge into the plaintext block, seal it later */
		ret = part_load(v, b);
		if (ret < 0)
			return ret;
		uint64_t take = BLK - in_block < left ? BLK - in_block : left;
		memcpy(v->scratch + in_block, buf + done, take);
		v->part_dirty = 1;
		done += take;
	}
	if (off + len > v->size) {
		v->size = off + len;
		v->tree_dirty = 1;
	}
	return (int64_t)len;
}

int dvs_shield_truncate(struct dvs_shield_volume *v, uint64_t size)
{
	ra_drop(v);
	if (v->flags & DVS_VOL_READONLY)
		return -EROFS;
	if (v->failed)
		return v->failed;
	if (size > v->capacity * BLK)
		return -EFBIG;
	int ret = part_seal(v);
	part_forget(v);
	if (ret)
		return ret;
	if (size >= v->size) {
		if (size > v->size)
			v->tree_dirty = 1;
		v->size = size; /* the blocks past the old size hold zero entries already */
		return 0;
	}
	if (size % BLK) {
		/* zero the tail of the new last block, so growing again shows zeros */
		uint64_t b = size / BLK;
		ret = read_blocks(v, b, 1, v->scratch);
		if (ret >= 0) {
			memset(v->scratch + size % BLK, 0, BLK - size % BLK);
			ret = write_range(v, b, 1, v->scratch, 0);
		}
		dvs_wipe(v->scratch, BLK);
		if (ret < 0)
			return ret;
	}
	uint64_t from = (size + BLK - 1) / BLK, to = (v->size + BLK - 1) / BLK;
	for (uint64_t b = from; b < to && !ret; b++) {
		ret = ensure_nodes(v, 0, b / FANOUT, b / FANOUT);
		if (ret)
			break;
		struct node *leaf;
		struct entry *e = data_entry(v, b, &leaf);
		if (!e->counter)
			continue;
		choose_data_slot(leaf, (uint32_t)(b % FANOUT)); /* keep the committed slot safe */
		void *ws = u64map_get(&v->dirty_blocks, b);
		if (ws && v->wstate[(uintptr_t)ws - 1] == W_DIRTY) {
			/* not written yet: forget it */
			uint32_t s = (uint32_t)((uintptr_t)ws - 1);
			v->wstate[s] = W_FREE;
			v->n_wdirty--;
			u64map_del(&v->dirty_blocks, b);
		}
		memset(e, 0, sizeof(*e));
		ret = mark_dirty(v, leaf);
	}
	v->size = size;
	v->tree_dirty = 1;
	return ret;
}

/* ---- flush ---- */

int dvs_shield_flush(struct dvs_shield_volume *v)
{
	ra_drop(v);
	if (v->flags & DVS_VOL_READONLY)
		return 0;
	if (v->failed)
		return v->failed;
	int ret = part_seal(v);
	if (ret)
		return ret;
	if (!v->tree_dirty && v->size == v->committed_size)
		return 0;
	uint64_t n_dirty = 0;
	for (uint32_t l = 0; l < v->levels; l++)
		n_dirty += v->dirty[l].n;
	/* every ancestor of a dirty node is sealed too: at most levels more per node */
	ret = reserve(v, n_dirty * v->levels + v->levels);
	if (ret)
		goto fail;
	for (uint32_t l = 0; l < v->levels && !ret; l++) {
		for (uint64_t i = 0; i < v->dirty[l].n && !ret; i++) {
			struct node *n = v->dirty[l].v[i];
			int slot = alloc_wslot(v);
			if (slot < 0) {
				ret = slot;
				break;
			}
			struct entry ne;
			memset(&ne, 0, sizeof(ne));
			ne.flags = n->committed_slot == 0 ? 1 : 0;
			ne.counter = v->next_counter++;
			ne.salt = v->salt;
			ret = seal_block(v, KIND_META, l, n->index, &ne, (const uint8_t *)n->e,
					 wslot(v, (uint32_t)slot));
			if (ret)
				break;
			n->pending_slot = (uint8_t)ne.flags;
			*parent_entry(v, l, n->index) = ne;
			if (l + 1 < v->levels)
				ret = mark_dirty(v, node_get(v, l + 1, n->index / FANOUT));
			v->wstate[slot] = W_DIRTY;
			v->wblock[slot] = META_BLOCK;
			v->wphys[slot] = meta_phys(v, l, n->index, ne.flags);
			v->n_wdirty++;
			v->st.nodes_written++;
		}
	}
	/* The superblock goes out with the flush's writes and one FDATASYNC after them; an
	 * open after a crash authenticates those writes before trusting it. Past VERIFY_LIMIT
	 * sealed blocks that check would make opens slow: such a flush pays a second
	 * FDATASYNC (a barrier before the superblock) instead. Writes already in flight are
	 * waited for (a failed one fails the flush); a small flush then goes out as one linked
	 * chain with the commit (one wait), a large one in parallel first (two waits). */
	int checkable = !(v->flags & DVS_VOL_EPHEMERAL) &&
			v->next_counter - v->flush_from <= DVS_SHIELD_VERIFY_LIMIT;
	if (!ret && v->n_winflight)
		ret = wait_all(v);
	if (!ret)
		ret = v->failed;
	/* the chain must fit the engine's queue in one go: runs + 3 superblock/sync members */
	uint32_t max_chain = v->cap_done / 2 > 8 + 4 ? v->cap_done / 2 - 4 : 4;
	if (max_chain > MAX_CHAIN)
		max_chain = MAX_CHAIN;
	if (!ret && (count_runs(v) > max_chain || !checkable)) {
		ret = submit_dirty(v);
		if (!ret)
			ret = wait_all(v);
		if (!ret)
			ret = v->failed;
	}
	if (!ret)
		ret = queue_dirty(v, 1);
	if (!ret)
		ret = commit_superblock(v, v->epoch + 1, &v->root, v->size, v->nonce_limit,
					checkable ? COMMIT_WITH_WRITES : COMMIT_AFTER_BARRIER);
	if (ret)
		goto fail;
	v->flush_from = v->next_counter;
	v->epoch++;
	v->committed_root = v->root;
	v->committed_size = v->size;
	for (uint32_t l = 0; l < v->levels; l++) {
		for (uint64_t i = 0; i < v->dirty[l].n; i++) {
			struct node *n = v->dirty[l].v[i];
			n->committed_slot = n->pending_slot;
			n->dirty = 0;
			memset(n->rewritten, 0, sizeof(n->rewritten));
			memset(n->epoch_slot, 0, sizeof(n->epoch_slot));
		}
		v->dirty[l].n = 0;
	}
	v->tree_dirty = 0;
	return 0;
fail:
	/* the in-memory tree may now be ahead of the disk in ways no flush can repair */
	if (!v->failed)
		v->failed = ret;
	return ret;
}

/* ---- checking, status, close ---- */

int64_t dvs_shield_verify(struct dvs_shield_volume *v, uint64_t first, uint64_t n)
{
	ra_drop(v);
	if (first > v->capacity)
		return -EINVAL;
	if (n > v->capacity - first)
		n = v->capacity - first;
	int sealed = part_seal(v);
	if (sealed)
		return sealed;
	uint8_t *buf = aligned_alloc(64, (uint64_t)v->read_slots * BLK);
	if (!buf)
		return -ENOMEM;
	int64_t written = 0;
	for (uint64_t done = 0; done < n;) {
		uint32_t chunk = (uint32_t)(n - done < v->read_slots ? n - done : v->read_slots);
		int ret = read_chunk(v, NULL, first + done, chunk, buf);
		if (ret) {
			dvs_wipe(buf, (uint64_t)v->read_slots * BLK);
			free(buf);
			return ret;
		}
		for (uint32_t j = 0; j < chunk; j++)
			written += data_entry(v, first + done + j, NULL)->counter != 0;
		done += chunk;
	}
	dvs_wipe(buf, (uint64_t)v->read_slots * BLK);
	free(buf);
	return written;
}

static int emit(uint64_t *out, uint64_t max, uint64_t *n, uint64_t block)
{
	if (*n < max)
		out[*n] = block;
	(*n)++;
	return 0;
}

/* Walk the committed tree top-down (it has to be clean: call after a flush). */
static int walk_live(struct dvs_shield_volume *v, uint32_t l, uint64_t j, const struct entry *pe,
		     uint64_t *out, uint64_t max, uint64_t *n)
{
	if (!pe->counter)
		return 0;
	emit(out, max, n, meta_phys(v, l, j, pe->flags & 1));
	int ret = ensure_nodes(v, l, j, j);
	if (ret)
		return ret;
	struct node *node = node_get(v, l, j);
	for (uint32_t k = 0; k < FANOUT; k++) {
		const struct entry *e = &node->e[k];
		if (!e->counter)
			continue;
		if (l == 0)
			emit(out, max, n, data_phys(v, j * FANOUT + k, e->flags & 1));
		else if ((ret = walk_live(v, l - 1, j * FANOUT + k, e, out, max, n)))
			return ret;
	}
	return 0;
}

int64_t dvs_shield_live_blocks(struct dvs_shield_volume *v, uint64_t *out, uint64_t max)
{
	ra_drop(v);
	if (v->tree_dirty || v->n_wdirty || v->n_winflight || v->part_dirty)
		return -EBUSY;
	uint64_t n = 0;
	emit(out, max, &n, 0);
	emit(out, max, &n, 1);
	int ret = walk_live(v, v->levels - 1, 0, &v->committed_root, out, max, &n);
	return ret ? ret : (int64_t)n;
}

int dvs_shield_locate(struct dvs_shield_volume *v, uint64_t block, uint64_t *phys)
{
	ra_drop(v);
	if (block >= v->capacity)
		return -EINVAL;
	int ret = part_seal(v);
	if (!ret)
		ret = ensure_nodes(v, 0, block / FANOUT, block / FANOUT);
	if (ret)
		return ret;
	const struct entry *e = data_entry(v, block, NULL);
	if (!e->counter)
		return -ENODATA;
	*phys = data_phys(v, block, e->flags & 1);
	return 0;
}

uint64_t dvs_shield_size(struct dvs_shield_volume *v)
{
	return v->size;
}

int dvs_shield_status(struct dvs_shield_volume *v, struct dvs_shield_status *out)
{
	fill_status(v, out);
	return 0;
}

int dvs_shield_anchor(struct dvs_shield_volume *v, struct dvs_shield_anchor *out)
{
	memset(out, 0, sizeof(*out));
	memcpy(out->volume_id, v->header.volume_id, 16);
	out->epoch = v->epoch;
	out->size = v->committed_size;
	memcpy(out->root, &v->committed_root, 32);
	return 0;
}

int dvs_shield_close(struct dvs_shield_volume *v, int32_t discard)
{
	if (!v)
		return 0;
	if (discard == DVS_CLOSE_ENGINE_GONE)
		v->eng = NULL;
	int ret = 0;
	ra_drop(v);
	if (!discard && !(v->flags & DVS_VOL_READONLY) && v->ready)
		ret = dvs_shield_flush(v);
	if (v->eng && v->done) {
		int w = wait_all(v);
		if (!ret && !discard)
			ret = w;
		if (!discard && !ret && v->ready && !v->mirrored && !v->failed &&
		    !(v->flags & (DVS_VOL_EPHEMERAL | DVS_VOL_READONLY | DVS_VOL_FAST_CLOSE))) {
			/* leave both superblock slots on the last state (durable: no check needed
			 * at the next open, and one damaged slot still leaves the newest state) */
			uint32_t other = v->sb_slot ^ 1;
			v->n_sync = 0;
			ret = seal_superblock(v, other, v->epoch, &v->committed_root,
					      v->committed_size, v->nonce_limit, 0);
			if (!ret)
				ret = queue_sync(v, DVS_OP_WRITE, DVS_IO_LINK, sbuf(v, other), BLK,
						 (uint64_t)other * BLK, NULL);
			if (!ret)
				ret = queue_sync(v, DVS_OP_FDATASYNC, 0, NULL, 0, 0, NULL);
			if (!ret)
				ret = wait_sync(v);
			if (!ret && (v->sync_res[0] != (int32_t)BLK || v->sync_res[1] < 0))
				ret = v->sync_res[1] < 0 ? v->sync_res[1] : -EIO;
			if (!ret)
				v->st.syncs++;
		}
	}
	uint64_t it = 0, key;
	void *val;
	while (u64map_next(&v->nodes, &it, &key, &val))
		free(val); /* counters and tags: authenticated metadata, not secrets */
	u64map_free(&v->nodes);
	u64map_free(&v->dirty_blocks);
	for (uint32_t l = 0; l < MAX_LEVELS; l++)
		free(v->dirty[l].v);
	/* the arena holds ciphertext only (plaintext goes straight between the caller's buffer
	 * and the cipher), so it needs no wiping; the key schedule does */
	dvs_pool_stop(v->pool);
	free(v->seals);
	dvs_gcm_free(&v->gcm);
	free(v->ios);
	free(v->done);
	free(v->sync_res);
	if (v->plans) {
		for (uint32_t i = 0; i < N_PLANS; i++)
			plan_free(&v->plans[i]);
		free(v->plans);
	}
	free(v->wstate);
	free(v->wblock);
	free(v->wphys);
	if (v->scratch)
		dvs_wipe(v->scratch, BLK);
	free(v->scratch);
	dvs_wipe(v, sizeof(*v));
	free(v);
	return ret;
}

int dvs_shield_scrypt(const uint8_t *pass, uint32_t pass_len, const uint8_t *salt32,
		      uint32_t log2_n, uint32_t r, uint32_t p, uint8_t *out32)
{
	int ret = check_kdf_params(log2_n, r, p);
	return ret ? ret : dvs_scrypt(pass, pass_len, salt32, 32, log2_n, r, p, out32);
}

/* ---- the crypto ceiling ---- */

int dvs_shield_crypto_bench(uint32_t n, uint32_t open, uint64_t *elapsed_ns)
{
	uint8_t key[32];
	struct dvs_gcm g = { 0 };
	uint8_t *in = aligned_alloc(64, BLK), *out = aligned_alloc(64, BLK);
	int ret = (!in || !out) ? -ENOMEM : dvs_random(key, 32);
	if (!ret)
		ret = dvs_gcm_init(&g, key);
	if (ret) {
		free(in);
		free(out);
		return ret;
	}
	memset(in, 0x5a, BLK);
	uint8_t tag[16], nonce[12] = { 0 };
	struct aad a;
	memset(&a, 0, sizeof(a));
	dvs_gcm_seal(&g, nonce, (uint8_t *)&a, sizeof(a), in, out, BLK, tag);
	struct timespec t0, t1;
	/* the thread's CPU time, like openssl speed's user time: robust to a busy machine */
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
	for (uint32_t i = 0; i < n && !ret; i++) {
		if (open) {
			ret = dvs_gcm_open(&g, nonce, (uint8_t *)&a, sizeof(a), out, in, BLK, tag);
		} else {
			a.counter = i;
			memcpy(nonce, &a.counter, 8);
			ret = dvs_gcm_seal(&g, nonce, (uint8_t *)&a, sizeof(a), in, out, BLK, tag);
		}
	}
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
	*elapsed_ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ULL +
		      (uint64_t)(t1.tv_nsec - t0.tv_nsec);
	dvs_gcm_free(&g);
	free(in);
	free(out);
	return ret;
}
