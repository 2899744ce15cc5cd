/*
 * vfs.c -- a SQLite VFS whose files are sealed volumes (see shield.h).
 *
 * SQLite semantics relied on:
 * - Atomic commit in rollback-journal mode needs: xSync of the journal before the database
 *   is overwritten, xSync of the database before the journal is deleted, and reads after a
 *   crash that show each file as of its last xSync. A volume's flush is exactly that
 *   (atomic and durable), so xSync = flush, and a crash leaves every file at a flush.
 * - xRead past the end returns SQLITE_IOERR_SHORT_READ with the rest zeroed. A page that
 *   fails authentication returns SQLITE_IOERR_DATA ("checksum on a page is incorrect",
 *   SQLite's own code for this, 3.38+) with the buffer wiped; the failing file and block are
 *   kept for dvs_vfs_info so Python can raise IntegrityError naming them.
 * - Locks: SQLite asks for SHARED < RESERVED < PENDING < EXCLUSIVE per file handle. Several
 *   connections of this process share one volume per file (keyed by device and inode) and
 *   their locks are arbitrated here, like the unix VFS's per-inode table; other processes
 *   are kept out by an exclusive flock on the file, since a volume's tree lives in memory.
 * - io_methods version 1: no xShm*, so WAL is refused (rollback journals only).
 * - Files without a name (temporary, statement journals) are sealed too: O_TMPFILE volumes
 *   that are never synced.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shield/crypto.h"
#include "shield/shield.h"

struct shared {
	struct shared *next;
	dev_t dev;
	ino_t ino;
	int fd;
	int refs;
	struct dvs_engine *eng;
	struct dvs_shield_volume *vol;
	uint8_t *arena;
	size_t arena_len;
	int registered;   /* the arena is the engine's registered buffer 0 */
	uint64_t io_base_completed, io_base_syscalls; /* engine counters when attached */
	pthread_mutex_t io; /* one caller at a time on the volume and its engine */
	char path[256];     /* for reports */
	/* SQLite locks of all handles on this file */
	int level;    /* the strongest lock held by any handle */
	int n_shared; /* handles holding at least SHARED */
};

/* An engine and its registered arena, kept for the next file: SQLite creates and deletes
 * a journal per transaction, and a ring set-up (setup, mmap, register, restrict, enable)
 * per journal would cost more than the journal's I/O. */
struct pooled {
	struct dvs_engine *eng;
	uint8_t *arena;
	size_t arena_len;
	int registered;
};
#define POOL_MAX 4

struct dvs_vfs {
	sqlite3_vfs base; /* first: SQLite hands this pointer back */
	sqlite3_vfs *root;
	char name[64];
	struct dvs_shield_key key;
	uint8_t secret[32];
	uint64_t capacity;
	uint32_t engine_kind, read_slots, write_slots;
	pthread_mutex_t lock; /* the file table, the pool and the counters */
	struct shared *files;
	struct pooled pool[POOL_MAX];
	int n_pool;
	struct dvs_vfs_info info;
	struct dvs_vfs *next_registered;
};

struct vfs_file {
	sqlite3_file base;
	struct dvs_vfs *vfs;
	struct shared *sh;
	int lock;
	int readonly;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct dvs_vfs *registry;

/* ---- volumes on files ---- */

/* The engine's counters since this file attached to it (engines are reused). */
static void engine_delta(struct shared *sh, uint64_t *completed, uint64_t *syscalls)
{
	struct dvs_io_stats st;
	*completed = *syscalls = 0;
	if (sh->eng && !dvs_engine_stats(sh->eng, &st)) {
		*completed = st.completed - sh->io_base_completed;
		*syscalls = st.syscalls - sh->io_base_syscalls;
	}
}

static void mark_engine_base(struct shared *sh)
{
	struct dvs_io_stats st;
	if (!dvs_engine_stats(sh->eng, &st)) {
		sh->io_base_completed = st.completed;
		sh->io_base_syscalls = st.syscalls;
	}
}

static void release_shared(struct dvs_vfs *vfs, struct shared *sh, int discard)
{
	if (sh->vol)
		dvs_shield_close(sh->vol, discard);
	if (sh->eng) {
		uint64_t completed, syscalls;
		engine_delta(sh, &completed, &syscalls);
		/* detach the file (the ring drops its reference) and keep the engine for later */
		int reuse = sh->vol && !dvs_engine_update_file(sh->eng, 0, -1);
		pthread_mutex_lock(&vfs->lock);
		vfs->info.io_completed += completed;
		vfs->info.io_syscalls += syscalls;
		if (reuse && vfs->n_pool < POOL_MAX) {
			vfs->pool[vfs->n_pool++] = (struct pooled){ sh->eng, sh->arena, sh->arena_len,
								  sh->registered };
			sh->eng = NULL;
			sh->arena = NULL;
		}
		pthread_mutex_unlock(&vfs->lock);
	}
	dvs_engine_destroy(sh->eng);
	if (sh->arena)
		munmap(sh->arena, sh->arena_len);
	if (sh->fd >= 0) {
		flock(sh->fd, LOCK_UN); /* the ring may hold the file a little longer */
		close(sh->fd);
	}
	pthread_mutex_destroy(&sh->io);
	free(sh);
}

/* Count an integrity failure of sh's file and keep what the volume said about it. */
static void record_failure(struct dvs_vfs *vfs, const struct shared *sh,
			   const struct dvs_shield_status *st)
{
	pthread_mutex_lock(&vfs->lock);
	vfs->info.integrity_failures++;
	vfs->info.fail_kind = st->fail_kind;
	vfs->info.fail_level = st->fail_level;
	vfs->info.fail_index = st->fail_index;
	snprintf(vfs->info.fail_path, sizeof(vfs->info.fail_path), "%s", sh->path);
	pthread_mutex_unlock(&vfs->lock);
}

static void note_failure(struct dvs_vfs *vfs, struct shared *sh)
{
	struct dvs_shield_status st;
	if (!sh->vol)
		return;
	dvs_shield_status(sh->vol, &st);
	record_failure(vfs, sh, &st);
}

/* Engine + arena + volume on fd (formatting an empty file). */
static int engine_for(struct dvs_vfs *vfs, struct shared *sh)
{
	pthread_mutex_lock(&vfs->lock);
	struct pooled p = { 0 };
	if (vfs->n_pool)
		p = vfs->pool[--vfs->n_pool];
	pthread_mutex_unlock(&vfs->lock);
	if (!p.eng)
		return -ENOENT;
	int ret = dvs_engine_update_file(p.eng, 0, sh->fd);
	if (ret) {
		dvs_engine_destroy(p.eng);
		munmap(p.arena, p.arena_len);
		return ret;
	}
	sh->eng = p.eng;
	sh->arena = p.arena;
	sh->arena_len = p.arena_len;
	sh->registered = p.registered;
	return 0;
}

static int new_engine(struct dvs_vfs *vfs, struct shared *sh)
{
	sh->arena_len = dvs_shield_arena_bytes(vfs->read_slots, vfs->write_slots);
	sh->arena = mmap(NULL, sh->arena_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0);
	if (sh->arena == MAP_FAILED) {
		sh->arena = NULL;
		return -ENOMEM;
	}
	/* no SINGLE_ISSUER: a connection may be used from more than one thread (serialised by
	 * sh->io), which the kernel would refuse for a single-issuer ring */
	struct dvs_engine_params ep = {
		.kind = vfs->engine_kind,
		.entries = 64,
		.ring_flags = DVS_RING_COOP_TASKRUN | DVS_RING_ALLOW_FILE_UPDATE,
		.threads = 1,
		.sq_cpu = -1,
	};
	int ret = dvs_engine_create(&ep, &sh->eng);
	if (ret && vfs->engine_kind == DVS_ENGINE_RING) {
		ep.kind = DVS_ENGINE_THREADS; /* io_uring blocked here: the fallback */
		ret = dvs_engine_create(&ep, &sh->eng);
	}
	if (ret)
		return ret;
	int32_t fd = sh->fd;
	struct dvs_buf buf = { .addr = (uint64_t)(uintptr_t)sh->arena, .len = sh->arena_len };
	ret = dvs_engine_register_files(sh->eng, &fd, 1);
	sh->registered = !ret && !dvs_engine_register_buffers(sh->eng, &buf, 1);
	if (!ret)
		ret = dvs_engine_enable(sh->eng);
	return ret;
}

static int attach_volume(struct dvs_vfs *vfs, struct shared *sh, int fresh, int readonly,
			 int ephemeral, int journal, struct dvs_shield_status *st)
{
	int ret = engine_for(vfs, sh);
	if (ret)
		ret = new_engine(vfs, sh);
	if (ret)
		return ret;
	mark_engine_base(sh);
	struct dvs_shield_config cfg = {
		.capacity_blocks = vfs->capacity,
		.arena_addr = (uint64_t)(uintptr_t)sh->arena,
		.arena_len = sh->arena_len,
		.arena_buf = sh->registered ? 0 : DVS_IO_NO_BUF,
		.read_slots = vfs->read_slots,
		.write_slots = vfs->write_slots,
		/* SQLite syncs what it relies on; the second superblock copy can wait */
		.flags = (readonly ? DVS_VOL_READONLY : 0) | (ephemeral ? DVS_VOL_EPHEMERAL : 0) |
			 DVS_VOL_FAST_CLOSE,
		.file = 0,
	};
	if (!fresh) {
		ret = dvs_shield_open(sh->eng, &vfs->key, &cfg, &sh->vol, st);
		/* a journal that never reached its first sync holds nothing SQLite relies on:
		 * start it afresh (one that fails to authenticate is still an error) */
		fresh = ret == -EMEDIUMTYPE && journal && !readonly;
	}
	if (fresh) {
		/* journals become durable at their first sync; databases at once */
		cfg.flags |= journal ? DVS_VOL_LAZY_FORMAT : 0;
		ret = dvs_shield_format(sh->eng, &vfs->key, &cfg, &sh->vol, st);
	}
	if (!ret && fresh) {
		pthread_mutex_lock(&vfs->lock);
		vfs->info.volumes_formatted++;
		pthread_mutex_unlock(&vfs->lock);
	}
	return ret;
}

static int sqlite_code_for(int err, int fallback)
{
	switch (err) {
	case -EBADMSG:
		return SQLITE_IOERR_DATA;
	case -EKEYREJECTED:
	case -EMEDIUMTYPE:
		return SQLITE_NOTADB;
	case -EFBIG:
	case -ENOSPC:
		return SQLITE_FULL;
	case -ENOMEM:
		return SQLITE_IOERR_NOMEM;
	case -EROFS:
		return SQLITE_READONLY;
	case -EWOULDBLOCK:
		return SQLITE_BUSY;
	default:
		return fallback;
	}
}

/* ---- sqlite3_io_methods ---- */

static int x_close(sqlite3_file *pf)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	struct dvs_vfs *vfs = f->vfs;
	if (!f->sh)
		return SQLITE_OK;
	pthread_mutex_lock(&vfs->lock);
	struct shared *sh = f->sh;
	if (f->lock >= SQLITE_LOCK_SHARED && sh->n_shared > 0)
		sh->n_shared--;
	if (f->lock > SQLITE_LOCK_SHARED || sh->n_shared == 0)
		sh->level = sh->n_shared ? SQLITE_LOCK_SHARED : SQLITE_LOCK_NONE;
	int last = --sh->refs == 0;
	if (last) {
		for (struct shared **p = &vfs->files; *p; p = &(*p)->next) {
			if (*p == sh) {
				*p = sh->next;
				break;
			}
		}
		vfs->info.open_files--;
	}
	pthread_mutex_unlock(&vfs->lock);
	f->sh = NULL;
	if (last)
		release_shared(vfs, sh, 0);
	return SQLITE_OK;
}

static int x_read(sqlite3_file *pf, void *buf, int amt, sqlite3_int64 off)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	pthread_mutex_lock(&f->sh->io);
	int64_t n = dvs_shield_pread(f->sh->vol, buf, (uint64_t)amt, (uint64_t)off);
	pthread_mutex_unlock(&f->sh->io);
	if (n < 0) {
		memset(buf, 0, (size_t)amt);
		if (n == -EBADMSG)
			note_failure(f->vfs, f->sh);
		return sqlite_code_for((int)n, SQLITE_IOERR_READ);
	}
	if (n < amt) {
		memset((char *)buf + n, 0, (size_t)(amt - n));
		return SQLITE_IOERR_SHORT_READ;
	}
	return SQLITE_OK;
}

static int x_write(sqlite3_file *pf, const void *buf, int amt, sqlite3_int64 off)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	pthread_mutex_lock(&f->sh->io);
	int64_t n = dvs_shield_pwrite(f->sh->vol, buf, (uint64_t)amt, (uint64_t)off);
	pthread_mutex_unlock(&f->sh->io);
	if (n == -EBADMSG)
		note_failure(f->vfs, f->sh);
	return n < 0 ? sqlite_code_for((int)n, SQLITE_IOERR_WRITE) : SQLITE_OK;
}

static int x_truncate(sqlite3_file *pf, sqlite3_int64 size)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	pthread_mutex_lock(&f->sh->io);
	int ret = dvs_shield_truncate(f->sh->vol, (uint64_t)size);
	pthread_mutex_unlock(&f->sh->io);
	if (ret == -EBADMSG)
		note_failure(f->vfs, f->sh);
	return ret < 0 ? sqlite_code_for(ret, SQLITE_IOERR_TRUNCATE) : SQLITE_OK;
}

static int x_sync(sqlite3_file *pf, int flags)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	(void)flags; /* a flush is always full: data, tree and superblock */
	pthread_mutex_lock(&f->sh->io);
	int ret = dvs_shield_flush(f->sh->vol);
	pthread_mutex_unlock(&f->sh->io);
	pthread_mutex_lock(&f->vfs->lock);
	f->vfs->info.syncs++;
	pthread_mutex_unlock(&f->vfs->lock);
	return ret < 0 ? sqlite_code_for(ret, SQLITE_IOERR_FSYNC) : SQLITE_OK;
}

static int x_file_size(sqlite3_file *pf, sqlite3_int64 *size)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	pthread_mutex_lock(&f->sh->io);
	*size = (sqlite3_int64)dvs_shield_size(f->sh->vol);
	pthread_mutex_unlock(&f->sh->io);
	return SQLITE_OK;
}

static int x_lock(sqlite3_file *pf, int want)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	if (f->lock >= want)
		return SQLITE_OK;
	struct dvs_vfs *vfs = f->vfs;
	struct shared *sh = f->sh;
	int rc = SQLITE_OK;
	pthread_mutex_lock(&vfs->lock);
	if (f->lock != sh->level &&
	    (sh->level >= SQLITE_LOCK_PENDING || want > SQLITE_LOCK_SHARED)) {
		rc = SQLITE_BUSY; /* another handle holds what precludes this */
	} else if (want == SQLITE_LOCK_SHARED) {
		if (sh->level < SQLITE_LOCK_SHARED)
			sh->level = SQLITE_LOCK_SHARED;
		sh->n_shared++;
		f->lock = SQLITE_LOCK_SHARED;
	} else if (want == SQLITE_LOCK_EXCLUSIVE && sh->n_shared > 1) {
		/* readers remain: hold PENDING so no new reader starts, and retry */
		sh->level = SQLITE_LOCK_PENDING;
		f->lock = SQLITE_LOCK_PENDING;
		rc = SQLITE_BUSY;
	} else {
		sh->level = want;
		f->lock = want;
	}
	pthread_mutex_unlock(&vfs->lock);
	return rc;
}

static int x_unlock(sqlite3_file *pf, int want)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	if (f->lock <= want)
		return SQLITE_OK;
	struct shared *sh = f->sh;
	pthread_mutex_lock(&f->vfs->lock);
	if (f->lock > SQLITE_LOCK_SHARED)
		sh->level = SQLITE_LOCK_SHARED;
	if (want == SQLITE_LOCK_NONE) {
		sh->n_shared--;
		if (sh->n_shared == 0)
			sh->level = SQLITE_LOCK_NONE;
	}
	f->lock = want;
	pthread_mutex_unlock(&f->vfs->lock);
	return SQLITE_OK;
}

static int x_check_reserved(sqlite3_file *pf, int *out)
{
	struct vfs_file *f = (struct vfs_file *)pf;
	pthread_mutex_lock(&f->vfs->lock);
	*out = f->sh->level > SQLITE_LOCK_SHARED;
	pthread_mutex_unlock(&f->vfs->lock);
	return SQLITE_OK;
}

static int x_file_control(sqlite3_file *pf, int op, void *arg)
{
	(void)pf;
	if (op == SQLITE_FCNTL_VFSNAME) {
		*(char **)arg = sqlite3_mprintf("%s", ((struct vfs_file *)pf)->vfs->name);
		return SQLITE_OK;
	}
	return SQLITE_NOTFOUND;
}

static int x_sector_size(sqlite3_file *pf)
{
	(void)pf;
	return DVS_SHIELD_BLOCK;
}

static int x_device_characteristics(sqlite3_file *pf)
{
	(void)pf;
	/* uncommitted writes vanish together and committed ones are atomic: a crash never
	 * damages bytes next to a write, and a file never grows before its data is there */
	return SQLITE_IOCAP_POWERSAFE_OVERWRITE | SQLITE_IOCAP_SAFE_APPEND;
}

static const sqlite3_io_methods io_methods = {
	.iVersion = 1,
	.xClose = x_close,
	.xRead = x_read,
	.xWrite = x_write,
	.xTruncate = x_truncate,
	.xSync = x_sync,
	.xFileSize = x_file_size,
	.xLock = x_lock,
	.xUnlock = x_unlock,
	.xCheckReservedLock = x_check_reserved,
	.xFileControl = x_file_control,
	.xSectorSize = x_sector_size,
	.xDeviceCharacteristics = x_device_characteristics,
};

/* ---- sqlite3_vfs ---- */

static int x_open(sqlite3_vfs *pvfs, const char *name, sqlite3_file *pf, int flags, int *out_flags)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	struct vfs_file *f = (struct vfs_file *)pf;
	memset(f, 0, sizeof(*f));
	f->vfs = vfs;
	int readonly = (flags & SQLITE_OPEN_READONLY) != 0;
	int oflags = O_CLOEXEC | (readonly ? O_RDONLY : O_RDWR);
	int ephemeral = name == NULL;
	int fd;
	if (ephemeral) {
		const char *dir = getenv("TMPDIR");
		fd = open(dir && *dir ? dir : "/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
		readonly = 0;
	} else {
		if (flags & SQLITE_OPEN_CREATE)
			oflags |= O_CREAT;
		if (flags & SQLITE_OPEN_EXCLUSIVE)
			oflags |= O_EXCL;
		fd = open(name, oflags, 0600);
	}
	if (fd < 0)
		return SQLITE_CANTOPEN;
	struct stat stbuf;
	if (fstat(fd, &stbuf) < 0) {
		close(fd);
		return SQLITE_CANTOPEN;
	}
	pthread_mutex_lock(&vfs->lock);
	struct shared *sh = NULL;
	if (!ephemeral) {
		for (sh = vfs->files; sh; sh = sh->next)
			if (sh->dev == stbuf.st_dev && sh->ino == stbuf.st_ino)
				break;
	}
	if (sh) {
		sh->refs++;
		vfs->info.files_opened++;
		pthread_mutex_unlock(&vfs->lock);
		close(fd);
		goto opened;
	}
	pthread_mutex_unlock(&vfs->lock);

	sh = calloc(1, sizeof(*sh));
	if (!sh) {
		close(fd);
		return SQLITE_NOMEM;
	}
	sh->fd = fd;
	sh->dev = stbuf.st_dev;
	sh->ino = stbuf.st_ino;
	sh->refs = 1;
	snprintf(sh->path, sizeof(sh->path), "%s", name ? name : "(temporary file)");
	pthread_mutex_init(&sh->io, NULL);
	/* other processes stay out: the volume's tree lives in this process's memory */
	if (flock(fd, (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
		int busy = errno == EWOULDBLOCK;
		release_shared(vfs, sh, 1);
		return busy ? SQLITE_BUSY : SQLITE_CANTOPEN;
	}
	struct dvs_shield_status st;
	memset(&st, 0, sizeof(st));
	int journal = (flags & (SQLITE_OPEN_MAIN_JOURNAL | SQLITE_OPEN_TEMP_JOURNAL |
				SQLITE_OPEN_SUBJOURNAL | SQLITE_OPEN_SUPER_JOURNAL)) != 0;
	int ret = attach_volume(vfs, sh, stbuf.st_size == 0 && !readonly, readonly, ephemeral,
				journal, &st);
	if (ret) {
		if (ret == -EBADMSG)
			record_failure(vfs, sh, &st);
		release_shared(vfs, sh, 1);
		return sqlite_code_for(ret, SQLITE_CANTOPEN);
	}
	pthread_mutex_lock(&vfs->lock);
	/* a racing open of the same file may have won: use the one already there */
	struct shared *other = NULL;
	if (!ephemeral) {
		for (other = vfs->files; other; other = other->next)
			if (other->dev == sh->dev && other->ino == sh->ino)
				break;
	}
	if (other) {
		other->refs++;
		vfs->info.files_opened++;
		pthread_mutex_unlock(&vfs->lock);
		release_shared(vfs, sh, 1);
		sh = other;
		goto opened;
	}
	sh->next = vfs->files;
	vfs->files = sh;
	vfs->info.files_opened++;
	vfs->info.open_files++;
	pthread_mutex_unlock(&vfs->lock);
opened:
	f->sh = sh;
	f->readonly = readonly;
	pf->pMethods = &io_methods;
	if (out_flags)
		*out_flags = flags;
	return SQLITE_OK;
}

static int x_delete(sqlite3_vfs *pvfs, const char *name, int sync_dir)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xDelete(vfs->root, name, sync_dir);
}

static int x_access(sqlite3_vfs *pvfs, const char *name, int flags, int *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xAccess(vfs->root, name, flags, out);
}

static int x_full_pathname(sqlite3_vfs *pvfs, const char *name, int n, char *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xFullPathname(vfs->root, name, n, out);
}

static void *x_dlopen(sqlite3_vfs *pvfs, const char *name)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xDlOpen(vfs->root, name);
}

static void x_dlerror(sqlite3_vfs *pvfs, int n, char *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	vfs->root->xDlError(vfs->root, n, out);
}

static void (*x_dlsym(sqlite3_vfs *pvfs, void *h, const char *sym))(void)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xDlSym(vfs->root, h, sym);
}

static void x_dlclose(sqlite3_vfs *pvfs, void *h)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	vfs->root->xDlClose(vfs->root, h);
}

static int x_randomness(sqlite3_vfs *pvfs, int n, char *out)
{
	(void)pvfs;
	return dvs_random((uint8_t *)out, (size_t)n) ? 0 : n;
}

static int x_sleep(sqlite3_vfs *pvfs, int us)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xSleep(vfs->root, us);
}

static int x_current_time(sqlite3_vfs *pvfs, double *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xCurrentTime(vfs->root, out);
}

static int x_get_last_error(sqlite3_vfs *pvfs, int n, char *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xGetLastError(vfs->root, n, out);
}

static int x_current_time_int64(sqlite3_vfs *pvfs, sqlite3_int64 *out)
{
	struct dvs_vfs *vfs = (struct dvs_vfs *)pvfs;
	return vfs->root->xCurrentTimeInt64(vfs->root, out);
}

int dvs_vfs_register(const struct dvs_vfs_config *cfg)
{
	if (!cfg || !cfg->name || !*cfg->name || strlen(cfg->name) >= 64 ||
	    (cfg->kdf != DVS_KDF_RAW && cfg->kdf != DVS_KDF_DERIVED) || !cfg->capacity_blocks ||
	    cfg->capacity_blocks > DVS_SHIELD_MAX_CAPACITY || !cfg->read_slots || !cfg->write_slots)
		return -EINVAL;
	if (sqlite3_initialize() != SQLITE_OK)
		return -EIO;
	sqlite3_vfs *root = sqlite3_vfs_find(NULL);
	if (!root)
		return -ENOENT;
	pthread_mutex_lock(&registry_lock);
	for (struct dvs_vfs *r = registry; r; r = r->next_registered) {
		if (!strcmp(r->name, cfg->name)) {
			pthread_mutex_unlock(&registry_lock);
			return -EEXIST;
		}
	}
	struct dvs_vfs *vfs = calloc(1, sizeof(*vfs));
	if (!vfs) {
		pthread_mutex_unlock(&registry_lock);
		return -ENOMEM;
	}
	snprintf(vfs->name, sizeof(vfs->name), "%s", cfg->name);
	memcpy(vfs->secret, cfg->secret, 32);
	vfs->key.kdf = cfg->kdf;
	vfs->key.scrypt_log2_n = cfg->scrypt_log2_n;
	vfs->key.scrypt_r = cfg->scrypt_r;
	vfs->key.scrypt_p = cfg->scrypt_p;
	memcpy(vfs->key.salt, cfg->salt, 32);
	vfs->key.secret = vfs->secret;
	vfs->key.secret_len = 32;
	vfs->capacity = cfg->capacity_blocks;
	vfs->engine_kind = cfg->engine_kind == DVS_ENGINE_THREADS ? DVS_ENGINE_THREADS
								   : DVS_ENGINE_RING;
	vfs->read_slots = cfg->read_slots;
	vfs->write_slots = cfg->write_slots;
	vfs->root = root;
	pthread_mutex_init(&vfs->lock, NULL);
	sqlite3_vfs *b = &vfs->base;
	b->iVersion = 2;
	b->szOsFile = sizeof(struct vfs_file);
	b->mxPathname = root->mxPathname;
	b->zName = vfs->name;
	b->xOpen = x_open;
	b->xDelete = x_delete;
	b->xAccess = x_access;
	b->xFullPathname = x_full_pathname;
	b->xDlOpen = x_dlopen;
	b->xDlError = x_dlerror;
	b->xDlSym = x_dlsym;
	b->xDlClose = x_dlclose;
	b->xRandomness = x_randomness;
	b->xSleep = x_sleep;
	b->xCurrentTime = x_current_time;
	b->xGetLastError = x_get_last_error;
	b->xCurrentTimeInt64 = x_current_time_int64;
	int rc = sqlite3_vfs_register(b, cfg->make_default ? 1 : 0);
	if (rc != SQLITE_OK) {
		dvs_wipe(vfs->secret, 32);
		free(vfs);
		pthread_mutex_unlock(&registry_lock);
		return -EIO;
	}
	vfs->next_registered = registry;
	registry = vfs;
	pthread_mutex_unlock(&registry_lock);
	return 0;
}

int dvs_vfs_unregister(const char *name)
{
	pthread_mutex_lock(&registry_lock);
	for (struct dvs_vfs **p = &registry; *p; p = &(*p)->next_registered) {
		struct dvs_vfs *vfs = *p;
		if (strcmp(vfs->name, name))
			continue;
		pthread_mutex_lock(&vfs->lock);
		int busy = vfs->files != NULL;
		pthread_mutex_unlock(&vfs->lock);
		if (busy) {
			pthread_mutex_unlock(&registry_lock);
			return -EBUSY;
		}
		sqlite3_vfs_unregister(&vfs->base);
		for (int i = 0; i < vfs->n_pool; i++) {
			dvs_engine_destroy(vfs->pool[i].eng);
			munmap(vfs->pool[i].arena, vfs->pool[i].arena_len);
		}
		*p = vfs->next_registered;
		pthread_mutex_unlock(&registry_lock);
		dvs_wipe(vfs->secret, 32);
		pthread_mutex_destroy(&vfs->lock);
		free(vfs);
		return 0;
	}
	pthread_mutex_unlock(&registry_lock);
	return -ENOENT;
}

int dvs_vfs_info(const char *name, struct dvs_vfs_info *out)
{
	pthread_mutex_lock(&registry_lock);
	for (struct dvs_vfs *vfs = registry; vfs; vfs = vfs->next_registered) {
		if (strcmp(vfs->name, name))
			continue;
		pthread_mutex_lock(&vfs->lock);
		*out = vfs->info;
		/* include the engines still open */
		for (struct shared *sh = vfs->files; sh; sh = sh->next) {
			uint64_t completed, syscalls;
			pthread_mutex_lock(&sh->io);
			engine_delta(sh, &completed, &syscalls);
			pthread_mutex_unlock(&sh->io);
			out->io_completed += completed;
			out->io_syscalls += syscalls;
		}
		pthread_mutex_unlock(&vfs->lock);
		pthread_mutex_unlock(&registry_lock);
		return 0;
	}
	pthread_mutex_unlock(&registry_lock);
	return -ENOENT;
}
