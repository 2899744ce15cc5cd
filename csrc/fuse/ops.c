/*
 * ops.c -- the FUSE operations of CntrFS.
 *
 * Each handler returns -errno for an error reply, or 0 after replying itself. Rules they
 * follow (kernel semantics in parentheses):
 * - Names are single components validated by the decoder; every call is *at() relative to a
 *   pinned descriptor of the parent, with no symlink following (O_NOFOLLOW,
 *   AT_SYMLINK_NOFOLLOW, openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS for creation): a
 *   symlink swapped in on the backing store is never followed by the server.
 * - Operations on an inode without a name use its O_PATH descriptor: fstatat/utimensat/
 *   fchownat/fchmodat2 with AT_EMPTY_PATH, or /proc/self/fd/N (a "magic link" that
 *   resolves to exactly that inode, even a symlink, and is never subject to a rename race)
 *   for open, truncate, xattrs and link.
 * - Requests run with the caller's credentials (creds.c), so the backing filesystem checks
 *   permissions, applies the umask/default ACLs and assigns owners exactly as for a native
 *   caller; the kernel also checks them first (default_permissions).
 * - fsync datasync flag: FUSE_FSYNC_FDATASYNC set means fdatasync (CNTR had it inverted).
 * - POSIX locks become OFD locks on a descriptor private to the lock owner (the kernel's
 *   fl_owner), so they conflict with locks on the backing file taken by anyone else, and
 *   are dropped on FLUSH of that owner (close()) as POSIX requires. flock() locks go to the
 *   open file's own descriptor (their owner is the open file, as natively). Blocking
 *   requests wait on a thread of their own so no worker is held, and FUSE_INTERRUPT wakes
 *   them with EINTR (a killed waiter must not hang in the kernel).
 * - Passthrough: each open regular file registers its backing descriptor
 *   (FUSE_DEV_IOC_BACKING_OPEN) once per inode -- the kernel requires every passthrough open
 *   of an inode to share one backing file -- and replies FOPEN_PASSTHROUGH, after which
 *   reads, writes and mmap never reach the server.
 * - Kill-priv v2: the kernel asks us to clear suid/sgid (FUSE_WRITE_KILL_SUIDGID,
 *   FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID, FUSE_SETXATTR_ACL_KILL_SGID) when the caller
 *   lacks CAP_FSETID; we clear them as the kernel's file_remove_privs would.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "fuse/internal.h"
#include "sys/sys.h"

#define FILES_PER_CHUNK 1024u
#define MAX_FCHUNKS 1024u
#define OFFSET_MAX 0x7fffffffffffffffull

/* ---- file table ---- */

int cntrfs_ftab_init(struct dvs_fuse_server *s)
{
	s->fchunks = calloc(MAX_FCHUNKS, sizeof(*s->fchunks));
	if (!s->fchunks)
		return -ENOMEM;
	pthread_mutex_init(&s->ftab_lock, NULL);
	pthread_mutex_init(&s->block_lock, NULL);
	return 0;
}

static inline struct file *fslot(struct dvs_fuse_server *s, uint32_t idx)
{
	return &s->fchunks[idx / FILES_PER_CHUNK][idx % FILES_PER_CHUNK];
}

void cntrfs_ftab_free(struct dvs_fuse_server *s)
{
	if (!s->fchunks)
		return;
	for (uint32_t i = 1; i <= s->n_files; i++) {
		struct file *f = fslot(s, i);
		if (f->in_use && f->fd >= 0)
			close(f->fd);
		free(f->dirbuf);
		pthread_mutex_destroy(&f->dir_lock);
	}
	for (uint32_t c = 0; c < MAX_FCHUNKS && s->fchunks[c]; c++)
		free(s->fchunks[c]);
	free(s->fchunks);
	s->fchunks = NULL;
}

static struct file *file_alloc(struct dvs_fuse_server *s, uint64_t *fh)
{
	pthread_mutex_lock(&s->ftab_lock);
	uint32_t idx = s->ffree_head;
	if (idx) {
		s->ffree_head = fslot(s, idx)->free_next;
	} else {
		idx = s->n_files + 1;
		uint32_t c = idx / FILES_PER_CHUNK;
		if (c >= MAX_FCHUNKS) {
			pthread_mutex_unlock(&s->ftab_lock);
			return NULL;
		}
		if (!s->fchunks[c]) {
			struct file *chunk = calloc(FILES_PER_CHUNK, sizeof(*chunk));
			if (!chunk) {
				pthread_mutex_unlock(&s->ftab_lock);
				return NULL;
			}
			for (uint32_t i = 0; i < FILES_PER_CHUNK; i++) {
				pthread_mutex_init(&chunk[i].dir_lock, NULL);
				chunk[i].fd = -1;
				chunk[i].idx = c * FILES_PER_CHUNK + i;
			}
			s->fchunks[c] = chunk;
		}
		__atomic_store_n(&s->n_files, idx, __ATOMIC_RELEASE);
	}
	struct file *f = fslot(s, idx);
	f->gen++;
	f->in_use = 1;
	f->is_dir = 0;
	f->passthrough = 0;
	f->fd = -1;
	f->inode = NULL;
	f->dir_valid = 0;
	f->dir_len = f->dir_pos = 0;
	f->dir_off = 0;
	*fh = (uint64_t)f->gen << 32 | idx;
	pthread_mutex_unlock(&s->ftab_lock);
	atomic_fetch_add(&s->open_files, 1);
	return f;
}

static void file_free(struct dvs_fuse_server *s, struct file *f)
{
	pthread_mutex_lock(&s->ftab_lock);
	uint32_t idx = f->idx;
	f->in_use = 0;
	f->fd = -1;
	f->free_next = s->ffree_head;
	s->ffree_head = idx;
	pthread_mutex_unlock(&s->ftab_lock);
	atomic_fetch_sub(&s->open_files, 1);
}

struct file *cntrfs_file(struct dvs_fuse_server *s, uint64_t fh)
{
	uint32_t idx = (uint32_t)fh, gen = (uint32_t)(fh >> 32);
	if (idx == 0 || idx > __atomic_load_n(&s->n_files, __ATOMIC_ACQUIRE))
		return NULL;
	struct file *f = fslot(s, idx);
	if (!f->in_use || f->gen != gen)
		return NULL;
	return f;
}

/* Some open file's descriptor of this inode (for unlinked files whose handle is stale). */
static int any_open_fd(struct dvs_fuse_server *s, struct inode *ino)
{
	int fd = -1;
	pthread_mutex_lock(&s->ftab_lock);
	for (uint32_t i = 1; i <= s->n_files && fd < 0; i++) {
		struct file *f = fslot(s, i);
		if (f->in_use && f->inode == ino && f->fd >= 0)
			fd = fcntl(f->fd, F_DUPFD_CLOEXEC, 3);
	}
	pthread_mutex_unlock(&s->ftab_lock);
	return fd;
}

/* ---- small helpers ---- */

static int proc_path(char *buf, size_t cap, int fd)
{
	return snprintf(buf, cap, "/proc/self/fd/%d", fd);
}

static int node_fd(struct req *r, struct inode **ino)
{
	*ino = cntrfs_inode(r->s, r->in->nodeid);
	if (!*ino)
		return -ESTALE;
	return cntrfs_inode_fd(r->s, *ino);
}

static int name_arg(struct req *r, uint32_t skip, int index, const char **name)
{
	uint32_t len;
	int ret = cntrfs_arg_string(r, skip, index, name, &len);
	if (ret < 0)
		return ret;
	ret = cntrfs_valid_name(*name, len);
	if (ret < 0)
		return ret;
	if (((*name)[0] == '.' && len == 1) || (len == 2 && (*name)[0] == '.' && (*name)[1] == '.'))
		return -EINVAL;
	return 0;
}

static int reply_entry(struct req *r, struct fuse_entry_out *e)
{
	int ret = cntrfs_reply_buf(r, e, sizeof(*e));
	if (r->reply_failed && e->nodeid)
		cntrfs_forget(r->s, e->nodeid, 1); /* the kernel never saw it */
	return ret;
}

static int reply_attr(struct req *r, const struct stat *st)
{
	struct fuse_attr_out out;
	memset(&out, 0, sizeof(out));
	out.attr_valid = r->s->attr_sec;
	out.attr_valid_nsec = r->s->attr_nsec;
	cntrfs_fill_attr(r->s, st, &out.attr);
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

/* Clear suid, and sgid when group-executable, as file_remove_privs() does. */
static int kill_suidgid(int fd_path_fd, int sgid_only_if_gexec)
{
	struct stat st;
	if (fstatat(fd_path_fd, "", &st, AT_EMPTY_PATH) < 0)
		return -errno;
	mode_t mode = st.st_mode & 07777;
	mode_t keep = mode & ~(mode_t)S_ISUID;
	if (!sgid_only_if_gexec || (mode & S_IXGRP))
		keep &= ~(mode_t)S_ISGID;
	if (keep == mode || !S_ISREG(st.st_mode))
		return 0;
	int token = cntrfs_priv_enter();
	int ret = dvs_sys_fchmodat2(fd_path_fd, "", keep, AT_EMPTY_PATH);
	cntrfs_priv_leave(token);
	return ret;
}

static int with_caller(struct req *r)
{
	return cntrfs_creds_for(r);
}

/* ---- entries ---- */

int cntrfs_op_lookup(struct req *r)
{
	const char *name;
	uint32_t len;
	int ret = cntrfs_arg_string(r, 0, 0, &name, &len);
	if (ret < 0)
		return ret;
	if ((ret = cntrfs_valid_name(name, len)) < 0)
		return ret;
	struct fuse_entry_out e;
	struct inode *dir = cntrfs_inode(r->s, r->in->nodeid);
	if (!dir) {
		if (len == 1 && name[0] == '.') {
			/* export handle of a forgotten inode (open_by_handle_at on the mount) */
			if ((ret = cntrfs_revive(r, r->in->nodeid, &e)) < 0)
				return ret;
			return reply_entry(r, &e);
		}
		return -ESTALE;
	}
	if ((ret = with_caller(r)) < 0)
		return ret;
	int pfd = cntrfs_inode_fd(r->s, dir);
	if (pfd < 0)
		return pfd;
	ret = cntrfs_lookup(r, dir, pfd, name, &e);
	cntrfs_inode_put(r->s, dir);
	if (ret == -ENOENT && (r->s->entry_sec || r->s->entry_nsec)) {
		/* a negative entry the kernel may cache as long as a positive one */
		cntrfs_fill_entry(r->s, 0, 0, NULL, &e);
		return cntrfs_reply_buf(r, &e, sizeof(e));
	}
	if (ret < 0)
		return ret;
	return reply_entry(r, &e);
}

int cntrfs_op_forget(struct req *r)
{
	const struct fuse_forget_in *in = (const void *)r->arg;
	cntrfs_forget(r->s, r->in->nodeid, in->nlookup);
	return 0;
}

int cntrfs_op_batch_forget(struct req *r)
{
	const struct fuse_batch_forget_in *in = (const void *)r->arg;
	uint64_t room = (r->arglen - sizeof(*in)) / sizeof(struct fuse_forget_one);
	if (in->count > room)
		return 0; /* malformed: no reply exists for forgets; ignore it */
	const struct fuse_forget_one *one = (const void *)(in + 1);
	for (uint32_t i = 0; i < in->count; i++) {
		struct fuse_forget_one item;
		memcpy(&item, &one[i], sizeof(item));
		cntrfs_forget(r->s, item.nodeid, item.nlookup);
	}
	return 0;
}

/* After a create-type operation: look the new name up, or undo nothing (creation stays). */
static int new_entry(struct req *r, struct inode *dir, int pfd, const char *name)
{
	struct fuse_entry_out e;
	int ret = cntrfs_lookup(r, dir, pfd, name, &e);
	if (ret < 0)
		return ret;
	return reply_entry(r, &e);
}

static uint32_t dev_decode(uint32_t rdev)
{
	/* new_decode_dev() of the kernel */
	uint32_t maj = (rdev & 0xfff00) >> 8;
	uint32_t min = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
	return (uint32_t)makedev(maj, min);
}

int cntrfs_op_mknod(struct req *r)
{
	const struct fuse_mknod_in *in = (const void *)r->arg;
	const char *name;
	int ret = name_arg(r, sizeof(*in), 0, &name);
	if (ret < 0)
		return ret;
	struct inode *dir;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	cntrfs_set_umask(in->umask);
	if ((ret = with_caller(r)) == 0) {
		if (mknodat(pfd, name, in->mode, dev_decode(in->rdev)) < 0)
			ret = -errno;
		else
			ret = new_entry(r, dir, pfd, name);
	}
	cntrfs_inode_put(r->s, dir);
	return ret;
}

int cntrfs_op_mkdir(struct req *r)
{
	const struct fuse_mkdir_in *in = (const void *)r->arg;
	const char *name;
	int ret = name_arg(r, sizeof(*in), 0, &name);
	if (ret < 0)
		return ret;
	struct inode *dir;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	cntrfs_set_umask(in->umask);
	if ((ret = with_caller(r)) == 0) {
		if (mkdirat(pfd, name, in->mode & 07777) < 0)
			ret = -errno;
		else
			ret = new_entry(r, dir, pfd, name);
	}
	cntrfs_inode_put(r->s, dir);
	return ret;
}

int cntrfs_op_symlink(struct req *r)
{
	const char *name, *target;
	uint32_t tlen;
	int ret = name_arg(r, 0, 0, &name);
	if (ret < 0)
		return ret;
	if ((ret = cntrfs_arg_string(r, 0, 1, &target, &tlen)) < 0)
		return ret;
	if (tlen == 0)
		return -ENOENT;
	if (tlen >= PATH_MAX)
		return -ENAMETOOLONG;
	struct inode *dir;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	if ((ret = with_caller(r)) == 0) {
		if (symlinkat(target, pfd, name) < 0)
			ret = -errno;
		else
			ret = new_entry(r, dir, pfd, name);
	}
	cntrfs_inode_put(r->s, dir);
	return ret;
}

static int do_unlink(struct req *r, int flags)
{
	const char *name;
	int ret = name_arg(r, 0, 0, &name);
	if (ret < 0)
		return ret;
	struct inode *dir;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	if ((ret = with_caller(r)) == 0 && unlinkat(pfd, name, flags) < 0)
		ret = -errno;
	cntrfs_inode_put(r->s, dir);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

int cntrfs_op_unlink(struct req *r)
{
	return do_unlink(r, 0);
}

int cntrfs_op_rmdir(struct req *r)
{
	return do_unlink(r, AT_REMOVEDIR);
}

static int do_rename(struct req *r, uint64_t newdir_id, uint32_t flags, uint32_t skip)
{
	const char *oldname, *newname;
	int ret = name_arg(r, skip, 0, &oldname);
	if (ret < 0)
		return ret;
	if ((ret = name_arg(r, skip, 1, &newname)) < 0)
		return ret;
	if (flags & ~(uint32_t)(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT))
		return -EINVAL;
	struct inode *odir, *ndir = cntrfs_inode(r->s, newdir_id);
	if (!ndir)
		return -ESTALE;
	int ofd = node_fd(r, &odir);
	if (ofd < 0)
		return ofd;
	int nfd = cntrfs_inode_fd(r->s, ndir);
	if (nfd < 0) {
		cntrfs_inode_put(r->s, odir);
		return nfd;
	}
	if ((ret = with_caller(r)) == 0 && renameat2(ofd, oldname, nfd, newname, flags) < 0)
		ret = -errno;
	cntrfs_inode_put(r->s, ndir);
	cntrfs_inode_put(r->s, odir);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

int cntrfs_op_rename(struct req *r)
{
	const struct fuse_rename_in *in = (const void *)r->arg;
	return do_rename(r, in->newdir, 0, sizeof(*in));
}

int cntrfs_op_rename2(struct req *r)
{
	const struct fuse_rename2_in *in = (const void *)r->arg;
	return do_rename(r, in->newdir, in->flags, sizeof(*in));
}

int cntrfs_op_link(struct req *r)
{
	const struct fuse_link_in *in = (const void *)r->arg;
	const char *name;
	int ret = name_arg(r, sizeof(*in), 0, &name);
	if (ret < 0)
		return ret;
	struct inode *src = cntrfs_inode(r->s, in->oldnodeid), *dir;
	if (!src)
		return -ESTALE;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	int sfd = cntrfs_inode_fd(r->s, src);
	if (sfd < 0) {
		cntrfs_inode_put(r->s, dir);
		return sfd;
	}
	if ((ret = with_caller(r)) == 0) {
		/* linkat(AT_EMPTY_PATH) names exactly this inode (a /proc/self/fd path would work
		 * too, but is refused with EXDEV in some mount setups); it needs
		 * CAP_DAC_READ_SEARCH, and only that is raised: write permission on the new
		 * parent is still checked with the caller's ids */
		int token = cntrfs_priv_only(CAP_DAC_READ_SEARCH);
		if (linkat(sfd, "", pfd, name, AT_EMPTY_PATH) < 0)
			ret = -errno;
		cntrfs_priv_leave(token);
		if (ret == 0)
			ret = new_entry(r, dir, pfd, name);
	}
	cntrfs_inode_put(r->s, src);
	cntrfs_inode_put(r->s, dir);
	return ret;
}

/* ---- attributes ---- */

static int stat_inode(struct req *r, struct inode *ino, struct stat *st)
{
	int fd = cntrfs_inode_fd(r->s, ino);
	if (fd == -ESTALE) {
		/* unlinked while open: the handle no longer resolves, an open file still does */
		int ofd = any_open_fd(r->s, ino);
		if (ofd < 0)
			return -ESTALE;
		int ret = fstat(ofd, st) < 0 ? -errno : 0;
		close(ofd);
		return ret;
	}
	if (fd < 0)
		return fd;
	int ret = fstatat(fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
	cntrfs_inode_put(r->s, ino);
	return ret;
}

int cntrfs_op_getattr(struct req *r)
{
	const struct fuse_getattr_in *in = (const void *)r->arg;
	struct stat st;
	int ret;
	if (in->getattr_flags & FUSE_GETATTR_FH) {
		struct file *f = cntrfs_file(r->s, in->fh);
		if (!f)
			return -EBADF;
		ret = fstat(f->fd, &st) < 0 ? -errno : 0;
	} else {
		struct inode *ino = cntrfs_inode(r->s, r->in->nodeid);
		if (!ino)
			return -ESTALE;
		ret = stat_inode(r, ino, &st);
	}
	if (ret < 0)
		return ret;
	return reply_attr(r, &st);
}

int cntrfs_op_setattr(struct req *r)
{
	const struct fuse_setattr_in *in = (const void *)r->arg;
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	struct file *f = (in->valid & FATTR_FH) ? cntrfs_file(r->s, in->fh) : NULL;
	int ret = with_caller(r);
	char path[48];
	proc_path(path, sizeof(path), fd);
	if (ret == 0 && (in->valid & FATTR_MODE)) {
		mode_t mode = in->mode & 07777;
		if (f && f->fd >= 0)
			ret = fchmod(f->fd, mode) < 0 ? -errno : 0;
		else
			ret = dvs_sys_fchmodat2(fd, "", mode, AT_EMPTY_PATH);
		if (ret == -ENOSYS)
			ret = chmod(path, mode) < 0 ? -errno : 0;
	}
	if (ret == 0 && (in->valid & (FATTR_UID | FATTR_GID))) {
		uid_t uid = (in->valid & FATTR_UID) ? cntrfs_uid_to_backing(r->s, in->uid) : (uid_t)-1;
		gid_t gid = (in->valid & FATTR_GID) ? cntrfs_gid_to_backing(r->s, in->gid) : (gid_t)-1;
		if (fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			ret = -errno;
	}
	if (ret == 0 && (in->valid & FATTR_SIZE)) {
		if (f && f->fd >= 0 && !f->is_dir)
			ret = ftruncate(f->fd, (off_t)in->size) < 0 ? -errno : 0;
		else
			ret = truncate(path, (off_t)in->size) < 0 ? -errno : 0;
	}
	if (ret == 0 && (in->valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW))) {
		struct timespec ts[2] = { { 0, UTIME_OMIT }, { 0, UTIME_OMIT } };
		if (in->valid & FATTR_ATIME_NOW)
			ts[0].tv_nsec = UTIME_NOW;
		else if (in->valid & FATTR_ATIME)
			ts[0] = (struct timespec){ (time_t)in->atime, (long)in->atimensec };
		if (in->valid & FATTR_MTIME_NOW)
			ts[1].tv_nsec = UTIME_NOW;
		else if (in->valid & FATTR_MTIME)
			ts[1] = (struct timespec){ (time_t)in->mtime, (long)in->mtimensec };
		if (utimensat(fd, "", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			ret = -errno;
	}
	if (ret == 0 && (in->valid & FATTR_KILL_SUIDGID) && !(in->valid & FATTR_MODE))
		ret = kill_suidgid(fd, 1);
	struct stat st;
	if (ret == 0)
		ret = fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	return reply_attr(r, &st);
}

int cntrfs_op_statx(struct req *r)
{
	const struct dvs_fuse_statx_in *in = (const void *)r->arg;
	struct statx stx;
	int ret, fd = -1;
	struct inode *ino = NULL;
	struct file *f = NULL;
	if (in->getattr_flags & FUSE_GETATTR_FH) {
		f = cntrfs_file(r->s, in->fh);
		if (!f)
			return -EBADF;
		fd = f->fd;
	} else {
		fd = node_fd(r, &ino);
		if (fd < 0)
			return fd;
	}
	int flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | (int)(in->sx_flags & AT_STATX_SYNC_TYPE);
	ret = statx(fd, "", flags, in->sx_mask | STATX_BASIC_STATS, &stx) < 0 ? -errno : 0;
	if (ino)
		cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	struct dvs_fuse_statx_out out;
	memset(&out, 0, sizeof(out));
	out.attr_valid = r->s->attr_sec;
	out.attr_valid_nsec = r->s->attr_nsec;
	struct dvs_fuse_statx *x = &out.stat;
	x->mask = stx.stx_mask;
	x->blksize = stx.stx_blksize;
	x->attributes = stx.stx_attributes;
	x->nlink = stx.stx_nlink;
	x->uid = cntrfs_uid_to_kernel(r->s, stx.stx_uid);
	x->gid = cntrfs_gid_to_kernel(r->s, stx.stx_gid);
	x->mode = stx.stx_mode;
	x->ino = stx.stx_ino;
	x->size = stx.stx_size;
	x->blocks = stx.stx_blocks;
	x->attributes_mask = stx.stx_attributes_mask;
#define SXT(dst, src) (dst) = (struct dvs_fuse_sx_time){ (src).tv_sec, (src).tv_nsec, 0 }
	SXT(x->atime, stx.stx_atime);
	SXT(x->btime, stx.stx_btime);
	SXT(x->ctime, stx.stx_ctime);
	SXT(x->mtime, stx.stx_mtime);
#undef SXT
	x->rdev_major = stx.stx_rdev_major;
	x->rdev_minor = stx.stx_rdev_minor;
	x->dev_major = stx.stx_dev_major;
	x->dev_minor = stx.stx_dev_minor;
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

int cntrfs_op_readlink(struct req *r)
{
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	char buf[PATH_MAX];
	ssize_t n = readlinkat(fd, "", buf, sizeof(buf));
	int ret = n < 0 ? -errno : 0;
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	if ((size_t)n >= sizeof(buf))
		return -ENAMETOOLONG;
	return cntrfs_reply_buf(r, buf, (size_t)n);
}

int cntrfs_op_access(struct req *r)
{
	const struct fuse_access_in *in = (const void *)r->arg;
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	int ret = with_caller(r);
	if (ret == 0 && syscall(SYS_faccessat2, fd, "", (int)(in->mask & 7),
				AT_EMPTY_PATH | AT_EACCESS) < 0)
		ret = -errno;
	cntrfs_inode_put(r->s, ino);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

int cntrfs_op_statfs(struct req *r)
{
	struct inode *ino = cntrfs_inode(r->s, r->in->nodeid);
	if (!ino)
		ino = cntrfs_inode(r->s, FUSE_ROOT_ID);
	int fd = cntrfs_inode_fd(r->s, ino);
	if (fd < 0)
		return fd;
	struct statfs sf;
	int ret = fstatfs(fd, &sf) < 0 ? -errno : 0;
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	struct fuse_statfs_out out;
	memset(&out, 0, sizeof(out));
	out.st.blocks = sf.f_blocks;
	out.st.bfree = sf.f_bfree;
	out.st.bavail = sf.f_bavail;
	out.st.files = sf.f_files;
	out.st.ffree = sf.f_ffree;
	out.st.bsize = (uint32_t)sf.f_bsize;
	out.st.namelen = (uint32_t)sf.f_namelen;
	out.st.frsize = (uint32_t)sf.f_frsize;
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

/* ---- xattrs ---- */

static int is_acl(const char *name)
{
	return strcmp(name, "system.posix_acl_access") == 0 ||
	       strcmp(name, "system.posix_acl_default") == 0;
}

int cntrfs_op_setxattr(struct req *r)
{
	uint32_t hdr = r->s->setxattr_ext ? sizeof(struct fuse_setxattr_in)
					  : FUSE_COMPAT_SETXATTR_IN_SIZE;
	if (r->arglen < hdr)
		return -EINVAL;
	const struct fuse_setxattr_in *in = (const void *)r->arg;
	uint32_t setxattr_flags = r->s->setxattr_ext ? in->setxattr_flags : 0;
	const char *name;
	uint32_t nlen;
	int ret = cntrfs_arg_string(r, hdr, 0, &name, &nlen);
	if (ret < 0)
		return ret;
	if (nlen == 0 || nlen > XATTR_NAME_MAX)
		return nlen ? -ERANGE : -EINVAL;
	uint32_t value_off = hdr + nlen + 1;
	if (in->size > CNTRFS_XATTR_MAX || r->arglen - value_off < in->size)
		return -EINVAL;
	const uint8_t *value = r->arg + value_off;
	uint8_t *copy = NULL;
	if (is_acl(name) && (!cntrfs_map_is_identity(&r->s->uid_map) ||
			     !cntrfs_map_is_identity(&r->s->gid_map))) {
		copy = malloc(in->size ? in->size : 1);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, value, in->size);
		cntrfs_acl_translate(r->s, copy, in->size, 1);
		value = copy;
	}
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0) {
		free(copy);
		return fd;
	}
	char path[48];
	proc_path(path, sizeof(path), fd);
	if ((ret = with_caller(r)) == 0 && setxattr(path, name, value, in->size, (int)in->flags) < 0)
		ret = -errno;
	if (ret == 0 && (setxattr_flags & FUSE_SETXATTR_ACL_KILL_SGID)) {
		struct stat st;
		if (fstatat(fd, "", &st, AT_EMPTY_PATH) == 0 && (st.st_mode & S_ISGID)) {
			int token = cntrfs_priv_enter();
			ret = dvs_sys_fchmodat2(fd, "", st.st_mode & 07777 & ~(mode_t)S_ISGID,
						AT_EMPTY_PATH);
			cntrfs_priv_leave(token);
		}
	}
	cntrfs_inode_put(r->s, ino);
	free(copy);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

int cntrfs_op_getxattr(struct req *r)
{
	const struct fuse_getxattr_in *in = (const void *)r->arg;
	const char *name;
	uint32_t nlen;
	int ret = cntrfs_arg_string(r, sizeof(*in), 0, &name, &nlen);
	if (ret < 0)
		return ret;
	if (nlen == 0 || nlen > XATTR_NAME_MAX)
		return nlen ? -ERANGE : -EINVAL;
	uint32_t size = in->size;
	if (size > CNTRFS_XATTR_MAX)
		size = CNTRFS_XATTR_MAX;
	if (size > r->w->out_cap)
		return -ERANGE;
	struct inode *ino = cntrfs_inode(r->s, r->in->nodeid);
	if (!ino)
		return -ESTALE;
	if ((ret = with_caller(r)) < 0)
		return ret;
	ssize_t n = 0;
	/* an open file of the inode answers without re-opening it (every write asks for
	 * security.capability: the kernel's suid-clearing check) */
	pthread_mutex_lock(&ino->lock);
	if (ino->xattr_fd >= 0) {
		n = fgetxattr(ino->xattr_fd, name, size ? r->w->out : NULL, size);
		ret = n < 0 ? -errno : 1;
	}
	pthread_mutex_unlock(&ino->lock);
	if (ret == 0) {
		int fd = cntrfs_inode_fd(r->s, ino);
		if (fd < 0)
			return fd;
		char path[48];
		proc_path(path, sizeof(path), fd);
		n = getxattr(path, name, size ? r->w->out : NULL, size);
		ret = n < 0 ? -errno : 0;
		cntrfs_inode_put(r->s, ino);
	}
	if (ret > 0)
		ret = 0;
	if (ret < 0)
		return ret;
	if (size == 0) {
		struct fuse_getxattr_out out = { .size = (uint32_t)n };
		return cntrfs_reply_buf(r, &out, sizeof(out));
	}
	if (is_acl(name))
		cntrfs_acl_translate(r->s, r->w->out, (size_t)n, 0);
	return cntrfs_reply_buf(r, r->w->out, (size_t)n);
}

int cntrfs_op_listxattr(struct req *r)
{
	const struct fuse_getxattr_in *in = (const void *)r->arg;
	uint32_t size = in->size;
	if (size > CNTRFS_XATTR_MAX)
		size = CNTRFS_XATTR_MAX;
	if (size > r->w->out_cap)
		return -ERANGE;
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	char path[48];
	proc_path(path, sizeof(path), fd);
	ssize_t n = 0;
	int ret = with_caller(r);
	if (ret == 0) {
		n = listxattr(path, size ? (char *)r->w->out : NULL, size);
		if (n < 0)
			ret = -errno;
	}
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	if (size == 0) {
		struct fuse_getxattr_out out = { .size = (uint32_t)n };
		return cntrfs_reply_buf(r, &out, sizeof(out));
	}
	return cntrfs_reply_buf(r, r->w->out, (size_t)n);
}

int cntrfs_op_removexattr(struct req *r)
{
	const char *name;
	uint32_t nlen;
	int ret = cntrfs_arg_string(r, 0, 0, &name, &nlen);
	if (ret < 0)
		return ret;
	if (nlen == 0 || nlen > XATTR_NAME_MAX)
		return nlen ? -ERANGE : -EINVAL;
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	char path[48];
	proc_path(path, sizeof(path), fd);
	if ((ret = with_caller(r)) == 0 && removexattr(path, name) < 0)
		ret = -errno;
	cntrfs_inode_put(r->s, ino);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

/* ---- open files ---- */

static uint32_t backing_open_flags(struct dvs_fuse_server *s, uint32_t flags)
{
	flags &= ~(uint32_t)(O_CREAT | O_EXCL | O_NOCTTY | O_NOFOLLOW);
	if (s->writeback) {
		/* the kernel reads pages for partial writes, and appends itself */
		if ((flags & O_ACCMODE) == O_WRONLY)
			flags = (flags & ~(uint32_t)O_ACCMODE) | O_RDWR;
		flags &= ~(uint32_t)O_APPEND;
	}
	return flags | O_CLOEXEC;
}

/* inode lock held */
static int backing_get(struct req *r, struct inode *ino, int fd)
{
	if (ino->backing_id > 0) {
		ino->backing_users++;
		return ino->backing_id;
	}
	struct dvs_fuse_backing_map map = { .fd = fd, .flags = 0, .padding = 0 };
	int token = cntrfs_priv_enter(); /* FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN */
	int id = ioctl(r->w->fd, FUSE_DEV_IOC_BACKING_OPEN, &map);
	int err = errno;
	cntrfs_priv_leave(token);
	if (id <= 0) {
		static _Atomic int logged;
		if (atomic_exchange(&logged, 1) == 0)
			cntrfs_log(r->s, "passthrough: FUSE_DEV_IOC_BACKING_OPEN failed (%s); "
					 "such files are served through the daemon",
				   strerror(id < 0 ? err : EINVAL));
		return id < 0 ? -err : -EINVAL;
	}
	ino->backing_id = id;
	ino->backing_users = 1;
	atomic_fetch_add(&r->s->backing_files, 1);
	return id;
}

/* inode lock held */
static void backing_put(struct dvs_fuse_server *s, struct worker *w, struct inode *ino)
{
	if (ino->backing_users == 0 || --ino->backing_users > 0)
		return;
	uint32_t id = (uint32_t)ino->backing_id;
	ino->backing_id = 0;
	if (w && w->fd >= 0) {
		int token = cntrfs_priv_enter();
		ioctl(w->fd, FUSE_DEV_IOC_BACKING_CLOSE, &id);
		cntrfs_priv_leave(token);
	}
	atomic_fetch_sub(&s->backing_files, 1);
}

/* Passthrough writes run with the credentials the backing file was registered with, so
 * the kernel would not clear suid/sgid for an unprivileged writer. Such opens (writable,
 * caller not root, file suid or sgid+group-exec) are served by the daemon instead, with
 * FOPEN_DIRECT_IO -- allowed next to passthrough opens of the same inode -- and the kernel
 * flags their writes FUSE_WRITE_KILL_SUIDGID. */
static int writer_must_kill_privs(struct req *r, int bfd, uint32_t flags)
{
	if ((flags & O_ACCMODE) == O_RDONLY || cntrfs_uid_to_backing(r->s, r->in->uid) == 0)
		return 0;
	struct stat st;
	if (fstat(bfd, &st) < 0)
		return 0;
	return (st.st_mode & S_ISUID) || (st.st_mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP);
}

/* Register an open backing descriptor as a FUSE file; fill out. */
static int finish_open(struct req *r, struct inode *ino, int bfd, uint32_t flags,
		       struct dvs_fuse_open_out *out)
{
	int through_daemon = r->s->passthrough && writer_must_kill_privs(r, bfd, flags);
	uint64_t fh;
	struct file *f = file_alloc(r->s, &fh);
	if (!f) {
		close(bfd);
		return -ENFILE;
	}
	f->fd = bfd;
	f->inode = ino;
	f->open_flags = flags;
	memset(out, 0, sizeof(*out));
	out->fh = fh;
	pthread_mutex_lock(&ino->lock);
	ino->nopen++;
	if (ino->xattr_fd < 0)
		ino->xattr_fd = bfd;
	if (r->s->passthrough && !through_daemon) {
		int id = backing_get(r, ino, bfd);
		if (id > 0) {
			f->passthrough = 1;
			out->open_flags |= FOPEN_PASSTHROUGH;
			out->backing_id = id;
			atomic_fetch_add(&r->s->passthrough_opens, 1);
		}
	}
	pthread_mutex_unlock(&ino->lock);
	if (through_daemon) {
		out->open_flags |= FOPEN_DIRECT_IO;
	} else if (!f->passthrough) {
		if (flags & O_DIRECT)
			out->open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
		else if (r->s->attr_sec || r->s->attr_nsec)
			out->open_flags |= FOPEN_KEEP_CACHE; /* AUTO_INVAL_DATA drops stale pages */
	}
	return 0;
}

static void release_file(struct dvs_fuse_server *s, struct worker *w, struct file *f)
{
	struct inode *ino = f->inode;
	if (ino) {
		pthread_mutex_lock(&ino->lock);
		if (ino->xattr_fd == f->fd && f->fd >= 0)
			ino->xattr_fd = -1;
		if (f->fd >= 0)
			close(f->fd);
		f->fd = -1;
		if (f->passthrough)
			backing_put(s, w, ino);
		if (ino->nopen > 0)
			ino->nopen--;
		if (ino->nopen == 0) {
			for (struct lock_owner *o = ino->owners, *next; o; o = next) {
				next = o->next;
				close(o->fd);
				free(o);
			}
			ino->owners = NULL;
			if (ino->fd >= 0 && ino->fd_users == 0 &&
			    __atomic_load_n(&ino->state, __ATOMIC_ACQUIRE) != SLOT_LIVE) {
				close(ino->fd);
				ino->fd = -1;
				atomic_fetch_sub(&s->n_path_fds, 1);
			}
		}
		pthread_mutex_unlock(&ino->lock);
	} else if (f->fd >= 0) {
		close(f->fd);
		f->fd = -1;
	}
	file_free(s, f);
}

int cntrfs_op_open(struct req *r)
{
	const struct fuse_open_in *in = (const void *)r->arg;
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	uint32_t type = atomic_load(&ino->type);
	if (type != S_IFREG) {
		cntrfs_inode_put(r->s, ino);
		return type == S_IFDIR ? -EISDIR : -EINVAL;
	}
	uint32_t flags = backing_open_flags(r->s, in->flags);
	char path[48];
	proc_path(path, sizeof(path), fd);
	int ret = with_caller(r);
	int bfd = -1;
	if (ret == 0) {
		bfd = open(path, (int)flags);
		if (bfd < 0 && errno == EACCES && r->s->writeback &&
		    (in->flags & O_ACCMODE) == O_WRONLY) {
			/* write-only permission: no read-modify-write pages for this file */
			flags = (flags & ~(uint32_t)O_ACCMODE) | O_WRONLY;
			bfd = open(path, (int)flags);
		}
		if (bfd < 0)
			ret = -errno;
	}
	if (ret == 0 && (in->open_flags & FUSE_OPEN_KILL_SUIDGID))
		kill_suidgid(fd, 1);
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	struct dvs_fuse_open_out out;
	if ((ret = finish_open(r, ino, bfd, flags, &out)) < 0)
		return ret;
	ret = cntrfs_reply_buf(r, &out, sizeof(out));
	if (r->reply_failed)
		release_file(r->s, r->w, cntrfs_file(r->s, out.fh));
	return ret;
}

static int create_common(struct req *r, int tmpfile)
{
	const struct fuse_create_in *in = (const void *)r->arg;
	const char *name = ".";
	int ret;
	if (!tmpfile && (ret = name_arg(r, sizeof(*in), 0, &name)) < 0)
		return ret;
	struct inode *dir;
	int pfd = node_fd(r, &dir);
	if (pfd < 0)
		return pfd;
	uint32_t flags = backing_open_flags(r->s, in->flags);
	if (tmpfile)
		flags |= O_TMPFILE;
	else
		flags |= O_CREAT | O_NOFOLLOW;
	cntrfs_set_umask(in->umask);
	int bfd = with_caller(r);
	if (bfd == 0)
		bfd = dvs_openat2(pfd, name, flags, in->mode & 07777,
				  RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
	if (bfd < 0) {
		cntrfs_inode_put(r->s, dir);
		return bfd;
	}
	struct {
		struct fuse_entry_out e;
		struct dvs_fuse_open_out o;
	} out;
	struct inode *ino;
	ret = cntrfs_record_fd(r, bfd, pfd, tmpfile ? NULL : name, &out.e, &ino);
	cntrfs_inode_put(r->s, dir);
	if (ret < 0) {
		close(bfd);
		return ret;
	}
	if ((ret = finish_open(r, ino, bfd, flags, &out.o)) < 0) {
		cntrfs_forget(r->s, out.e.nodeid, 1);
		return ret;
	}
	ret = cntrfs_reply_buf(r, &out, sizeof(out));
	if (r->reply_failed) {
		release_file(r->s, r->w, cntrfs_file(r->s, out.o.fh));
		cntrfs_forget(r->s, out.e.nodeid, 1);
	}
	return ret;
}

int cntrfs_op_create(struct req *r)
{
	return create_common(r, 0);
}

int cntrfs_op_tmpfile(struct req *r)
{
	return create_common(r, 1);
}

int cntrfs_op_read(struct req *r)
{
	const struct fuse_read_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || f->is_dir)
		return -EBADF;
	size_t size = in->size;
	if (size > r->w->out_cap)
		size = r->w->out_cap;
	/* a ring entry's payload buffer takes the data in place (READ brings no payload) */
	uint8_t *buf = r->ent && r->w->reply_direct ? r->w->reply_direct : r->w->out;
	ssize_t n = pread(f->fd, buf, size, (off_t)in->offset);
	if (n < 0)
		return -errno;
	atomic_fetch_add_explicit(&r->w->bytes_read, (uint64_t)n, memory_order_relaxed);
	return cntrfs_reply_buf(r, buf, (size_t)n);
}

int cntrfs_op_write(struct req *r)
{
	const struct fuse_write_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || f->is_dir)
		return -EBADF;
	if (r->arglen - sizeof(*in) < in->size)
		return -EINVAL;
	ssize_t n = pwrite(f->fd, in + 1, in->size, (off_t)in->offset);
	if (n < 0)
		return -errno;
	if (in->write_flags & FUSE_WRITE_KILL_SUIDGID)
		kill_suidgid(f->fd, 1);
	atomic_fetch_add_explicit(&r->w->bytes_written, (uint64_t)n, memory_order_relaxed);
	struct fuse_write_out out = { .size = (uint32_t)n, .padding = 0 };
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

int cntrfs_op_release(struct req *r)
{
	const struct fuse_release_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || f->is_dir)
		return -EBADF;
	if (in->release_flags & FUSE_RELEASE_FLOCK_UNLOCK)
		flock(f->fd, LOCK_UN);
	release_file(r->s, r->w, f);
	return cntrfs_reply_err(r, 0);
}

int cntrfs_op_flush(struct req *r)
{
	const struct fuse_flush_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f)
		return -EBADF;
	struct inode *ino = f->inode;
	if (ino) {
		/* close() by a lock owner drops all its POSIX locks on the file */
		pthread_mutex_lock(&ino->lock);
		for (struct lock_owner **link = &ino->owners; *link; link = &(*link)->next) {
			if ((*link)->owner == in->lock_owner) {
				struct lock_owner *o = *link;
				*link = o->next;
				close(o->fd);
				free(o);
				break;
			}
		}
		pthread_mutex_unlock(&ino->lock);
	}
	return cntrfs_reply_err(r, 0);
}

int cntrfs_op_fsync(struct req *r)
{
	const struct fuse_fsync_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f)
		return -EBADF;
	int ret = (in->fsync_flags & FUSE_FSYNC_FDATASYNC) ? fdatasync(f->fd) : fsync(f->fd);
	return ret < 0 ? -errno : cntrfs_reply_err(r, 0);
}

int cntrfs_op_fsyncdir(struct req *r)
{
	return cntrfs_op_fsync(r);
}

int cntrfs_op_fallocate(struct req *r)
{
	const struct fuse_fallocate_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || f->is_dir)
		return -EBADF;
	if (fallocate(f->fd, (int)in->mode, (off_t)in->offset, (off_t)in->length) < 0)
		return -errno;
	return cntrfs_reply_err(r, 0);
}

int cntrfs_op_lseek(struct req *r)
{
	const struct fuse_lseek_in *in = (const void *)r->arg;
	if (r->s->writeback) {
		/* dirty pages of the kernel's writeback cache are not in the backing file yet, so
		 * its holes are not the file's holes; ENOSYS makes the kernel answer itself
		 * (no holes before EOF, which lseek(2) allows) */
		static _Atomic int logged;
		if (atomic_exchange(&logged, 1) == 0)
			cntrfs_log(r->s, "SEEK_DATA/SEEK_HOLE answered by the kernel (no holes): the "
					 "writeback cache may hold data the backing file lacks");
		return -ENOSYS;
	}
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f)
		return -EBADF;
	off_t off = lseek(f->fd, (off_t)in->offset, (int)in->whence);
	if (off < 0)
		return -errno;
	struct fuse_lseek_out out = { .offset = (uint64_t)off };
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

static int do_copy_range(struct req *r, uint64_t *copied, uint64_t max)
{
	const struct fuse_copy_file_range_in *in = (const void *)r->arg;
	struct file *fi = cntrfs_file(r->s, in->fh_in), *fo = cntrfs_file(r->s, in->fh_out);
	if (!fi || !fo || fi->is_dir || fo->is_dir)
		return -EBADF;
	loff_t off_in = (loff_t)in->off_in, off_out = (loff_t)in->off_out;
	size_t len = in->len > max ? max : in->len;
	ssize_t n = copy_file_range(fi->fd, &off_in, fo->fd, &off_out, len, (unsigned)in->flags);
	if (n < 0)
		return -errno;
	*copied = (uint64_t)n;
	return 0;
}

int cntrfs_op_copy_file_range(struct req *r)
{
	uint64_t n;
	int ret = do_copy_range(r, &n, UINT32_MAX & ~4095u);
	if (ret < 0)
		return ret;
	struct fuse_write_out out = { .size = (uint32_t)n, .padding = 0 };
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

int cntrfs_op_copy_file_range_64(struct req *r)
{
	uint64_t n;
	int ret = do_copy_range(r, &n, (uint64_t)SSIZE_MAX);
	if (ret < 0)
		return ret;
	struct dvs_fuse_copy_file_range_out out = { .bytes_copied = n };
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

int cntrfs_op_syncfs(struct req *r)
{
	int fd = open(r->s->source, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int ret = syncfs(fd) < 0 ? -errno : 0;
	close(fd);
	return ret < 0 ? ret : cntrfs_reply_err(r, 0);
}

/* ---- directories ---- */

int cntrfs_op_opendir(struct req *r)
{
	struct inode *ino;
	int fd = node_fd(r, &ino);
	if (fd < 0)
		return fd;
	int ret = with_caller(r);
	int dfd = -1;
	if (ret == 0) {
		/* not openat(fd, "."): that needs search permission on the directory itself,
		 * where opening it for reading natively needs read permission only */
		char path[48];
		proc_path(path, sizeof(path), fd);
		dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd < 0)
			ret = -errno;
	}
	cntrfs_inode_put(r->s, ino);
	if (ret < 0)
		return ret;
	uint64_t fh;
	struct file *f = file_alloc(r->s, &fh);
	if (!f) {
		close(dfd);
		return -ENFILE;
	}
	f->fd = dfd;
	f->inode = ino;
	f->is_dir = 1;
	struct dvs_fuse_open_out out;
	memset(&out, 0, sizeof(out));
	out.fh = fh;
	/* the kernel may keep the listing across opens: with AUTO_INVAL_DATA it compares the
	 * directory's mtime before reusing it, so a change on the backing store is seen */
	if (r->s->entry_sec || r->s->entry_nsec)
		out.open_flags = FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE;
	ret = cntrfs_reply_buf(r, &out, sizeof(out));
	if (r->reply_failed) {
		close(dfd);
		f->fd = -1;
		file_free(r->s, f);
	}
	return ret;
}

int cntrfs_op_releasedir(struct req *r)
{
	const struct fuse_release_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || !f->is_dir)
		return -EBADF;
	pthread_mutex_lock(&f->dir_lock);
	close(f->fd);
	f->fd = -1;
	free(f->dirbuf);
	f->dirbuf = NULL;
	pthread_mutex_unlock(&f->dir_lock);
	file_free(r->s, f);
	return cntrfs_reply_err(r, 0);
}

struct linux_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	uint16_t d_reclen;
	uint8_t d_type;
	char d_name[];
};

static int do_readdir(struct req *r, int plus)
{
	const struct fuse_read_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || !f->is_dir)
		return -EBADF;
	size_t size = in->size < r->w->out_cap ? in->size : r->w->out_cap;
	uint64_t *added = NULL;
	size_t n_added = 0, cap_added = 0;
	int ret = 0;
	if (plus && (ret = with_caller(r)) < 0)
		return ret;
	pthread_mutex_lock(&f->dir_lock);
	if (!f->dirbuf && !(f->dirbuf = malloc(CNTRFS_DIRBUF))) {
		pthread_mutex_unlock(&f->dir_lock);
		return -ENOMEM;
	}
	if (!f->dir_valid || in->offset != f->dir_off) {
		if (lseek(f->fd, (off_t)in->offset, SEEK_SET) < 0) {
			ret = -errno;
			pthread_mutex_unlock(&f->dir_lock);
			return ret;
		}
		f->dir_len = f->dir_pos = 0;
		f->dir_off = in->offset;
		f->dir_valid = 1;
	}
	uint8_t *out = r->w->out;
	size_t used = 0;
	for (;;) {
		if (f->dir_pos >= f->dir_len) {
			ssize_t n = getdents64(f->fd, f->dirbuf, CNTRFS_DIRBUF);
			if (n < 0) {
				ret = -errno;
				f->dir_valid = 0;
				break;
			}
			if (n == 0)
				break;
			f->dir_len = (uint32_t)n;
			f->dir_pos = 0;
		}
		struct linux_dirent64 *d = (void *)(f->dirbuf + f->dir_pos);
		size_t namelen = strnlen(d->d_name, d->d_reclen);
		size_t base = plus ? offsetof(struct fuse_direntplus, dirent.name)
				   : offsetof(struct fuse_dirent, name);
		size_t entsize = (base + namelen + 7) & ~(size_t)7;
		if (used + entsize > size)
			break;
		struct fuse_dirent *de;
		if (plus) {
			struct fuse_direntplus *dp = (void *)(out + used);
			memset(dp, 0, entsize);
			int dot = d->d_name[0] == '.' &&
				  (namelen == 1 || (namelen == 2 && d->d_name[1] == '.'));
			if (!dot) {
				int lr = cntrfs_lookup(r, f->inode, f->fd, d->d_name, &dp->entry_out);
				if (lr < 0) {
					/* no attributes (not searchable, vanished, ...): the name is
					 * still listed, as getdents() lists it natively; nodeid 0
					 * tells the kernel to skip the attributes */
					memset(&dp->entry_out, 0, sizeof(dp->entry_out));
				} else {
					if (n_added == cap_added) {
						size_t nc = cap_added ? cap_added * 2 : 64;
						uint64_t *na = realloc(added, nc * sizeof(*na));
						if (!na) {
							cntrfs_forget(r->s, dp->entry_out.nodeid, 1);
							ret = -ENOMEM;
							break;
						}
						added = na;
						cap_added = nc;
					}
					added[n_added++] = dp->entry_out.nodeid;
				}
			}
			de = &dp->dirent;
		} else {
			de = (void *)(out + used);
			memset(de, 0, entsize);
		}
		de->ino = d->d_ino;
		de->off = (uint64_t)d->d_off;
		de->namelen = (uint32_t)namelen;
		de->type = d->d_type;
		memcpy(de->name, d->d_name, namelen);
		used += entsize;
		f->dir_pos += d->d_reclen;
		f->dir_off = (uint64_t)d->d_off;
	}
	pthread_mutex_unlock(&f->dir_lock);
	if (ret < 0 && used == 0) {
		free(added);
		return ret;
	}
	/* entries already produced are delivered; an error shows on the next call */
	ret = cntrfs_reply_buf(r, out, used);
	if (r->reply_failed) {
		for (size_t i = 0; i < n_added; i++)
			cntrfs_forget(r->s, added[i], 1);
		f->dir_valid = 0;
	}
	free(added);
	return ret;
}

int cntrfs_op_readdir(struct req *r)
{
	return do_readdir(r, 0);
}

int cntrfs_op_readdirplus(struct req *r)
{
	return do_readdir(r, 1);
}

/* ---- locks ---- */

struct blocking_op {
	struct dvs_fuse_server *s;
	struct reply_target reply; /* reply.unique: the request being answered */
	int fd; /* a dup: same open file description as the lock owner's */
	int is_flock;
	int flock_op;
	struct flock fl;
	pthread_t thread;
	_Atomic int interrupted;
	struct blocking_op *next;
};

/* inode lock held: the owner's private open file description, created on demand */
static struct lock_owner *owner_get(struct dvs_fuse_server *s, struct inode *ino, struct file *f,
				    uint64_t owner, uint32_t pid, int create)
{
	for (struct lock_owner *o = ino->owners; o; o = o->next)
		if (o->owner == owner) {
			if (pid)
				o->pid = pid;
			return o;
		}
	if (!create)
		return NULL;
	char path[48];
	proc_path(path, sizeof(path), f->fd);
	int token = cntrfs_priv_enter();
	int fd = open(path, (int)((f->open_flags & O_ACCMODE) | O_CLOEXEC | O_NOCTTY));
	cntrfs_priv_leave(token);
	if (fd < 0)
		return NULL;
	struct lock_owner *o = calloc(1, sizeof(*o));
	if (!o) {
		close(fd);
		return NULL;
	}
	o->owner = owner;
	o->fd = fd;
	o->pid = pid;
	o->next = ino->owners;
	ino->owners = o;
	(void)s;
	return o;
}

static void to_flock(const struct fuse_file_lock *lk, struct flock *fl)
{
	memset(fl, 0, sizeof(*fl));
	fl->l_type = (short)lk->type;
	fl->l_whence = SEEK_SET;
	fl->l_start = (off_t)lk->start;
	fl->l_len = lk->end >= OFFSET_MAX ? 0 : (off_t)(lk->end - lk->start + 1);
}

static int valid_lock(const struct fuse_file_lock *lk)
{
	if (lk->type != F_RDLCK && lk->type != F_WRLCK && lk->type != F_UNLCK)
		return -EINVAL;
	if (lk->start > OFFSET_MAX || lk->end > OFFSET_MAX || lk->end < lk->start)
		return -EINVAL;
	return 0;
}

int cntrfs_op_getlk(struct req *r)
{
	const struct fuse_lk_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || !f->inode)
		return -EBADF;
	int ret = valid_lock(&in->lk);
	if (ret < 0)
		return ret;
	struct inode *ino = f->inode;
	struct flock fl;
	to_flock(&in->lk, &fl);
	pthread_mutex_lock(&ino->lock);
	struct lock_owner *me = owner_get(r->s, ino, f, in->owner, 0, 1);
	if (!me) {
		pthread_mutex_unlock(&ino->lock);
		return -ENOLCK;
	}
	ret = fcntl(me->fd, F_OFD_GETLK, &fl) < 0 ? -errno : 0;
	uint32_t pid = 0;
	if (ret == 0 && fl.l_type != F_UNLCK) {
		if (fl.l_pid > 0) {
			pid = (uint32_t)fl.l_pid; /* a POSIX lock taken on the backing file */
		} else {
			/* an OFD lock: one of our owners, or someone else's OFD lock (pid 0).
			 * The holder is an owner who sees no conflict for that range itself. */
			for (struct lock_owner *o = ino->owners; o; o = o->next) {
				if (o == me)
					continue;
				struct flock probe = fl;
				probe.l_type = (short)in->lk.type;
				probe.l_pid = 0;
				if (fcntl(o->fd, F_OFD_GETLK, &probe) == 0 && probe.l_type == F_UNLCK) {
					pid = o->pid;
					break;
				}
			}
		}
	}
	pthread_mutex_unlock(&ino->lock);
	if (ret < 0)
		return ret;
	struct fuse_lk_out out;
	memset(&out, 0, sizeof(out));
	out.lk.type = (uint32_t)fl.l_type;
	if (fl.l_type != F_UNLCK) {
		out.lk.start = (uint64_t)fl.l_start;
		out.lk.end = fl.l_len == 0 ? OFFSET_MAX : (uint64_t)(fl.l_start + fl.l_len - 1);
		out.lk.pid = pid;
	}
	return cntrfs_reply_buf(r, &out, sizeof(out));
}

static void *blocking_main(void *arg)
{
	struct blocking_op *op = arg;
	struct dvs_fuse_server *s = op->s;
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, cntrfs_wake_signal());
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	/* a timer re-sends the wake signal, closing the window in which an INTERRUPT lands
	 * between our check and the blocking call */
	timer_t timer;
	struct sigevent sev;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = cntrfs_wake_signal();
	sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
	int have_timer = timer_create(CLOCK_MONOTONIC, &sev, &timer) == 0;
	if (have_timer) {
		struct itimerspec its = { { 0, 200000000 }, { 0, 200000000 } };
		timer_settime(timer, 0, &its, NULL);
	}
	int ret = 0;
	for (;;) {
		if (atomic_load(&op->interrupted) || atomic_load(&s->stopping)) {
			ret = -EINTR;
			break;
		}
		int rc = op->is_flock ? flock(op->fd, op->flock_op) : fcntl(op->fd, F_OFD_SETLKW, &op->fl);
		if (rc == 0) {
			ret = 0;
			break;
		}
		if (errno != EINTR) {
			ret = -errno;
			break;
		}
	}
	if (have_timer)
		timer_delete(timer);
	cntrfs_late_reply(s, &op->reply, ret);
	pthread_mutex_lock(&s->block_lock);
	for (struct blocking_op **link = &s->blocking; *link; link = &(*link)->next)
		if (*link == op) {
			*link = op->next;
			break;
		}
	atomic_fetch_sub(&s->n_blocking, 1);
	pthread_mutex_unlock(&s->block_lock);
	close(op->fd);
	free(op);
	return NULL;
}

/* Wait for a lock on a thread of its own; the reply is sent from there. */
static int start_blocking(struct req *r, int fd, int is_flock, int flock_op, const struct flock *fl)
{
	struct dvs_fuse_server *s = r->s;
	if (s->cfg.flags & DVS_FUSE_NO_DEVICE) { /* fuzzing: never block */
		int rc = is_flock ? flock(fd, flock_op | LOCK_NB) : fcntl(fd, F_OFD_SETLK, fl);
		return rc < 0 ? -errno : cntrfs_reply_err(r, 0);
	}
	struct blocking_op *op = calloc(1, sizeof(*op));
	if (!op)
		return -ENOMEM;
	op->s = s;
	op->reply.fd = r->w->fd;
	op->reply.ent = r->ent;
	op->reply.unique = r->in->unique;
	op->is_flock = is_flock;
	op->flock_op = flock_op;
	if (fl)
		op->fl = *fl;
	op->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (op->fd < 0) {
		free(op);
		return -errno;
	}
	pthread_mutex_lock(&s->block_lock);
	for (unsigned i = 0; i < 16; i++)
		if (s->recent_interrupts[i] == op->reply.unique)
			op->interrupted = 1; /* the INTERRUPT overtook its request */
	op->next = s->blocking;
	s->blocking = op;
	atomic_fetch_add(&s->n_blocking, 1);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	int err = pthread_create(&op->thread, &attr, blocking_main, op);
	pthread_attr_destroy(&attr);
	if (err) {
		s->blocking = op->next;
		atomic_fetch_sub(&s->n_blocking, 1);
		pthread_mutex_unlock(&s->block_lock);
		close(op->fd);
		free(op);
		return -err;
	}
	pthread_mutex_unlock(&s->block_lock);
	r->replied = 1; /* the thread answers */
	if (r->ent)
		cntrfs_ring_park(r->ent); /* the entry waits for that answer */
	return 0;
}

void cntrfs_blocking_stop_all(struct dvs_fuse_server *s)
{
	pthread_mutex_lock(&s->block_lock);
	for (struct blocking_op *op = s->blocking; op; op = op->next) {
		atomic_store(&op->interrupted, 1);
		pthread_kill(op->thread, cntrfs_wake_signal());
	}
	pthread_mutex_unlock(&s->block_lock);
	for (int i = 0; i < 500 && atomic_load(&s->n_blocking) > 0; i++)
		usleep(10000);
}

static int do_setlk(struct req *r, int wait)
{
	const struct fuse_lk_in *in = (const void *)r->arg;
	struct file *f = cntrfs_file(r->s, in->fh);
	if (!f || !f->inode)
		return -EBADF;
	int ret = valid_lock(&in->lk);
	if (ret < 0)
		return ret;
	if (in->lk_flags & FUSE_LK_FLOCK) {
		int op = in->lk.type == F_RDLCK ? LOCK_SH : in->lk.type == F_WRLCK ? LOCK_EX : LOCK_UN;
		if (wait && op != LOCK_UN) {
			if (flock(f->fd, op | LOCK_NB) == 0)
				return cntrfs_reply_err(r, 0);
			if (errno != EWOULDBLOCK)
				return -errno;
			return start_blocking(r, f->fd, 1, op, NULL);
		}
		if (flock(f->fd, op | (op == LOCK_UN ? 0 : LOCK_NB)) < 0)
			return -errno;
		return cntrfs_reply_err(r, 0);
	}
	struct inode *ino = f->inode;
	struct flock fl;
	to_flock(&in->lk, &fl);
	pthread_mutex_lock(&ino->lock);
	struct lock_owner *o = owner_get(r->s, ino, f, in->owner, in->lk.pid,
					 in->lk.type != F_UNLCK);
	if (!o) {
		pthread_mutex_unlock(&ino->lock);
		return in->lk.type == F_UNLCK ? cntrfs_reply_err(r, 0) : -ENOLCK;
	}
	int ofd = o->fd;
	if (fcntl(ofd, F_OFD_SETLK, &fl) == 0) {
		pthread_mutex_unlock(&ino->lock);
		return cntrfs_reply_err(r, 0);
	}
	ret = -errno;
	if (wait && (ret == -EAGAIN || ret == -EACCES))
		ret = start_blocking(r, ofd, 0, 0, &fl);
	pthread_mutex_unlock(&ino->lock);
	return ret;
}

int cntrfs_op_setlk(struct req *r)
{
	return do_setlk(r, 0);
}

int cntrfs_op_setlkw(struct req *r)
{
	return do_setlk(r, 1);
}

int cntrfs_op_interrupt(struct req *r)
{
	const struct fuse_interrupt_in *in = (const void *)r->arg;
	struct dvs_fuse_server *s = r->s;
	atomic_fetch_add(&s->interrupts, 1);
	int found = 0;
	pthread_mutex_lock(&s->block_lock);
	for (struct blocking_op *op = s->blocking; op; op = op->next) {
		if (op->reply.unique == in->unique) {
			atomic_store(&op->interrupted, 1);
			pthread_kill(op->thread, cntrfs_wake_signal());
			found = 1;
		}
	}
	if (!found) {
		s->recent_interrupts[s->recent_pos++ % 16] = in->unique;
	}
	pthread_mutex_unlock(&s->block_lock);
	/* other requests finish quickly on their own; INTERRUPT itself has no reply */
	return 0;
}

int cntrfs_op_destroy(struct req *r)
{
	return cntrfs_reply_err(r, 0);
}

int cntrfs_op_unsupported(struct req *r)
{
	(void)r;
	return -ENOSYS;
}
