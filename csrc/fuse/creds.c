/*
 * creds.c -- acting with the caller's credentials, per worker thread.
 *
 * Kernel semantics relied on:
 * - fsuid/fsgid, supplementary groups and capability sets belong to a task (thread), so each
 *   worker switches its own credentials with raw syscalls (glibc's setgroups would change
 *   every thread). Switching costs nothing when consecutive requests come from one caller:
 *   the current state is cached per thread.
 * - setfsuid() from 0 to non-0 drops the filesystem capabilities (CAP_CHOWN, DAC_OVERRIDE,
 *   DAC_READ_SEARCH, FOWNER, FSETID, ...) from the effective set; the other capabilities
 *   stay. A non-root caller must not get CAP_SYS_ADMIN (trusted.* xattrs) or CAP_SETFCAP
 *   (security.capability) through us, so for non-root callers the whole effective set is
 *   emptied; the permitted set stays, and privileged internals (open_by_handle_at, backing
 *   file registration, the kernel-requested suid/sgid clearing) raise it briefly.
 * - The FUSE request header carries the caller's fsuid/fsgid in the connection's user
 *   namespace (the host's: the server mounts from the init namespace) but not its groups:
 *   those are read from /proc/<pid>/status and cached per thread for a second.
 * - umask lives in fs_struct, shared by threads until unshare(CLONE_FS); each worker
 *   unshares so it can apply the umask each create request carries (FUSE_DONT_MASK).
 * - Ids: the target container's uid_map/gid_map lines (inside outside count) translate
 *   between backing ids (the tools side, read as "inside" ids, as CNTR does) and kernel ids
 *   (host kuids). Unmapped ids become the overflow id.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuse/internal.h"
#include "sys/sys.h"

#define MAX_GROUPS 64
#define GROUP_CACHE 8
#define GROUP_CACHE_NS 1000000000ull

struct group_entry {
	uint32_t pid, kuid, kgid, n;
	uint64_t when;
	uint32_t g[MAX_GROUPS];
};

static __thread struct {
	int ready;
	int can_switch;
	uint32_t fsuid, fsgid;
	uint32_t ngroups;
	uint32_t groups[MAX_GROUPS];
	int caps_full;
	uint32_t umask;
	struct group_entry cache[GROUP_CACHE];
	uint32_t cache_next;
} T;

static uint32_t map_down(const struct idmap *m, uint32_t kid, uint32_t overflow)
{
	if (m->n == 0)
		return kid;
	for (uint32_t i = 0; i < m->n; i++) {
		const struct dvs_fuse_id_range *r = &m->r[i];
		if (kid >= r->outside && kid - r->outside < r->count)
			return r->inside + (kid - r->outside);
	}
	return overflow;
}

static uint32_t map_up(const struct idmap *m, uint32_t bid, uint32_t overflow)
{
	if (m->n == 0)
		return bid;
	for (uint32_t i = 0; i < m->n; i++) {
		const struct dvs_fuse_id_range *r = &m->r[i];
		if (bid >= r->inside && bid - r->inside < r->count)
			return r->outside + (bid - r->inside);
	}
	return overflow;
}

int cntrfs_map_is_identity(const struct idmap *m)
{
	return m->n == 0;
}

uint32_t cntrfs_uid_to_backing(const struct dvs_fuse_server *s, uint32_t kid)
{
	return map_down(&s->uid_map, kid, s->overflow_uid);
}

uint32_t cntrfs_gid_to_backing(const struct dvs_fuse_server *s, uint32_t kid)
{
	return map_down(&s->gid_map, kid, s->overflow_gid);
}

uint32_t cntrfs_uid_to_kernel(const struct dvs_fuse_server *s, uint32_t bid)
{
	return map_up(&s->uid_map, bid, s->overflow_uid);
}

uint32_t cntrfs_gid_to_kernel(const struct dvs_fuse_server *s, uint32_t bid)
{
	return map_up(&s->gid_map, bid, s->overflow_gid);
}

int cntrfs_creds_init_thread(void)
{
	memset(&T, 0, sizeof(T));
	T.ready = 1;
	/* a private fs_struct: per-thread umask */
	if (unshare(CLONE_FS) < 0)
		return -errno;
	T.umask = (uint32_t)umask(022);
	umask((mode_t)T.umask);
	T.can_switch = geteuid() == 0;
	if (!T.can_switch)
		return 0;
	dvs_sys_cap_set_effective(~0ull);
	T.caps_full = 1;
	dvs_sys_setfsuid(0);
	dvs_sys_setfsgid(0);
	dvs_sys_setgroups_thread(0, NULL);
	T.fsuid = 0;
	T.fsgid = 0;
	T.ngroups = 0;
	return 0;
}

static int apply(uint32_t uid, uint32_t gid, uint32_t ngroups, const uint32_t *groups, int full)
{
	if (!T.can_switch)
		return 0;
	int same_groups = ngroups == T.ngroups &&
			  (ngroups == 0 || memcmp(groups, T.groups, ngroups * sizeof(*groups)) == 0);
	if (uid == T.fsuid && gid == T.fsgid && same_groups && full == T.caps_full)
		return 0;
	int ret;
	if (!T.caps_full) { /* regain CAP_SETUID/CAP_SETGID first */
		if ((ret = dvs_sys_cap_set_effective(~0ull)) < 0)
			return ret;
		T.caps_full = 1;
	}
	if (gid != T.fsgid) {
		dvs_sys_setfsgid(gid);
		if ((uint32_t)dvs_sys_setfsgid((uint32_t)-1) != gid)
			return -EPERM;
		T.fsgid = gid;
	}
	if (!same_groups) {
		if ((ret = dvs_sys_setgroups_thread(ngroups, groups)) < 0)
			return ret;
		memcpy(T.groups, groups, ngroups * sizeof(*groups));
		T.ngroups = ngroups;
	}
	if (uid != T.fsuid) {
		dvs_sys_setfsuid(uid);
		if ((uint32_t)dvs_sys_setfsuid((uint32_t)-1) != uid)
			return -EPERM;
		T.fsuid = uid;
	}
	if (!full) {
		if ((ret = dvs_sys_cap_set_effective(0)) < 0)
			return ret;
		T.caps_full = 0;
	} else if (uid != 0) {
		/* setfsuid to non-0 dropped the fs capabilities; full means all of them */
		if ((ret = dvs_sys_cap_set_effective(~0ull)) < 0)
			return ret;
	}
	return 0;
}

/* Supplementary groups of the calling thread `pid`, as kernel (host) gids. */
static int read_groups(uint32_t pid, uint32_t *out, uint32_t cap)
{
	char path[48], buf[4096];
	snprintf(path, sizeof(path), "/proc/%u/status", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return n < 0 ? -errno : -EIO;
	buf[n] = '\0';
	char *line = strstr(buf, "\nGroups:");
	if (!line)
		return 0;
	char *p = line + 8;
	uint32_t count = 0;
	while (*p && *p != '\n' && count < cap) {
		while (*p == ' ' || *p == '\t')
			p++;
		if (*p < '0' || *p > '9')
			break;
		out[count++] = (uint32_t)strtoul(p, &p, 10);
	}
	return (int)count;
}

int cntrfs_creds_for(struct req *r)
{
	const struct dvs_fuse_server *s = r->s;
	uint32_t kuid = r->in->uid, kgid = r->in->gid, pid = r->in->pid;
	uint32_t uid = cntrfs_uid_to_backing(s, kuid);
	uint32_t gid = cntrfs_gid_to_backing(s, kgid);
	if (!T.ready)
		cntrfs_creds_init_thread();
	if (uid == 0 || pid == 0)
		return apply(uid, gid, 0, NULL, uid == 0);

	uint64_t now = cntrfs_now_ns();
	struct group_entry *hit = NULL;
	for (uint32_t i = 0; i < GROUP_CACHE; i++) {
		struct group_entry *e = &T.cache[i];
		if (e->when && e->pid == pid && e->kuid == kuid && e->kgid == kgid &&
		    now - e->when < GROUP_CACHE_NS) {
			hit = e;
			break;
		}
	}
	if (!hit) {
		uint32_t kgroups[MAX_GROUPS];
		int n = read_groups(pid, kgroups, MAX_GROUPS);
		hit = &T.cache[T.cache_next++ % GROUP_CACHE];
		hit->pid = pid;
		hit->kuid = kuid;
		hit->kgid = kgid;
		hit->when = now;
		hit->n = 0;
		for (int i = 0; i < n; i++) {
			/* unmapped groups are dropped, never widened to the overflow group */
			uint32_t b = cntrfs_gid_to_backing(s, kgroups[i]);
			if (b != s->overflow_gid || kgroups[i] == s->overflow_gid)
				hit->g[hit->n++] = b;
		}
	}
	return apply(uid, gid, hit->n, hit->g, 0);
}

int cntrfs_creds_root(void)
{
	if (!T.ready)
		cntrfs_creds_init_thread();
	return apply(0, 0, 0, NULL, 1);
}

int cntrfs_priv_enter(void)
{
	if (!T.can_switch || T.caps_full)
		return 0;
	if (dvs_sys_cap_set_effective(~0ull) < 0)
		return 0;
	T.caps_full = 1;
	return 1;
}

int cntrfs_priv_only(int cap)
{
	if (!T.can_switch || T.caps_full)
		return 0;
	if (dvs_sys_cap_set_effective(1ull << cap) < 0)
		return 0;
	return 1;
}

void cntrfs_priv_leave(int token)
{
	if (!token)
		return;
	if (dvs_sys_cap_set_effective(0) == 0)
		T.caps_full = 0;
}

int cntrfs_set_umask(uint32_t mask)
{
	mask &= 0777;
	if (!T.ready)
		cntrfs_creds_init_thread();
	if (T.umask != mask) {
		umask((mode_t)mask);
		T.umask = mask;
	}
	return 0;
}

/* system.posix_acl_* values: a 4-byte version (2), then 8-byte entries {tag, perm, id},
 * little-endian; ACL_USER (2) and ACL_GROUP (8) entries carry ids. */
void cntrfs_acl_translate(const struct dvs_fuse_server *s, uint8_t *value, size_t len,
			  int to_backing)
{
	if (len < 4 || (len - 4) % 8 != 0)
		return;
	for (size_t off = 4; off + 8 <= len; off += 8) {
		uint16_t tag;
		uint32_t id;
		memcpy(&tag, value + off, 2);
		memcpy(&id, value + off + 4, 4);
		if (tag == 0x02)
			id = to_backing ? cntrfs_uid_to_backing(s, id) : cntrfs_uid_to_kernel(s, id);
		else if (tag == 0x08)
			id = to_backing ? cntrfs_gid_to_backing(s, id) : cntrfs_gid_to_kernel(s, id);
		else
			continue;
		memcpy(value + off + 4, &id, 4);
	}
}
