/*
 * sys.c -- syscall shims (see sys.h).
 *
 * Each shim is the raw syscall with errno folded into the return value, so C callers and
 * Python (through cffi, which releases the GIL around every call) get one convention:
 * >= 0 success, -errno failure. process_vm_readv/writev take at most IOV_MAX iovecs per
 * call and may stop short at the first unmapped remote page; the batch shim splits and
 * reports the bytes actually moved, which the caller must check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/capability.h>
#include <unistd.h>

#include "compat.h"
#include "sys/sys.h"

/* struct mount_attr from linux/mount.h; spelled out because glibc's <sys/mount.h> and
 * <linux/mount.h> conflict on Debian 12. */
struct dvs_mount_attr {
	uint64_t attr_set;
	uint64_t attr_clr;
	uint64_t propagation;
	uint64_t userns_fd;
};

static inline long neg_errno(long ret)
{
	return ret < 0 ? -errno : ret;
}

int dvs_setns(int fd, int nstype)
{
	return (int)neg_errno(setns(fd, nstype));
}

int dvs_unshare(int flags)
{
	return (int)neg_errno(unshare(flags));
}

int dvs_pidfd_open(int pid, unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_pidfd_open, pid, flags));
}

int dvs_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_pidfd_getfd, pidfd, targetfd, flags));
}

int dvs_pidfd_send_signal(int pidfd, int sig, unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_pidfd_send_signal, pidfd, sig, NULL, flags));
}

int dvs_open_tree(int dfd, const char *path, unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_open_tree, dfd, path, flags));
}

int dvs_move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path,
		   unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_move_mount, from_dfd, from_path, to_dfd, to_path, flags));
}

int dvs_mount_setattr(int dfd, const char *path, unsigned int flags, uint64_t attr_set,
		      uint64_t attr_clr, uint64_t propagation, uint64_t userns_fd)
{
	struct dvs_mount_attr attr = {
		.attr_set = attr_set,
		.attr_clr = attr_clr,
		.propagation = propagation,
		.userns_fd = userns_fd,
	};
	return (int)neg_errno(syscall(__NR_mount_setattr, dfd, path, flags, &attr, sizeof(attr)));
}

int dvs_fsopen(const char *fsname, unsigned int flags)
{
	return (int)neg_errno(syscall(__NR_fsopen, fsname, flags));
}

int dvs_fsconfig(int fd, unsigned int cmd, const char *key, const void *value, int aux)
{
	return (int)neg_errno(syscall(__NR_fsconfig, fd, cmd, key, value, aux));
}

int dvs_fsmount(int fd, unsigned int flags, unsigned int attr_flags)
{
	return (int)neg_errno(syscall(__NR_fsmount, fd, flags, attr_flags));
}

int dvs_umount2(const char *target, int flags)
{
	return (int)neg_errno(umount2(target, flags));
}

int dvs_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve)
{
	struct open_how how = { .flags = flags, .mode = mode, .resolve = resolve };
	return (int)neg_errno(syscall(__NR_openat2, dfd, path, &how, sizeof(how)));
}

int64_t dvs_process_vm_rw(int pid, int write, const struct dvs_mem_seg *segs, uint32_t n_segs)
{
	struct iovec local[64], remote[64];
	int64_t moved = 0;
	uint32_t i = 0;

	while (i < n_segs) {
		uint32_t batch = 0;
		uint64_t expected = 0;
		for (; batch < 64 && i + batch < n_segs; batch++) {
			const struct dvs_mem_seg *s = &segs[i + batch];
			if (s->len > SSIZE_MAX - expected)
				return -EINVAL;
			local[batch] = (struct iovec){ (void *)(uintptr_t)s->local, s->len };
			remote[batch] = (struct iovec){ (void *)(uintptr_t)s->remote, s->len };
			expected += s->len;
		}
		ssize_t n = write ? process_vm_writev(pid, local, batch, remote, batch, 0)
				  : process_vm_readv(pid, local, batch, remote, batch, 0);
		if (n < 0)
			return moved ? moved : -errno;
		moved += n;
		if ((uint64_t)n != expected)
			return moved; /* stopped at an unmapped remote page */
		i += batch;
	}
	return moved;
}

int dvs_name_to_handle_at(int dfd, const char *path, uint8_t *handle, uint32_t *handle_bytes,
			  int32_t *handle_type, int32_t *mount_id, int flags)
{
	union {
		struct file_handle fh;
		uint8_t raw[sizeof(struct file_handle) + MAX_HANDLE_SZ];
	} buf;
	int mnt = -1;

	buf.fh.handle_bytes = MAX_HANDLE_SZ;
	if (name_to_handle_at(dfd, path, &buf.fh, &mnt, flags) < 0)
		return -errno;
	if (buf.fh.handle_bytes > *handle_bytes)
		return -EOVERFLOW;
	memcpy(handle, buf.fh.f_handle, buf.fh.handle_bytes);
	*handle_bytes = buf.fh.handle_bytes;
	*handle_type = buf.fh.handle_type;
	*mount_id = mnt;
	return 0;
}

int dvs_open_by_handle_at(int mount_fd, const uint8_t *handle, uint32_t handle_bytes,
			  int32_t handle_type, int flags)
{
	union {
		struct file_handle fh;
		uint8_t raw[sizeof(struct file_handle) + MAX_HANDLE_SZ];
	} buf;

	if (handle_bytes > MAX_HANDLE_SZ)
		return -EINVAL;
	buf.fh.handle_bytes = handle_bytes;
	buf.fh.handle_type = handle_type;
	memcpy(buf.fh.f_handle, handle, handle_bytes);
	return (int)neg_errno(open_by_handle_at(mount_fd, &buf.fh, flags));
}

int dvs_userfaultfd(int flags)
{
	return (int)neg_errno(syscall(__NR_userfaultfd, flags));
}

/* ---- per-thread credentials (see sys.h) ---- */

int dvs_sys_setfsuid(uint32_t uid)
{
	return (int)syscall(SYS_setfsuid, uid);
}

int dvs_sys_setfsgid(uint32_t gid)
{
	return (int)syscall(SYS_setfsgid, gid);
}

int dvs_sys_setgroups_thread(uint32_t n, const uint32_t *gids)
{
	return (int)neg_errno(syscall(SYS_setgroups, (size_t)n, gids));
}

int dvs_sys_cap_get(uint64_t *effective, uint64_t *permitted)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &hdr, data) < 0)
		return -errno;
	if (effective)
		*effective = data[0].effective | (uint64_t)data[1].effective << 32;
	if (permitted)
		*permitted = data[0].permitted | (uint64_t)data[1].permitted << 32;
	return 0;
}

int dvs_sys_cap_set_effective(uint64_t mask)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &hdr, data) < 0)
		return -errno;
	uint64_t permitted = data[0].permitted | (uint64_t)data[1].permitted << 32;
	uint64_t effective = permitted & mask;
	data[0].effective = (uint32_t)effective;
	data[1].effective = (uint32_t)(effective >> 32);
	return (int)neg_errno(syscall(SYS_capset, &hdr, data));
}

int dvs_sys_fchmodat2(int dfd, const char *path, uint32_t mode, int flags)
{
	return (int)neg_errno(syscall(__NR_fchmodat2, dfd, path, mode, flags));
}
