/*
 * sys.h -- syscall shims: one function per syscall, each returning the syscall's result
 * (a count or an fd) or -errno, never setting errno for the caller to read.
 *
 * Python 3.11's os module lacks setns/unshare/pidfd_getfd/the new mount API/openat2/
 * process_vm_*, and glibc 2.36 wraps only some of them; every other part of the C core and
 * the Python fence (dvs.lowlevel) calls these instead of syscall(2).
 */
#ifndef DVS_SYS_H
#define DVS_SYS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* cffi:begin */
/* cffi:constants
   CLONE_NEWNS CLONE_NEWUTS CLONE_NEWIPC CLONE_NEWUSER CLONE_NEWPID CLONE_NEWNET
   CLONE_NEWCGROUP CLONE_NEWTIME
   OPEN_TREE_CLONE OPEN_TREE_CLOEXEC AT_RECURSIVE AT_EMPTY_PATH AT_SYMLINK_NOFOLLOW AT_FDCWD
   MOVE_MOUNT_F_EMPTY_PATH MOVE_MOUNT_T_EMPTY_PATH MOVE_MOUNT_F_SYMLINKS
   MOUNT_ATTR_RDONLY MOUNT_ATTR_NOSUID MOUNT_ATTR_NODEV MOUNT_ATTR_NOEXEC MOUNT_ATTR_IDMAP
   MOUNT_ATTR_NOSYMFOLLOW MS_PRIVATE MS_SLAVE MS_SHARED MS_REC MNT_DETACH
   FSOPEN_CLOEXEC FSMOUNT_CLOEXEC FSCONFIG_SET_FLAG FSCONFIG_SET_STRING FSCONFIG_CMD_CREATE
   RESOLVE_NO_XDEV RESOLVE_NO_MAGICLINKS RESOLVE_NO_SYMLINKS RESOLVE_BENEATH RESOLVE_IN_ROOT
   UFFD_USER_MODE_ONLY MAX_HANDLE_SZ
*/
/* namespaces */
int dvs_setns(int fd, int nstype);
int dvs_unshare(int flags);

/* pidfds (5.3 / 5.6) */
int dvs_pidfd_open(int pid, unsigned int flags);
int dvs_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int dvs_pidfd_send_signal(int pidfd, int sig, unsigned int flags);

/* the new mount API (5.2; mount_setattr 5.12) */
int dvs_open_tree(int dfd, const char *path, unsigned int flags);
int dvs_move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path,
		   unsigned int flags);
int dvs_mount_setattr(int dfd, const char *path, unsigned int flags, uint64_t attr_set,
		      uint64_t attr_clr, uint64_t propagation, uint64_t userns_fd);
int dvs_fsopen(const char *fsname, unsigned int flags);
int dvs_fsconfig(int fd, unsigned int cmd, const char *key, const void *value, int aux);
int dvs_fsmount(int fd, unsigned int flags, unsigned int attr_flags);
int dvs_umount2(const char *target, int flags);

/* path resolution with RESOLVE_* restrictions (5.6) */
int dvs_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);

/* another process's memory: a batch of (local, remote, len) segments, one direction.
 * Returns the number of bytes moved (short only if a remote page is unmapped) or -errno. */
struct dvs_mem_seg {
	uint64_t local;
	uint64_t remote;
	uint64_t len;
};
int64_t dvs_process_vm_rw(int pid, int write, const struct dvs_mem_seg *segs, uint32_t n_segs);

/* file handles: handle_bytes is in/out (capacity in, used out) */
int dvs_name_to_handle_at(int dfd, const char *path, uint8_t *handle, uint32_t *handle_bytes,
			  int32_t *handle_type, int32_t *mount_id, int flags);
int dvs_open_by_handle_at(int mount_fd, const uint8_t *handle, uint32_t handle_bytes,
			  int32_t handle_type, int flags);

int dvs_userfaultfd(int flags);

/* Start a program in a prepared context with clone3(CLONE_PIDFD):
 * optional CLONE_INTO_CGROUP, new namespaces, uid/gid maps written by the parent before
 * the child proceeds, setns() into ns_fds in order, chroot/chdir, stdio, execve.
 * path == NULL: the child holds its namespaces with pause() until killed.
 * Returns 0 and fills pid/pidfd, or -errno with failed_step naming what failed
 * (DVS_STEP_*); the child reports its errno over a close-on-exec pipe, so a successful
 * return means execve succeeded. */
#define DVS_STEP_NONE 0
#define DVS_STEP_CLONE 1
#define DVS_STEP_MAPS 2
#define DVS_STEP_SETNS 3
#define DVS_STEP_CHROOT 4
#define DVS_STEP_CHDIR 5
#define DVS_STEP_STDIO 6
#define DVS_STEP_CREDS 7
#define DVS_STEP_EXEC 8
#define DVS_STEP_SYNC 9
struct dvs_spawn {
	const char *path;
	char *const *argv;
	char *const *envp; /* NULL: inherit */
	const int *ns_fds; /* setns(fd, 0) in this order */
	int32_t n_ns_fds;
	int32_t cgroup_fd;    /* >= 0: CLONE_INTO_CGROUP */
	uint64_t clone_flags; /* CLONE_NEW* for the child */
	const char *uid_map;  /* with CLONE_NEWUSER: written by the parent */
	const char *gid_map;
	int32_t stdio[3];     /* -1: inherit */
	const char *root;     /* chroot() after setns; NULL: none */
	const char *cwd;      /* chdir() last; NULL: none */
	int32_t uid, gid;     /* -1: keep */
	int32_t pdeath_signal; /* 0: none */
	/* out */
	int32_t pid;
	int32_t pidfd;
	int32_t failed_step;
	int32_t failed_index; /* for SETNS: which ns_fds entry */
};
int dvs_spawn(struct dvs_spawn *req);
/* cffi:end */


/* ---- internal helpers for the C core (not exported to Python) ----
 * Per-thread credentials: Linux keeps fsuid/fsgid, supplementary groups and capability
 * sets per task (thread). glibc's setgroups() broadcasts to every thread of the process
 * (POSIX semantics), so a FUSE worker that acts with its caller's credentials must use the
 * raw syscalls below, which change only the calling thread. */
int dvs_sys_setfsuid(uint32_t uid);   /* returns the previous fsuid */
int dvs_sys_setfsgid(uint32_t gid);   /* returns the previous fsgid */
int dvs_sys_setgroups_thread(uint32_t n, const uint32_t *gids);
/* The calling thread's effective capability set := permitted & mask (bit n = cap n). */
int dvs_sys_cap_set_effective(uint64_t mask);
int dvs_sys_cap_get(uint64_t *effective, uint64_t *permitted);
/* fchmodat2(2) (6.6): AT_EMPTY_PATH works on O_PATH descriptors */
int dvs_sys_fchmodat2(int dfd, const char *path, uint32_t mode, int flags);

#endif /* DVS_SYS_H */
