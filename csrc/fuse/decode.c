/*
 * decode.c -- validation of raw FUSE requests before any handler sees them.
 *
 * A request is fuse_in_header (40 bytes: len, opcode, unique, nodeid, uid, gid, pid,
 * total_extlen) followed by an opcode-specific fixed argument, then for some opcodes
 * NUL-terminated names and data, then total_extlen * 8 bytes of extensions (security
 * context, supplementary groups; only sent when negotiated). The kernel is trusted to send
 * well-formed requests, but the decoder does not rely on it: the fuzz entry point feeds it
 * arbitrary bytes. Rules, each checked here or in cntrfs_arg_string:
 *   - fewer bytes than a header: nothing can be replied (-EIO to the caller);
 *   - header len must equal the bytes read, extensions must fit: EINVAL;
 *   - opcodes the protocol defines but we do not implement: ENOSYS (the kernel then stops
 *     sending them, as the protocol requires); numbers outside the protocol: EINVAL;
 *   - the fixed argument must be complete: EINVAL;
 *   - names must be NUL-terminated inside the argument, 1..255 bytes, without '/': EINVAL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>

#include "fuse/internal.h"

#define OP(code, nm, size, fl) [code] = { .name = #nm, .min_arg = (size), .handler = cntrfs_op_##nm, .flags = (fl) }

static const struct opdesc ops[DVS_FUSE_MAX_OPCODE] = {
	OP(FUSE_LOOKUP, lookup, 0, OP_NAMES),
	OP(FUSE_FORGET, forget, sizeof(struct fuse_forget_in), OP_NO_REPLY),
	OP(FUSE_GETATTR, getattr, sizeof(struct fuse_getattr_in), 0),
	OP(FUSE_SETATTR, setattr, sizeof(struct fuse_setattr_in), 0),
	OP(FUSE_READLINK, readlink, 0, 0),
	OP(FUSE_SYMLINK, symlink, 0, OP_NAMES),
	OP(FUSE_MKNOD, mknod, sizeof(struct fuse_mknod_in), OP_NAMES),
	OP(FUSE_MKDIR, mkdir, sizeof(struct fuse_mkdir_in), OP_NAMES),
	OP(FUSE_UNLINK, unlink, 0, OP_NAMES),
	OP(FUSE_RMDIR, rmdir, 0, OP_NAMES),
	OP(FUSE_RENAME, rename, sizeof(struct fuse_rename_in), OP_NAMES),
	OP(FUSE_LINK, link, sizeof(struct fuse_link_in), OP_NAMES),
	OP(FUSE_OPEN, open, sizeof(struct fuse_open_in), 0),
	OP(FUSE_READ, read, sizeof(struct fuse_read_in), 0),
	OP(FUSE_WRITE, write, sizeof(struct fuse_write_in), 0),
	OP(FUSE_STATFS, statfs, 0, 0),
	OP(FUSE_RELEASE, release, sizeof(struct fuse_release_in), 0),
	OP(FUSE_FSYNC, fsync, sizeof(struct fuse_fsync_in), 0),
	OP(FUSE_SETXATTR, setxattr, FUSE_COMPAT_SETXATTR_IN_SIZE, OP_NAMES),
	OP(FUSE_GETXATTR, getxattr, sizeof(struct fuse_getxattr_in), OP_NAMES),
	OP(FUSE_LISTXATTR, listxattr, sizeof(struct fuse_getxattr_in), 0),
	OP(FUSE_REMOVEXATTR, removexattr, 0, OP_NAMES),
	OP(FUSE_FLUSH, flush, sizeof(struct fuse_flush_in), 0),
	OP(FUSE_INIT, init, 16, 0),
	OP(FUSE_OPENDIR, opendir, sizeof(struct fuse_open_in), 0),
	OP(FUSE_READDIR, readdir, sizeof(struct fuse_read_in), 0),
	OP(FUSE_RELEASEDIR, releasedir, sizeof(struct fuse_release_in), 0),
	OP(FUSE_FSYNCDIR, fsyncdir, sizeof(struct fuse_fsync_in), 0),
	OP(FUSE_GETLK, getlk, sizeof(struct fuse_lk_in), 0),
	OP(FUSE_SETLK, setlk, sizeof(struct fuse_lk_in), 0),
	OP(FUSE_SETLKW, setlkw, sizeof(struct fuse_lk_in), 0),
	OP(FUSE_ACCESS, access, sizeof(struct fuse_access_in), 0),
	OP(FUSE_CREATE, create, sizeof(struct fuse_create_in), OP_NAMES),
	OP(FUSE_INTERRUPT, interrupt, sizeof(struct fuse_interrupt_in), OP_NO_REPLY),
	OP(FUSE_BMAP, unsupported, 0, 0),
	OP(FUSE_DESTROY, destroy, 0, 0),
	OP(FUSE_IOCTL, unsupported, 0, 0),
	OP(FUSE_POLL, unsupported, 0, 0),
	OP(FUSE_NOTIFY_REPLY, unsupported, 0, OP_NO_REPLY),
	OP(FUSE_BATCH_FORGET, batch_forget, sizeof(struct fuse_batch_forget_in), OP_NO_REPLY),
	OP(FUSE_FALLOCATE, fallocate, sizeof(struct fuse_fallocate_in), 0),
	OP(FUSE_READDIRPLUS, readdirplus, sizeof(struct fuse_read_in), 0),
	OP(FUSE_RENAME2, rename2, sizeof(struct fuse_rename2_in), OP_NAMES),
	OP(FUSE_LSEEK, lseek, sizeof(struct fuse_lseek_in), 0),
	OP(FUSE_COPY_FILE_RANGE, copy_file_range, sizeof(struct fuse_copy_file_range_in), 0),
	OP(FUSE_SETUPMAPPING, unsupported, 0, 0),
	OP(FUSE_REMOVEMAPPING, unsupported, 0, 0),
	OP(FUSE_SYNCFS, syncfs, sizeof(struct fuse_syncfs_in), 0),
	OP(FUSE_TMPFILE, tmpfile, sizeof(struct fuse_create_in), 0),
	OP(DVS_FUSE_STATX, statx, sizeof(struct dvs_fuse_statx_in), 0),
	OP(DVS_FUSE_COPY_FILE_RANGE_64, copy_file_range_64, sizeof(struct fuse_copy_file_range_in), 0),
};

const struct opdesc *cntrfs_opdesc(uint32_t opcode)
{
	if (opcode >= DVS_FUSE_MAX_OPCODE || !ops[opcode].handler)
		return NULL;
	return &ops[opcode];
}

int cntrfs_decode(const uint8_t *buf, size_t len, struct req *r)
{
	if (len < sizeof(struct fuse_in_header))
		return -EIO;
	const struct fuse_in_header *in = (const struct fuse_in_header *)buf;
	r->in = in;
	r->arg = buf + sizeof(*in);
	r->arglen = 0;
	if (in->len != len)
		return -EINVAL;
	size_t body = len - sizeof(*in);
	size_t ext = (size_t)in->total_extlen * 8;
	if (ext > body)
		return -EINVAL;
	r->arglen = (uint32_t)(body - ext);
	const struct opdesc *op = cntrfs_opdesc(in->opcode);
	if (!op) {
		/* numbers the protocol defines (< 64) but we do not serve: ENOSYS, as required */
		return in->opcode > 0 && in->opcode < DVS_FUSE_MAX_OPCODE ? -ENOSYS : -EINVAL;
	}
	if (r->arglen < op->min_arg)
		return -EINVAL;
	return 0;
}

int cntrfs_arg_string(const struct req *r, uint32_t skip, int index, const char **out,
		      uint32_t *len)
{
	if (skip > r->arglen)
		return -EINVAL;
	const char *p = (const char *)r->arg + skip;
	size_t left = r->arglen - skip;
	for (int i = 0;; i++) {
		const char *nul = memchr(p, '\0', left);
		if (!nul)
			return -EINVAL;
		size_t n = (size_t)(nul - p);
		if (i == index) {
			*out = p;
			if (len)
				*len = (uint32_t)n;
			return 0;
		}
		left -= n + 1;
		p = nul + 1;
	}
}

int cntrfs_valid_name(const char *name, uint32_t len)
{
	if (len == 0 || len > CNTRFS_NAME_MAX)
		return len == 0 ? -EINVAL : -ENAMETOOLONG;
	if (memchr(name, '/', len))
		return -EINVAL;
	return 0;
}
