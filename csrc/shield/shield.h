/*
 * shield.h -- the sealed volume: an authenticated-encrypted, crash-consistent block store
 * on a dvs engine (io_uring ring, thread pool or memory disk), and the SQLite VFS on it.
 *
 * On-disk format, version 2 (all integers little-endian, blocks of 4096 bytes):
 *   block 0, 1   superblock slots. A plain 256-byte header (magic "DVSSHLD1", version,
 *                geometry, KDF id + parameters + salt, volume id, key check, a random
 *                96-bit seal nonce) authenticated as associated data, then a 128-byte sealed
 *                payload (epoch, nonce reservation, size in bytes, flags, the root entry,
 *                the first counter of the epoch's writes), its 16-byte tag, and zeros to
 *                the end of the block (checked).
 *   inner nodes  the MAC tree above the leaves: node (level l >= 1, index j) in two
 *                slots; a node is 128 entries of 32 bytes, sealed as one block. Inner nodes
 *                describe child nodes; the top level is one root node whose entry lives in
 *                the superblock.
 *   chunks       from data_base, one chunk of 258 blocks per leaf j: the leaf's two slots,
 *                then its 128 data blocks as two groups of 64, each group slot 0 then slot
 *                1. Leaves describe data blocks. The file grows with the data written, not
 *                with the capacity, and runs of up to 64 blocks are contiguous.
 * An entry is {u64 counter, u32 salt, u32 flags (bit 0: slot), u8 tag[16]}. counter 0 means
 * "never written": the block (or the whole subtree) reads as zeros without any I/O.
 *
 * Sealing: blocks and nodes use AES-256-GCM with a per-volume key HKDF(master, volume id).
 * The nonce is the volume-wide write counter (u64) and a per-open random salt (u32); the
 * counter never repeats: before using counter c the superblock on disk must already
 * reserve a limit > c (reservations are made durable ahead of use, 2^32 at a time), and an
 * open continues above the highest reservation found. The associated data binds volume id,
 * kind (data/meta), level, block index and counter, so a block moved, swapped or replayed
 * from an older version fails its tag. A child's tag and counter live in its parent, the
 * root's in the sealed superblock: an old node or block no longer matches what its parent
 * expects. The superblock itself is sealed with AES-256-SIV under its own key: a
 * deterministic AEAD, so a superblock write lost in a crash and repeated after the reopen
 * reuses no GCM nonce (SIV needs none; its random seal nonce only hides equal payloads).
 *
 * Crash consistency, one FDATASYNC per flush: a block is never overwritten while the
 * committed state refers to it; writes go to the other slot (chosen once per block per
 * epoch), tree nodes likewise, and the superblock alternates between its two slots, so the
 * committed state stays intact on disk until the next flush is durable. A flush writes its
 * data, its dirty nodes (sealed bottom-up) and the new superblock -- flagged UNSYNCED and
 * naming the first counter of its writes -- then one FDATASYNC; it returns after that. A
 * crash may persist the new superblock and lose or tear any of its other writes, so an
 * open authenticates, for an UNSYNCED superblock, every node and block whose counter is at
 * least that first counter (exactly the flush's writes, reachable from the root through
 * entries that new); if one is missing or torn, it falls back to the other slot's state
 * (the previous flush, left intact), reports the newer slot as damaged, and makes the
 * chosen state durable (FDATASYNC) before it writes anything. Flushes that wrote more than
 * DVS_SHIELD_VERIFY_LIMIT blocks instead write FDATASYNC -> superblock -> FDATASYNC (the
 * superblock then is not UNSYNCED and an open checks nothing), so an open never reads more
 * than that. A clean close copies the last state into the other slot as well.
 *
 * Conventions: 0 / count, or -errno. Integrity failures are -EBADMSG with the failing
 * block named in the status (fail_kind/fail_level/fail_index); -EKEYREJECTED: wrong key;
 * -EMEDIUMTYPE: not a sealed volume; -ESTALE: older than the caller's anchor (rollback).
 */
#ifndef DVS_SHIELD_H
#define DVS_SHIELD_H

#include <stdint.h>

#include "uring/uring.h"

/* cffi:begin */
#define DVS_SHIELD_BLOCK 4096
#define DVS_SHIELD_FORMAT_VERSION 2
#define DVS_SHIELD_VERIFY_LIMIT 2048 /* blocks an open may authenticate for a torn flush */
#define DVS_SHIELD_MAX_CAPACITY 1073741824 /* blocks: 4 TiB */

#define DVS_KDF_RAW 0     /* secret is the 32-byte master key */
#define DVS_KDF_SCRYPT 1  /* secret is a passphrase; scrypt(salt, N=2^log2_n, r, p) */
#define DVS_KDF_DERIVED 2 /* secret is scrypt's output for the given salt and parameters */

struct dvs_shield_key {
	uint32_t kdf;
	uint32_t scrypt_log2_n;
	uint32_t scrypt_r;
	uint32_t scrypt_p;
	uint8_t salt[32]; /* DERIVED: the salt used; SCRYPT at format: all zero = random */
	const uint8_t *secret;
	uint32_t secret_len;
};

struct dvs_shield_anchor {
	uint8_t volume_id[16];
	uint64_t epoch;
	uint64_t size;
	uint8_t root[32]; /* the root entry: counter, salt, flags, tag */
};

#define DVS_VOL_READONLY 1
#define DVS_VOL_EPHEMERAL 2 /* never sync (temporary files) */
#define DVS_VOL_STRICT 4    /* a damaged superblock slot is an error even if the other is good */
#define DVS_VOL_LAZY_FORMAT 8 /* format without syncing (durable at the first flush) */
#define DVS_VOL_FAST_CLOSE 16 /* close without copying the last state into the other slot */
#define DVS_VOL_DIRECT 32     /* the file is O_DIRECT: reads need no worker for a copy */
#define DVS_VOL_CRYPTO_HELPER 64 /* share AES-GCM of large requests with a helper thread */
#define DVS_VOL_NO_READAHEAD 128 /* no sequential readahead of large reads */

struct dvs_shield_config {
	uint64_t capacity_blocks; /* format only */
	uint64_t arena_addr;      /* (2 + read_slots + write_slots) * 4096 bytes, page aligned */
	uint64_t arena_len;
	uint32_t arena_buf;       /* the arena's registered buffer index, or DVS_IO_NO_BUF */
	uint32_t read_slots;
	uint32_t write_slots;
	uint32_t flags;           /* DVS_VOL_* */
	uint32_t file;            /* the engine's registered file index */
	uint32_t have_anchor;
	struct dvs_shield_anchor anchor;
};

/* Failure kinds in the status */
#define DVS_FAIL_NONE 0
#define DVS_FAIL_DATA 1
#define DVS_FAIL_META 2
#define DVS_FAIL_SUPERBLOCK 3
#define DVS_FAIL_ROLLBACK 4

struct dvs_shield_status {
	uint8_t volume_id[16];
	uint64_t epoch;
	uint64_t size;
	uint64_t capacity_blocks;
	uint64_t next_counter;
	uint64_t nonce_limit;
	uint32_t levels;
	uint32_t superblock_slot;   /* the slot the open used */
	uint32_t superblock_damage; /* bit s: slot s failed to authenticate at open, or named a
				     * flush whose writes are not all there (torn) */
	uint32_t kdf;
	int32_t fail_code;
	uint32_t fail_kind;         /* DVS_FAIL_* */
	uint32_t fail_level;
	uint32_t pad;
	uint64_t fail_index;        /* block, node index or superblock slot */
	uint64_t blocks_read;       /* from disk */
	uint64_t blocks_written;    /* to disk */
	uint64_t blocks_sealed;
	uint64_t blocks_opened;
	uint64_t nodes_loaded;
	uint64_t nodes_written;
	uint64_t commits;
	uint64_t reservations;
	uint64_t cached_nodes;
	uint64_t dirty_blocks;
	uint64_t syncs;          /* FDATASYNCs issued (format, commits, open, close) */
	uint64_t open_verified;  /* nodes and blocks the open authenticated for an UNSYNCED flush */
	uint64_t torn_epoch;     /* the epoch an open discarded as torn (0: none) */
};

struct dvs_shield_header { /* the plain part of a superblock slot, parsed and checked */
	uint32_t version;
	uint32_t slot;
	uint32_t kdf;
	uint32_t scrypt_log2_n;
	uint32_t scrypt_r;
	uint32_t scrypt_p;
	uint32_t levels;
	uint32_t pad;
	uint8_t kdf_salt[32];
	uint8_t volume_id[16];
	uint64_t capacity_blocks;
	uint64_t meta_base;
	uint64_t data_base;
	uint8_t seal_nonce[12];
	uint32_t pad2;
};

struct dvs_shield_volume;

uint64_t dvs_shield_arena_bytes(uint32_t read_slots, uint32_t write_slots);
/* Parse and check a superblock slot's plain header (untrusted bytes). */
int dvs_shield_parse_header(const uint8_t *block, uint64_t len, struct dvs_shield_header *out);
/* Create a new volume on the engine's file (whatever it held is abandoned). */
int dvs_shield_format(struct dvs_engine *engine, const struct dvs_shield_key *key,
		      const struct dvs_shield_config *cfg, struct dvs_shield_volume **out,
		      struct dvs_shield_status *status);
int dvs_shield_open(struct dvs_engine *engine, const struct dvs_shield_key *key,
		    const struct dvs_shield_config *cfg, struct dvs_shield_volume **out,
		    struct dvs_shield_status *status);
int dvs_shield_read_blocks(struct dvs_shield_volume *v, uint64_t first, uint32_t n, uint8_t *out);
#define DVS_WRITE_SUBMIT 1 /* start the writes now (else they wait for more or for flush) */
int dvs_shield_write_blocks(struct dvs_shield_volume *v, uint64_t first, uint32_t n,
			    const uint8_t *in, uint32_t flags);
/* The same for a list of (not necessarily adjacent) blocks, gathered into one batch: the
 * volume's way to keep a queue depth > 1 with random blocks. */
int dvs_shield_read_list(struct dvs_shield_volume *v, const uint64_t *blocks, uint32_t n,
			 uint8_t *out);
int dvs_shield_write_list(struct dvs_shield_volume *v, const uint64_t *blocks, uint32_t n,
			  const uint8_t *in, uint32_t flags);
int64_t dvs_shield_pread(struct dvs_shield_volume *v, uint8_t *buf, uint64_t len, uint64_t off);
int64_t dvs_shield_pwrite(struct dvs_shield_volume *v, const uint8_t *buf, uint64_t len,
			  uint64_t off);
int dvs_shield_truncate(struct dvs_shield_volume *v, uint64_t size);
int dvs_shield_flush(struct dvs_shield_volume *v);
/* Authenticate blocks [first, first+n) (and the tree above them); returns how many of them
 * hold data. */
int64_t dvs_shield_verify(struct dvs_shield_volume *v, uint64_t first, uint64_t n);
int dvs_shield_status(struct dvs_shield_volume *v, struct dvs_shield_status *out);
/* The physical blocks the committed state refers to (superblocks, tree nodes, data), after
 * loading and authenticating the whole tree; fills up to max, returns the total. */
int64_t dvs_shield_live_blocks(struct dvs_shield_volume *v, uint64_t *out, uint64_t max);
/* Where logical block `block` lives in the file now (-ENODATA: never written). */
int dvs_shield_locate(struct dvs_shield_volume *v, uint64_t block, uint64_t *phys);
int dvs_shield_anchor(struct dvs_shield_volume *v, struct dvs_shield_anchor *out);
/* Flush (unless discard) and free; the engine stays the caller's. discard ==
 * DVS_CLOSE_ENGINE_GONE: the engine was destroyed already, free memory without touching it. */
#define DVS_CLOSE_ENGINE_GONE 2
int dvs_shield_close(struct dvs_shield_volume *v, int32_t discard);
/* scrypt(passphrase, salt) -> the 32-byte master key (what DVS_KDF_DERIVED expects). */
int dvs_shield_scrypt(const uint8_t *pass, uint32_t pass_len, const uint8_t *salt32,
		      uint32_t log2_n, uint32_t r, uint32_t p, uint8_t *out32);
/* Seal (or open) n blocks in memory with one context: the crypto ceiling of this code
 * (elapsed_ns is the calling thread's CPU time). */
int dvs_shield_crypto_bench(uint32_t n, uint32_t open, uint64_t *elapsed_ns);

/* ---- the SQLite VFS (vfs.c) ----
 * Registers a sqlite3_vfs whose files are sealed volumes (one volume per database,
 * journal or temporary file), so unmodified SQL -- including Python's own sqlite3 module,
 * which links the same libsqlite3 -- runs on authenticated, encrypted storage:
 * sqlite3.connect("file:x.db?vfs=NAME", uri=True). */
struct dvs_vfs_config {
	const char *name;
	uint32_t kdf;           /* DVS_KDF_RAW or DVS_KDF_DERIVED */
	uint32_t scrypt_log2_n; /* DERIVED: the parameters and salt the key came from */
	uint32_t scrypt_r;
	uint32_t scrypt_p;
	uint8_t salt[32];
	uint8_t secret[32];
	uint64_t capacity_blocks; /* of every file it creates */
	uint32_t engine_kind;     /* DVS_ENGINE_RING or DVS_ENGINE_THREADS */
	uint32_t read_slots;
	uint32_t write_slots;
	uint32_t make_default;
};
struct dvs_vfs_info {
	uint64_t files_opened;
	uint64_t volumes_formatted;
	uint64_t syncs;
	uint64_t integrity_failures;
	uint64_t open_files;
	/* engine counters summed over every volume the VFS has used */
	uint64_t io_completed;
	uint64_t io_syscalls;
	/* the last integrity failure */
	uint32_t fail_kind;
	uint32_t fail_level;
	uint64_t fail_index;
	char fail_path[256];
};
int dvs_vfs_register(const struct dvs_vfs_config *cfg);
int dvs_vfs_unregister(const char *name);
int dvs_vfs_info(const char *name, struct dvs_vfs_info *out);
/* cffi:end */

uint64_t dvs_shield_size(struct dvs_shield_volume *v);

#endif
