/*
 * inode.c -- the inode table: (st_dev, st_ino) -> slot holding a file handle and, while it
 * is useful, an O_PATH descriptor.
 *
 * Kernel semantics relied on:
 * - name_to_handle_at(dirfd, name) encodes a backing inode as an opaque handle without
 *   opening it; open_by_handle_at(mount_fd, handle, O_PATH) re-opens exactly that inode
 *   (never another one: the handle carries the generation) and needs CAP_DAC_READ_SEARCH.
 *   Handles of different mounts need different mount_fds, so one "anchor" descriptor is kept
 *   per mount id seen below the served root.
 * - Root cannot raise RLIMIT_NOFILE here (20 000), so descriptors are a cache: past the
 *   budget, unpinned ones are closed (second-chance clock) and re-opened on demand. Files
 *   whose filesystem has no handles keep their descriptor for as long as the kernel knows
 *   them (logged once per filesystem).
 * - The kernel counts lookups: every entry reply (lookup, create, mkdir, mknod, symlink,
 *   link, tmpfile, readdirplus) adds one; FORGET/BATCH_FORGET subtract. At zero the slot
 *   becomes a ghost that still remembers its handle, so an export handle of the mount that
 *   names this nodeid can be resolved again (LOOKUP of "." on it) until the slot is reused;
 *   ghosts are reused oldest first.
 * - A (dev, ino) pair can be recycled by the backing filesystem after a delete; the handle
 *   differs then, and the old slot is unhashed rather than confused with the new file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "fuse/internal.h"
#include "sys/sys.h"

#define GHOST_KEEP 4096u
#define EVICT_SCAN 256u

static inline struct inode *slot(struct dvs_fuse_server *s, uint32_t idx)
{
	return &s->chunks[idx / CNTRFS_SLOTS_PER_CHUNK][idx % CNTRFS_SLOTS_PER_CHUNK];
}

static inline uint32_t slots_used(struct dvs_fuse_server *s)
{
	return __atomic_load_n(&s->n_slots, __ATOMIC_ACQUIRE);
}

static inline uint32_t hash_key(dev_t dev, ino_t ino, uint32_t mask)
{
	uint64_t h = (uint64_t)ino * 0x9E3779B97F4A7C15ull ^ (uint64_t)dev * 0xC2B2AE3D27D4EB4Full;
	return (uint32_t)(h >> 32) & mask;
}

static const uint8_t *handle_bytes(const struct inode *ino)
{
	return ino->handle_len > CNTRFS_INLINE_HANDLE ? ino->handle_heap : ino->handle_inline;
}

int cntrfs_itab_init(struct dvs_fuse_server *s)
{
	s->chunks = calloc(CNTRFS_MAX_CHUNKS, sizeof(*s->chunks));
	s->hash_mask = (1u << 16) - 1;
	s->hash = calloc((size_t)s->hash_mask + 1, sizeof(*s->hash));
	if (!s->chunks || !s->hash)
		return -ENOMEM;
	pthread_mutex_init(&s->itab_lock, NULL);
	pthread_mutex_init(&s->anchor_lock, NULL);
	s->n_slots = 0;
	return 0;
}

void cntrfs_itab_free(struct dvs_fuse_server *s)
{
	if (!s->chunks)
		return;
	uint32_t n = slots_used(s);
	for (uint32_t i = 1; i <= n; i++) {
		struct inode *ino = slot(s, i);
		if (ino->fd >= 0)
			close(ino->fd);
		for (struct lock_owner *o = ino->owners, *next; o; o = next) {
			next = o->next;
			close(o->fd);
			free(o);
		}
		free(ino->handle_heap);
		pthread_mutex_destroy(&ino->lock);
	}
	for (uint32_t c = 0; c < CNTRFS_MAX_CHUNKS && s->chunks[c]; c++)
		free(s->chunks[c]);
	free(s->chunks);
	free(s->hash);
	s->chunks = NULL;
	for (int i = 0; i < s->n_anchors; i++)
		close(s->anchors[i].fd);
	s->n_anchors = 0;
}

/* ---- hash (table lock held) ---- */

static struct inode *hash_find(struct dvs_fuse_server *s, dev_t dev, ino_t ino, uint32_t *idx_out)
{
	for (uint32_t idx = s->hash[hash_key(dev, ino, s->hash_mask)]; idx;) {
		struct inode *e = slot(s, idx);
		if (e->dev == dev && e->ino == ino) {
			*idx_out = idx;
			return e;
		}
		idx = e->hash_next;
	}
	return NULL;
}

static void hash_remove(struct dvs_fuse_server *s, uint32_t idx)
{
	struct inode *e = slot(s, idx);
	if (!e->hashed)
		return;
	uint32_t *link = &s->hash[hash_key(e->dev, e->ino, s->hash_mask)];
	while (*link && *link != idx)
		link = &slot(s, *link)->hash_next;
	if (*link == idx)
		*link = e->hash_next;
	e->hash_next = 0;
	e->hashed = 0;
}

static void hash_insert(struct dvs_fuse_server *s, uint32_t idx)
{
	struct inode *e = slot(s, idx);
	uint32_t b = hash_key(e->dev, e->ino, s->hash_mask);
	e->hash_next = s->hash[b];
	s->hash[b] = idx;
	e->hashed = 1;
}

static void hash_grow(struct dvs_fuse_server *s)
{
	uint32_t n = slots_used(s);
	if (n < (s->hash_mask + 1) * 2u || s->hash_mask >= (1u << 26) - 1)
		return;
	uint32_t new_mask = s->hash_mask * 2 + 1;
	uint32_t *nh = calloc((size_t)new_mask + 1, sizeof(*nh));
	if (!nh)
		return;
	free(s->hash);
	s->hash = nh;
	s->hash_mask = new_mask;
	for (uint32_t i = 2; i <= n; i++) {
		struct inode *e = slot(s, i);
		if (e->hashed)
			hash_insert(s, i);
	}
}

/* ---- free list of ghosts (table lock held): FIFO so the oldest ghost is reused first ---- */

static void free_push(struct dvs_fuse_server *s, uint32_t idx)
{
	struct inode *e = slot(s, idx);
	e->free_next = 0;
	e->free_prev = s->free_tail;
	if (s->free_tail)
		slot(s, s->free_tail)->free_next = idx;
	else
		s->free_head = idx;
	s->free_tail = idx;
	s->n_free++;
}

static void free_unlink(struct dvs_fuse_server *s, uint32_t idx)
{
	struct inode *e = slot(s, idx);
	if (e->free_prev)
		slot(s, e->free_prev)->free_next = e->free_next;
	else
		s->free_head = e->free_next;
	if (e->free_next)
		slot(s, e->free_next)->free_prev = e->free_prev;
	else
		s->free_tail = e->free_prev;
	e->free_prev = e->free_next = 0;
	s->n_free--;
}

static uint32_t slot_alloc(struct dvs_fuse_server *s)
{
	/* reuse the oldest ghost once enough are kept, if nothing pins it */
	if (s->n_free > GHOST_KEEP) {
		uint32_t idx = s->free_head;
		struct inode *e = slot(s, idx);
		pthread_mutex_lock(&e->lock);
		int reusable = e->fd < 0 && e->fd_users == 0 && e->nopen == 0 && !e->owners;
		pthread_mutex_unlock(&e->lock);
		if (reusable) {
			free_unlink(s, idx);
			hash_remove(s, idx);
			free(e->handle_heap);
			e->handle_heap = NULL;
			return idx;
		}
	}
	uint32_t idx = s->n_slots + 1;
	uint32_t c = idx / CNTRFS_SLOTS_PER_CHUNK;
	if (c >= CNTRFS_MAX_CHUNKS)
		return 0;
	if (!s->chunks[c]) {
		struct inode *chunk = calloc(CNTRFS_SLOTS_PER_CHUNK, sizeof(*chunk));
		if (!chunk)
			return 0;
		for (uint32_t i = 0; i < CNTRFS_SLOTS_PER_CHUNK; i++) {
			pthread_mutex_init(&chunk[i].lock, NULL);
			chunk[i].fd = -1;
			chunk[i].xattr_fd = -1;
			chunk[i].anchor = -1;
			chunk[i].idx = c * CNTRFS_SLOTS_PER_CHUNK + i;
		}
		s->chunks[c] = chunk;
	}
	__atomic_store_n(&s->n_slots, idx, __ATOMIC_RELEASE);
	hash_grow(s);
	return idx;
}

struct inode *cntrfs_inode(struct dvs_fuse_server *s, uint64_t nodeid)
{
	uint32_t idx = (uint32_t)nodeid;
	uint32_t gen = (uint32_t)(nodeid >> 32);
	if (idx == 0 || idx > slots_used(s))
		return NULL;
	struct inode *ino = slot(s, idx);
	if (__atomic_load_n(&ino->state, __ATOMIC_ACQUIRE) != SLOT_LIVE || ino->gen != gen)
		return NULL;
	return ino;
}

/* ---- anchors: one descriptor per mount id, for open_by_handle_at ---- */

static int anchor_find(struct dvs_fuse_server *s, int mount_id)
{
	for (int i = 0; i < s->n_anchors; i++)
		if (s->anchors[i].mount_id == mount_id)
			return i;
	return -1;
}

/* An anchor for mount_id made from `obj`, any descriptor (O_PATH too) on that mount, or from
 * (pfd, name). open_by_handle_at rejects O_PATH mount descriptors (it uses fdget()), so the
 * anchor is the directory re-opened read-only; a mount whose root is not a directory gets no
 * anchor (its inodes keep descriptors instead). Returns the anchor index or -1. */
static int anchor_get(struct dvs_fuse_server *s, int mount_id, int obj, int pfd, const char *name)
{
	pthread_mutex_lock(&s->anchor_lock);
	int idx = anchor_find(s, mount_id);
	pthread_mutex_unlock(&s->anchor_lock);
	if (idx >= 0)
		return idx;
	int opened = -1;
	if (obj < 0) {
		opened = dvs_openat2(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0,
				     RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS);
		if (opened < 0)
			return -1;
		obj = opened;
	}
	struct stat st;
	int fd = -1;
	if (fstat(obj, &st) == 0 && S_ISDIR(st.st_mode)) {
		char path[48];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", obj);
		int token = cntrfs_priv_enter();
		fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		cntrfs_priv_leave(token);
	}
	if (opened >= 0)
		close(opened);
	if (fd < 0)
		return -1;
	pthread_mutex_lock(&s->anchor_lock);
	idx = anchor_find(s, mount_id);
	if (idx < 0 && s->n_anchors < CNTRFS_MAX_ANCHORS) {
		idx = s->n_anchors++;
		s->anchors[idx].mount_id = mount_id;
		s->anchors[idx].fd = fd;
		fd = -1;
		if (idx > 0)
			cntrfs_log(s, "serving a second mount below the source (mount id %d)", mount_id);
	}
	pthread_mutex_unlock(&s->anchor_lock);
	if (fd >= 0)
		close(fd);
	return idx;
}

/* ---- descriptors ---- */

static void maybe_evict(struct dvs_fuse_server *s)
{
	if (atomic_load(&s->n_path_fds) <= s->fd_budget)
		return;
	uint64_t target = (uint64_t)s->fd_budget * 7 / 8;
	uint32_t n = slots_used(s);
	if (n < 2)
		return;
	for (uint32_t scanned = 0; scanned < EVICT_SCAN * 4 && atomic_load(&s->n_path_fds) > target;
	     scanned++) {
		uint32_t idx = atomic_fetch_add(&s->clock_hand, 1) % n + 1;
		if (idx == 1)
			continue; /* the root stays */
		struct inode *ino = slot(s, idx);
		if (pthread_mutex_trylock(&ino->lock) != 0)
			continue;
		if (ino->fd >= 0 && ino->fd_users == 0 && ino->nopen == 0 && ino->handle_len > 0) {
			if (atomic_exchange(&ino->referenced, 0) == 0) {
				close(ino->fd);
				ino->fd = -1;
				atomic_fetch_sub(&s->n_path_fds, 1);
				atomic_fetch_add(&s->fd_evictions, 1);
			}
		}
		pthread_mutex_unlock(&ino->lock);
	}
}

int cntrfs_inode_fd(struct dvs_fuse_server *s, struct inode *ino)
{
	pthread_mutex_lock(&ino->lock);
	if (ino->fd >= 0) {
		ino->fd_users++;
		atomic_store(&ino->referenced, 1);
		int fd = ino->fd;
		pthread_mutex_unlock(&ino->lock);
		return fd;
	}
	if (ino->handle_len == 0 || ino->anchor < 0) {
		pthread_mutex_unlock(&ino->lock);
		return -ESTALE;
	}
	int anchor_fd = s->anchors[ino->anchor].fd;
	int token = cntrfs_priv_enter(); /* open_by_handle_at needs CAP_DAC_READ_SEARCH */
	int fd = dvs_open_by_handle_at(anchor_fd, handle_bytes(ino), ino->handle_len,
				       ino->handle_type, O_PATH | O_CLOEXEC);
	cntrfs_priv_leave(token);
	if (fd < 0) {
		pthread_mutex_unlock(&ino->lock);
		return fd;
	}
	ino->fd = fd;
	ino->fd_users = 1;
	atomic_store(&ino->referenced, 1);
	atomic_fetch_add(&s->n_path_fds, 1);
	atomic_fetch_add(&s->handle_opens, 1);
	pthread_mutex_unlock(&ino->lock);
	maybe_evict(s);
	return fd;
}

void cntrfs_inode_put(struct dvs_fuse_server *s, struct inode *ino)
{
	pthread_mutex_lock(&ino->lock);
	if (ino->fd_users > 0)
		ino->fd_users--;
	if (ino->fd_users == 0 && ino->fd >= 0 && ino->nopen == 0 &&
	    __atomic_load_n(&ino->state, __ATOMIC_ACQUIRE) != SLOT_LIVE) {
		close(ino->fd);
		ino->fd = -1;
		atomic_fetch_sub(&s->n_path_fds, 1);
	}
	pthread_mutex_unlock(&ino->lock);
}

/* ---- attributes ---- */

static uint32_t encode_dev(dev_t dev)
{
	/* the kernel's new_encode_dev(): what fuse_attr.rdev carries */
	uint32_t maj = major(dev), min = minor(dev);
	return (min & 0xff) | (maj << 8) | ((min & ~0xffu) << 12);
}

void cntrfs_fill_attr(const struct dvs_fuse_server *s, const struct stat *st, struct fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = st->st_ino;
	a->size = (uint64_t)st->st_size;
	a->blocks = (uint64_t)st->st_blocks;
	a->atime = (uint64_t)st->st_atim.tv_sec;
	a->mtime = (uint64_t)st->st_mtim.tv_sec;
	a->ctime = (uint64_t)st->st_ctim.tv_sec;
	a->atimensec = (uint32_t)st->st_atim.tv_nsec;
	a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
	a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
	a->mode = st->st_mode;
	a->nlink = (uint32_t)st->st_nlink;
	a->uid = cntrfs_uid_to_kernel(s, st->st_uid);
	a->gid = cntrfs_gid_to_kernel(s, st->st_gid);
	a->rdev = encode_dev(st->st_rdev);
	a->blksize = (uint32_t)st->st_blksize;
}

void cntrfs_fill_entry(const struct dvs_fuse_server *s, uint64_t nodeid, uint32_t gen,
		       const struct stat *st, struct fuse_entry_out *e)
{
	memset(e, 0, sizeof(*e));
	e->nodeid = nodeid;
	e->generation = gen;
	e->entry_valid = s->entry_sec;
	e->entry_valid_nsec = s->entry_nsec;
	e->attr_valid = s->attr_sec;
	e->attr_valid_nsec = s->attr_nsec;
	if (st)
		cntrfs_fill_attr(s, st, &e->attr);
}

/* ---- recording inodes ---- */

struct handle_buf {
	uint32_t len;
	int32_t type;
	int32_t mount_id;
	uint8_t data[CNTRFS_MAX_HANDLE];
};

static int handle_equal(const struct inode *e, const struct handle_buf *h)
{
	if (!h || h->len == 0)
		return e->handle_len == 0;
	return e->handle_len == h->len && e->handle_type == h->type &&
	       memcmp(handle_bytes(e), h->data, h->len) == 0;
}

static int set_handle(struct inode *e, const struct handle_buf *h)
{
	free(e->handle_heap);
	e->handle_heap = NULL;
	e->handle_len = 0;
	if (!h || h->len == 0)
		return 0;
	if (h->len > CNTRFS_INLINE_HANDLE) {
		e->handle_heap = malloc(h->len);
		if (!e->handle_heap)
			return -ENOMEM;
		memcpy(e->handle_heap, h->data, h->len);
	} else {
		memcpy(e->handle_inline, h->data, h->len);
	}
	e->handle_len = (uint16_t)h->len;
	e->handle_type = h->type;
	return 0;
}

/* Find or create the slot for (st, h); nlookup += 1. fd (O_PATH, may be -1) is adopted. */
static int record(struct dvs_fuse_server *s, const struct stat *st, const struct handle_buf *h,
		  int anchor, int fd, struct inode **out, uint64_t *nodeid)
{
	pthread_mutex_lock(&s->itab_lock);
	uint32_t idx = 0;
	struct inode *e = hash_find(s, st->st_dev, st->st_ino, &idx);
	if (e && !(h && h->len > 0 && handle_equal(e, h)) &&
	    !(e->handle_len == 0 && (!h || h->len == 0) && e->state == SLOT_LIVE)) {
		/* a different file now has this (dev, ino): forget the association */
		hash_remove(s, idx);
		e = NULL;
	}
	if (e) {
		if (e->state == SLOT_GHOST) {
			free_unlink(s, idx);
			e->nlookup = 0;
			__atomic_store_n(&e->state, SLOT_LIVE, __ATOMIC_RELEASE);
			atomic_fetch_add(&s->n_live, 1);
		}
		e->nlookup++;
	} else {
		idx = slot_alloc(s);
		if (!idx) {
			pthread_mutex_unlock(&s->itab_lock);
			if (fd >= 0)
				close(fd);
			return -ENOMEM;
		}
		e = slot(s, idx);
		e->gen++;
		if (e->gen == 0)
			e->gen = 1;
		e->dev = st->st_dev;
		e->ino = st->st_ino;
		e->anchor = anchor;
		if (set_handle(e, h) < 0) {
			free_push(s, idx);
			pthread_mutex_unlock(&s->itab_lock);
			if (fd >= 0)
				close(fd);
			return -ENOMEM;
		}
		e->nlookup = 1;
		e->backing_id = 0;
		e->backing_users = 0;
		hash_insert(s, idx);
		__atomic_store_n(&e->state, SLOT_LIVE, __ATOMIC_RELEASE);
		atomic_fetch_add(&s->n_live, 1);
	}
	atomic_store(&e->type, st->st_mode & S_IFMT);
	*nodeid = (uint64_t)e->gen << 32 | idx;
	pthread_mutex_unlock(&s->itab_lock);

	if (fd >= 0) {
		pthread_mutex_lock(&e->lock);
		if (e->fd < 0) {
			e->fd = fd;
			fd = -1;
			atomic_fetch_add(&s->n_path_fds, 1);
		}
		pthread_mutex_unlock(&e->lock);
		if (fd >= 0)
			close(fd);
		maybe_evict(s);
	}
	*out = e;
	return 0;
}

static int handle_of(int dirfd, const char *name, int flags, struct handle_buf *h)
{
	h->len = sizeof(h->data);
	int ret = dvs_name_to_handle_at(dirfd, name, h->data, &h->len, &h->type, &h->mount_id,
					flags);
	if (ret < 0)
		h->len = 0;
	return ret;
}

static int no_handle_fs(int err)
{
	return err == -EOPNOTSUPP || err == -EOVERFLOW || err == -ENOSYS || err == -EINVAL;
}

static void log_no_handles(struct dvs_fuse_server *s, dev_t dev, int err)
{
	static _Atomic int logged;
	if (atomic_exchange(&logged, 1) == 0)
		cntrfs_log(s,
			   "filesystem %u:%u has no file handles (%s): its inodes keep an O_PATH "
			   "descriptor while the kernel knows them, so the descriptor budget can be "
			   "exceeded",
			   major(dev), minor(dev), strerror(-err));
}

int cntrfs_anchor_root(struct dvs_fuse_server *s)
{
	struct stat st;
	if (fstat(s->root_fd, &st) < 0)
		return -errno;
	s->root_dev = st.st_dev;
	s->root_ino = st.st_ino;
	struct handle_buf h;
	int ret = handle_of(s->root_fd, "", AT_EMPTY_PATH, &h);
	int anchor = -1;
	if (ret == 0)
		anchor = anchor_get(s, h.mount_id, s->root_fd, -1, NULL);
	else if (no_handle_fs(ret))
		log_no_handles(s, st.st_dev, ret);
	else
		return ret;
	/* slot 1, generation 0: nodeid 1 == FUSE_ROOT_ID */
	pthread_mutex_lock(&s->itab_lock);
	uint32_t idx = slot_alloc(s);
	if (idx != 1) {
		pthread_mutex_unlock(&s->itab_lock);
		return -EINVAL;
	}
	struct inode *root = slot(s, 1);
	root->gen = 0;
	root->dev = st.st_dev;
	root->ino = st.st_ino;
	root->anchor = anchor;
	set_handle(root, ret == 0 ? &h : NULL);
	root->nlookup = 1;
	hash_insert(s, 1);
	root->state = SLOT_LIVE;
	root->type = S_IFDIR;
	pthread_mutex_unlock(&s->itab_lock);
	root->fd = fcntl(s->root_fd, F_DUPFD_CLOEXEC, 3);
	if (root->fd < 0)
		return -errno;
	atomic_fetch_add(&s->n_live, 1);
	return 0;
}

/* A descriptor of the root's parent chain is inside the served tree if walking ".." from it
 * reaches the root before the top of the filesystem tree. */
static int inside_root(struct dvs_fuse_server *s, int fd)
{
	int cur = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (cur < 0)
		return -errno;
	int ret = -EACCES;
	for (int depth = 0; depth < 4096; depth++) {
		struct stat st;
		if (fstat(cur, &st) < 0) {
			ret = -errno;
			break;
		}
		if (st.st_dev == s->root_dev && st.st_ino == s->root_ino) {
			ret = 0;
			break;
		}
		int up = openat(cur, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (up < 0) {
			ret = -errno;
			break;
		}
		struct stat ust;
		if (fstat(up, &ust) < 0 || (ust.st_dev == st.st_dev && ust.st_ino == st.st_ino)) {
			close(up);
			break; /* reached "/" without meeting the root: outside */
		}
		close(cur);
		cur = up;
	}
	close(cur);
	return ret;
}

int cntrfs_record_fd(struct req *r, int fd, int pfd, const char *name, struct fuse_entry_out *e,
		     struct inode **out)
{
	struct dvs_fuse_server *s = r->s;
	struct stat st;
	if (fstat(fd, &st) < 0)
		return -errno;
	struct handle_buf h;
	int ret = handle_of(fd, "", AT_EMPTY_PATH, &h);
	int keep_fd = -1;
	int anchor = -1;
	if (ret == 0) {
		anchor = anchor_get(s, h.mount_id, pfd >= 0 ? pfd : fd, -1, NULL);
	} else if (no_handle_fs(ret)) {
		log_no_handles(s, st.st_dev, ret);
	} else {
		return ret;
	}
	if (ret != 0 || name == NULL || anchor < 0) {
		/* no handle (or nothing to decode it with), or nameless (O_TMPFILE): keep an
		 * O_PATH descriptor of the file */
		char path[48];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		keep_fd = open(path, O_PATH | O_CLOEXEC);
		if (keep_fd < 0)
			return -errno;
	}
	(void)name;
	uint64_t nodeid;
	struct inode *ino;
	if (anchor < 0)
		h.len = 0;
	ret = record(s, &st, h.len ? &h : NULL, anchor, keep_fd, &ino, &nodeid);
	if (ret < 0)
		return ret;
	cntrfs_fill_entry(s, nodeid, ino->gen, &st, e);
	if (out)
		*out = ino;
	return 0;
}

static int lookup_self(struct req *r, struct inode *dir, int pfd, struct fuse_entry_out *e)
{
	struct dvs_fuse_server *s = r->s;
	struct stat st;
	if (fstatat(pfd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	pthread_mutex_lock(&s->itab_lock);
	if (dir->state != SLOT_LIVE) {
		pthread_mutex_unlock(&s->itab_lock);
		return -ESTALE;
	}
	dir->nlookup++;
	uint64_t nodeid = cntrfs_nodeid(dir);
	pthread_mutex_unlock(&s->itab_lock);
	cntrfs_fill_entry(s, nodeid, dir->gen, &st, e);
	return 0;
}

/* LOOKUP of "." on a nodeid the kernel no longer knows: an export handle of the mount being
 * opened (open_by_handle_at). Revive the ghost slot with the same nodeid if it still holds
 * the handle. */
int cntrfs_revive(struct req *r, uint64_t nodeid, struct fuse_entry_out *e)
{
	struct dvs_fuse_server *s = r->s;
	uint32_t idx = (uint32_t)nodeid, gen = (uint32_t)(nodeid >> 32);
	if (idx == 0 || idx > slots_used(s))
		return -ESTALE;
	struct inode *g = slot(s, idx);
	pthread_mutex_lock(&s->itab_lock);
	int ok = g->gen == gen && g->state == SLOT_GHOST && g->hashed && g->handle_len > 0 &&
		 g->anchor >= 0;
	pthread_mutex_unlock(&s->itab_lock);
	if (!ok)
		return -ESTALE;
	int token = cntrfs_priv_enter();
	int fd = dvs_open_by_handle_at(s->anchors[g->anchor].fd, handle_bytes(g), g->handle_len,
				       g->handle_type, O_PATH | O_CLOEXEC);
	cntrfs_priv_leave(token);
	if (fd < 0)
		return -ESTALE;
	struct stat st;
	int ret = fstat(fd, &st) < 0 ? -errno : 0;
	if (ret == 0 && S_ISDIR(st.st_mode) && inside_root(s, fd) != 0)
		ret = -ESTALE; /* a directory moved out of the served tree meanwhile */
	close(fd);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&s->itab_lock);
	if (g->gen != gen || g->state != SLOT_GHOST || !g->hashed || g->dev != st.st_dev ||
	    g->ino != st.st_ino) {
		pthread_mutex_unlock(&s->itab_lock);
		return -ESTALE;
	}
	free_unlink(s, idx);
	g->nlookup = 1;
	__atomic_store_n(&g->state, SLOT_LIVE, __ATOMIC_RELEASE);
	atomic_fetch_add(&s->n_live, 1);
	pthread_mutex_unlock(&s->itab_lock);
	cntrfs_fill_entry(s, nodeid, gen, &st, e);
	return 0;
}

int cntrfs_lookup(struct req *r, struct inode *parent, int pfd, const char *name,
		  struct fuse_entry_out *e)
{
	struct dvs_fuse_server *s = r->s;
	if (name[0] == '.' && name[1] == '\0')
		return lookup_self(r, parent, pfd, e);
	if (name[0] == '.' && name[1] == '.' && name[2] == '\0') {
		if (parent == slot(s, 1))
			return lookup_self(r, parent, pfd, e);
		int up = openat(pfd, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (up < 0)
			return -errno;
		int ret = inside_root(s, up);
		if (ret == 0)
			ret = cntrfs_record_fd(r, up, up, "..", e, NULL);
		close(up);
		return ret;
	}
	struct stat st;
	if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	struct handle_buf h;
	int ret = handle_of(pfd, name, 0, &h);
	int fd = -1, anchor = -1;
	if (ret == 0) {
		pthread_mutex_lock(&s->anchor_lock);
		anchor = anchor_find(s, h.mount_id);
		pthread_mutex_unlock(&s->anchor_lock);
		if (anchor < 0)
			anchor = anchor_get(s, h.mount_id, -1, pfd, name);
		if (anchor < 0)
			ret = -EMFILE;
	}
	if (ret < 0) {
		if (ret == -ENOENT)
			return ret; /* raced with an unlink */
		if (!no_handle_fs(ret) && ret != -EMFILE)
			return ret;
		if (no_handle_fs(ret))
			log_no_handles(s, st.st_dev, ret);
		/* keep a descriptor instead of a handle; RESOLVE_BENEATH: one component, no ".." */
		fd = dvs_openat2(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0,
				 RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS);
		if (fd < 0)
			return fd;
		if (fstat(fd, &st) < 0) {
			ret = -errno;
			close(fd);
			return ret;
		}
		h.len = 0;
	}
	uint64_t nodeid;
	struct inode *ino;
	ret = record(s, &st, h.len ? &h : NULL, anchor, fd, &ino, &nodeid);
	if (ret < 0)
		return ret;
	cntrfs_fill_entry(s, nodeid, ino->gen, &st, e);
	return 0;
}

void cntrfs_forget(struct dvs_fuse_server *s, uint64_t nodeid, uint64_t n)
{
	uint32_t idx = (uint32_t)nodeid, gen = (uint32_t)(nodeid >> 32);
	if (idx <= 1 || idx > slots_used(s))
		return; /* the root is never forgotten */
	struct inode *e = slot(s, idx);
	int ghost = 0;
	pthread_mutex_lock(&s->itab_lock);
	if (e->state == SLOT_LIVE && e->gen == gen) {
		if (n >= e->nlookup) {
			e->nlookup = 0;
			__atomic_store_n(&e->state, SLOT_GHOST, __ATOMIC_RELEASE);
			atomic_fetch_sub(&s->n_live, 1);
			if (e->handle_len == 0)
				hash_remove(s, idx); /* cannot be revived */
			free_push(s, idx);
			ghost = 1;
		} else {
			e->nlookup -= n;
		}
	}
	pthread_mutex_unlock(&s->itab_lock);
	if (!ghost)
		return;
	pthread_mutex_lock(&e->lock);
	if (e->fd >= 0 && e->fd_users == 0 && e->nopen == 0) {
		close(e->fd);
		e->fd = -1;
		atomic_fetch_sub(&s->n_path_fds, 1);
	}
	pthread_mutex_unlock(&e->lock);
}
