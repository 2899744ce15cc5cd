/*
 * attach.c -- enter a running container's context and start a command in it.
 *
 * Two processes do the work, both plain C between fork and exec:
 *
 *   dvs (Python) --clone3--> keeper --clone3--> command
 *
 * The keeper joins the target's cgroups, then its mount namespace, builds the view (attach
 * mode) or chroots into the container's root (exec mode), joins the remaining namespaces
 * and forks the command, which sets ids, capabilities, LSM label and seccomp filters and
 * execs. The keeper stays as the command's parent: it reports the command's stops and exit
 * to dvs and kills what is left when dvs goes away.
 *
 * Kernel semantics relied on:
 * - setns(2) into a mount or user namespace needs a single-threaded caller that does not
 *   share its fs_struct: a fresh clone3 child of the (possibly threaded) interpreter is.
 *   The child of a threaded process may find locks (malloc's) held by threads that do not
 *   exist in it, so nothing here allocates: fixed buffers only, raw syscalls, no stdio.
 * - setns(CLONE_NEWPID) and setns(CLONE_NEWTIME) change the namespace of *later children*
 *   only, hence the second fork: the command really is a member of the target's pid
 *   namespace (sees its pids, dies with its init), the keeper is not.
 * - Mounts: after setns(mnt) the keeper clones the container's root tree
 *   (open_tree(OPEN_TREE_CLONE|AT_RECURSIVE); cloning requires the source to be in the
 *   caller's namespace), then unshare(CLONE_NEWNS) gives it a private copy whose root it
 *   makes a recursive slave first, so nothing mounted afterwards can propagate back to
 *   the container or the host. The tools view arrives as a detached mount (made private by
 *   the caller); it is attached on top of "/" of the private namespace, which a process
 *   only sees after fchdir()+chroot(".") into it (lookups of "/" start at the old root).
 *   Every path below the tools root is resolved with openat2(RESOLVE_IN_ROOT), so
 *   absolute symlinks of the tools side and of the container resolve inside their own
 *   trees, and mounts go onto those O_PATH fds (move_mount MOVE_MOUNT_T_EMPTY_PATH).
 * - A mountpoint that does not exist is never created on the underlying filesystem
 *   (the container's rootfs may be read-only, the host's must stay clean). Instead the
 *   nearest existing directory is "spliced": a tmpfs is mounted over it holding one
 *   mountpoint (or symlink) per original entry, each entry's original is bind-mounted
 *   back (open_tree clone from an fd to the covered directory), and the missing path is
 *   created in the tmpfs. The namespace, and with it every mount made here, disappears
 *   when its last process (keeper, command and the command's children) exits.
 * - PR_SET_PDEATHSIG fires when the *thread* that forked the child exits; it is cleared by
 *   a change of effective ids, so the command sets it after setresuid and then checks
 *   that its parent is still the keeper (getppid() is 0 in the pid namespace, as the
 *   keeper lives outside it).
 * - Capabilities: PR_CAPBSET_DROP (needs CAP_SETPCAP) bounds what the command and its
 *   descendants can ever gain; a uid-0 command then gets exactly the bounding set at
 *   execve. A change of uid from 0 to non-zero clears the permitted and effective sets
 *   unless PR_SET_KEEPCAPS is on (which keeps the permitted set only; execve resets it).
 *   So the command turns it on, changes ids, then capset(2)s the target's permitted,
 *   effective and inheritable sets (each cut to the bounding set) and raises the target's
 *   ambient capabilities: an execve by a non-zero uid of a file without file capabilities
 *   computes P' = E' = the ambient set (capabilities(7)), and an ambient capability must
 *   be in both the permitted and the inheritable set when it is raised. capset may only
 *   shrink the permitted set and put into the inheritable set what is in the bounding set.
 * - seccomp: installing a filter needs no_new_privs or CAP_SYS_ADMIN in the current user
 *   namespace. Without no_new_privs the filters go in while the command still has
 *   CAP_SYS_ADMIN (before setresuid); with it, no_new_privs is set and the filters are
 *   installed last, right before execve, exactly as the target has them.
 * - PTY: the master comes from the container's own /dev/ptmx (its devpts instance), so
 *   the command's tty exists inside the container; TIOCGPTPEER opens the slave without a
 *   path lookup in the (untrusted) container /dev/pts.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "compat.h"
#include "container/attach.h"
#include "sys/sys.h"

#define RESOLVE_TREE (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)

/* ---- reporting ------------------------------------------------------------------------- */

static int g_report_fd = -1;

static void send_msg(int kind, int step, int index, int err, int64_t value, int fd)
{
	struct dvs_attach_msg msg;
	memset(&msg, 0, sizeof(msg));
	msg.kind = kind;
	msg.step = step;
	msg.index = index;
	msg.err = err;
	msg.value = value;
	msg.fd = -1;

	struct iovec iov = { &msg, sizeof(msg) };
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} control;
	struct msghdr mh;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (fd >= 0) {
		memset(&control, 0, sizeof(control));
		mh.msg_control = control.buf;
		mh.msg_controllen = sizeof(control.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	while (sendmsg(g_report_fd, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

static void warn(int step, int index, int err)
{
	send_msg(DVS_MSG_WARN, step, index, err, 0, -1);
}

static __attribute__((noreturn)) void fail(int step, int index, int err)
{
	send_msg(DVS_MSG_FAIL, step, index, err, 0, -1);
	_exit(127);
}

/* shims return -errno; turn a negative result into a failure report */
static int must(int ret, int step, int index)
{
	if (ret < 0)
		fail(step, index, -ret);
	return ret;
}

static int sys_ok(int ret, int step, int index)
{
	if (ret < 0)
		fail(step, index, errno);
	return ret;
}

/* ---- small helpers --------------------------------------------------------------------- */

static size_t str_len(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

/* close every fd >= 3 except those in keep[] (unsorted, -1 entries ignored) */
static void close_all_except(const int *keep, int n)
{
	unsigned int lo = 3;
	for (;;) {
		unsigned int next = UINT_MAX;
		for (int i = 0; i < n; i++)
			if (keep[i] >= (int)lo && (unsigned int)keep[i] < next)
				next = (unsigned int)keep[i];
		if (next > lo)
			syscall(__NR_close_range, lo, next == UINT_MAX ? UINT_MAX : next - 1, 0);
		if (next == UINT_MAX)
			return;
		lo = next + 1;
	}
}

static int path_is_safe(const char *rel)
{
	/* relative, no ".." component: the caller built it, but the check is cheap */
	if (!rel[0] || rel[0] == '/')
		return 0;
	const char *p = rel;
	while (*p) {
		const char *end = p;
		while (*end && *end != '/')
			end++;
		if (end - p == 2 && p[0] == '.' && p[1] == '.')
			return 0;
		p = *end ? end + 1 : end;
	}
	return 1;
}

static int open_in(int root, const char *rel, int flags)
{
	return dvs_openat2(root, rel, (uint64_t)(flags | O_CLOEXEC), 0, RESOLVE_TREE);
}

static int attach_onto(int tree_fd, int target_fd)
{
	return dvs_move_mount(tree_fd, "", target_fd, "",
			      MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
}

/* ---- splicing a missing mountpoint into a directory ------------------------------------ */

struct linux_dirent64_hdr {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/*
 * Cover directory `dir_fd` with a tmpfs that shows the same entries (each bind-mounted
 * from the covered directory, symlinks recreated) and return an O_PATH fd of the tmpfs
 * root, or -errno. Nothing is written to the covered directory's filesystem.
 */
static int splice_dir(int dir_fd)
{
	struct stat st;
	if (fstat(dir_fd, &st) < 0)
		return -errno;
	int list_fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (list_fd < 0)
		return -errno;

	int err = 0, fs = -1, tmp = -1;
	fs = dvs_fsopen("tmpfs", FSOPEN_CLOEXEC);
	if (fs < 0) {
		err = fs;
		goto out;
	}
	char mode[16];
	{
		/* octal mode without snprintf (not async-signal-safe) */
		unsigned int m = st.st_mode & 07777;
		mode[0] = (char)('0' + ((m >> 9) & 7));
		mode[1] = (char)('0' + ((m >> 6) & 7));
		mode[2] = (char)('0' + ((m >> 3) & 7));
		mode[3] = (char)('0' + (m & 7));
		mode[4] = 0;
	}
	if ((err = dvs_fsconfig(fs, FSCONFIG_SET_STRING, "mode", mode, 0)) < 0 ||
	    (err = dvs_fsconfig(fs, FSCONFIG_SET_STRING, "size", "1m", 0)) < 0 ||
	    (err = dvs_fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0)) < 0)
		goto out;
	tmp = dvs_fsmount(fs, FSMOUNT_CLOEXEC, 0);
	if (tmp < 0) {
		err = tmp;
		goto out;
	}
	if (fchownat(tmp, "", st.st_uid, st.st_gid, AT_EMPTY_PATH) < 0) {
		err = -errno;
		goto out;
	}

	/* pass 1: create one placeholder per entry in the (still detached) tmpfs */
	char buf[8192];
	int entries = 0;
	for (;;) {
		ssize_t n = getdents64(list_fd, buf, sizeof(buf));
		if (n < 0) {
			err = -errno;
			goto out;
		}
		if (n == 0)
			break;
		for (ssize_t off = 0; off < n;) {
			struct linux_dirent64_hdr *d = (void *)(buf + off);
			off += d->d_reclen;
			const char *name = d->d_name;
			if (!strcmp(name, ".") || !strcmp(name, ".."))
				continue;
			if (++entries > DVS_ATTACH_MAX_SPLICE_ENTRIES) {
				err = -E2BIG;
				goto out;
			}
			struct stat est;
			if (fstatat(dir_fd, name, &est, AT_SYMLINK_NOFOLLOW) < 0)
				continue; /* vanished meanwhile */
			int r;
			if (S_ISLNK(est.st_mode)) {
				char target[PATH_MAX];
				ssize_t len = readlinkat(dir_fd, name, target, sizeof(target) - 1);
				if (len < 0)
					continue;
				target[len] = 0;
				r = symlinkat(target, tmp, name);
			} else if (S_ISDIR(est.st_mode)) {
				r = mkdirat(tmp, name, est.st_mode & 07777);
			} else {
				r = mknodat(tmp, name, S_IFREG | (est.st_mode & 07777), 0);
			}
			if (r < 0) {
				err = -errno;
				goto out;
			}
			if (!S_ISLNK(est.st_mode))
				fchownat(tmp, name, est.st_uid, est.st_gid, AT_SYMLINK_NOFOLLOW);
		}
	}

	/* cover the directory, then bind every original entry onto its placeholder; dir_fd
	 * still names the covered directory, so its entries stay reachable for cloning */
	if ((err = attach_onto(tmp, dir_fd)) < 0)
		goto out;
	if (lseek(list_fd, 0, SEEK_SET) < 0) {
		err = -errno;
		goto out;
	}
	for (;;) {
		ssize_t n = getdents64(list_fd, buf, sizeof(buf));
		if (n <= 0)
			break;
		for (ssize_t off = 0; off < n;) {
			struct linux_dirent64_hdr *d = (void *)(buf + off);
			off += d->d_reclen;
			const char *name = d->d_name;
			if (!strcmp(name, ".") || !strcmp(name, ".."))
				continue;
			struct stat est;
			if (fstatat(dir_fd, name, &est, AT_SYMLINK_NOFOLLOW) < 0 || S_ISLNK(est.st_mode))
				continue;
			int clone = dvs_open_tree(dir_fd, name,
						  OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE |
							  AT_SYMLINK_NOFOLLOW);
			if (clone < 0)
				continue; /* e.g. an unbindable mount: the placeholder stays empty */
			int spot = openat(tmp, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
			if (spot >= 0) {
				attach_onto(clone, spot);
				close(spot);
			}
			close(clone);
		}
	}
	err = 0;
out:
	close(list_fd);
	if (fs >= 0)
		close(fs);
	if (err) {
		if (tmp >= 0)
			close(tmp);
		return err;
	}
	return tmp;
}

/* devices of the tmpfs instances spliced in so far: ours to write into directly */
static dev_t g_spliced[64];
static int g_n_spliced;

static int is_spliced(int fd)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		return 0;
	for (int i = 0; i < g_n_spliced; i++)
		if (g_spliced[i] == st.st_dev)
			return 1;
	return 0;
}

/*
 * Resolve `rel` below `*root` (RESOLVE_IN_ROOT) to an O_PATH fd of a directory (want_dir)
 * or non-directory; if it is missing, splice its nearest existing ancestor (unless that is
 * already one of our tmpfs instances) and create it there. Splicing the root itself
 * replaces `*root` with the tmpfs now on top of it. Returns the fd or -errno (-ENOTDIR /
 * -EISDIR on a type mismatch).
 */
static int ensure_mountpoint(int *root_p, const char *rel, int want_dir)
{
	int root = *root_p;
	int fd = open_in(root, rel, O_PATH);
	if (fd >= 0) {
		struct stat st;
		if (fstat(fd, &st) < 0) {
			int err = -errno;
			close(fd);
			return err;
		}
		if (!!S_ISDIR(st.st_mode) != !!want_dir) {
			close(fd);
			return want_dir ? -ENOTDIR : -EISDIR;
		}
		return fd;
	}
	if (fd != -ENOENT)
		return fd;

	/* find the deepest existing ancestor: cut components off the end */
	char anc[PATH_MAX];
	size_t len = str_len(rel);
	if (len >= sizeof(anc))
		return -ENAMETOOLONG;
	memcpy(anc, rel, len + 1);
	int dir = -1;
	size_t cut = len;
	for (;;) {
		while (cut > 0 && anc[cut - 1] != '/')
			cut--;
		if (cut == 0) {
			dir = dvs_openat2(root, ".", O_PATH | O_DIRECTORY | O_CLOEXEC, 0, RESOLVE_TREE);
			break;
		}
		anc[cut - 1] = 0;
		dir = open_in(root, anc, O_PATH | O_DIRECTORY);
		if (dir >= 0 || dir != -ENOENT)
			break;
		cut--;
	}
	if (dir < 0)
		return dir;

	int top;
	if (is_spliced(dir)) {
		top = dir; /* our own tmpfs: create the entries directly */
	} else {
		top = splice_dir(dir);
		close(dir);
		if (top < 0)
			return top;
		struct stat tst;
		if (fstat(top, &tst) == 0 && g_n_spliced < (int)(sizeof(g_spliced) / sizeof(g_spliced[0])))
			g_spliced[g_n_spliced++] = tst.st_dev;
		if (cut == 0) {
			/* the root itself was covered: later lookups must start on the tmpfs */
			int new_root = fcntl(top, F_DUPFD_CLOEXEC, 3);
			if (new_root < 0) {
				int err = -errno;
				close(top);
				return err;
			}
			*root_p = new_root;
		}
	}

	/* create the missing components rel[cut..] inside the tmpfs */
	int cur = top;
	const char *p = rel + cut;
	for (;;) {
		const char *end = p;
		while (*end && *end != '/')
			end++;
		char name[NAME_MAX + 1];
		size_t n = (size_t)(end - p);
		if (n == 0 || n > NAME_MAX) {
			close(cur);
			return -EINVAL;
		}
		memcpy(name, p, n);
		name[n] = 0;
		int last = !*end;
		int r;
		struct stat est;
		if (last && fstatat(cur, name, &est, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(est.st_mode))
			unlinkat(cur, name, 0); /* a dangling link, copied into our tmpfs: replace it */
		if (!last || want_dir)
			r = mkdirat(cur, name, 0755);
		else
			r = mknodat(cur, name, S_IFREG | 0644, 0);
		if (r < 0 && errno != EEXIST) {
			r = -errno;
			close(cur);
			return r;
		}
		int next = openat(cur, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
		int saved = errno;
		close(cur);
		if (next < 0)
			return -saved;
		cur = next;
		if (last)
			return cur;
		p = end + 1;
	}
}

/* ---- the keeper: mounts ---------------------------------------------------------------- */

static void build_attach_view(const struct dvs_attach *req)
{
	/* the container's tree, cloned while we are in its namespace */
	int croot = must(dvs_open_tree(req->root_fd, "",
				       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE |
					       AT_EMPTY_PATH),
			 DVS_ATTACH_STEP_CLONE_ROOT, 0);
	must(dvs_mount_setattr(croot, "", AT_EMPTY_PATH | AT_RECURSIVE, 0, 0, MS_PRIVATE, 0),
	     DVS_ATTACH_STEP_CLONE_ROOT, 1);

	must(dvs_unshare(CLONE_NEWNS), DVS_ATTACH_STEP_UNSHARE, 0);
	sys_ok(mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL), DVS_ATTACH_STEP_PROPAGATION, 0);

	/* the tools view on top of our private "/" */
	must(dvs_move_mount(req->tools_fd, "", AT_FDCWD, "/", MOVE_MOUNT_F_EMPTY_PATH),
	     DVS_ATTACH_STEP_TOOLS, 0);
	int root = req->tools_fd;

	/* the container's root at base_dir */
	const char *base = req->base_dir;
	while (*base == '/')
		base++;
	if (!*base)
		fail(DVS_ATTACH_STEP_BASE_DIR, 0, EINVAL);
	if (!path_is_safe(base))
		fail(DVS_ATTACH_STEP_BASE_DIR, 0, EINVAL);
	int spot = ensure_mountpoint(&root, base, 1);
	if (spot < 0)
		fail(DVS_ATTACH_STEP_BASE_DIR, 0, -spot);
	must(attach_onto(croot, spot), DVS_ATTACH_STEP_BASE_DIR, 1);
	close(spot);

	/* the container's /proc, /dev, /sys, /etc files over the tools view */
	for (int i = 0; i < req->n_overlays; i++) {
		const char *rel = req->overlays[i];
		if (!path_is_safe(rel)) {
			warn(DVS_ATTACH_STEP_OVERLAY, i, EINVAL);
			continue;
		}
		int src = open_in(croot, rel, O_PATH);
		if (src < 0) {
			warn(DVS_ATTACH_STEP_OVERLAY_SOURCE, i, -src); /* the container lacks it */
			continue;
		}
		struct stat st;
		/* the container's file is what it likes; a FIFO or device in place of
		 * /etc/hosts would hang or confuse the tools, so only files and dirs */
		int bad = fstat(src, &st) < 0 ? errno
			  : (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) ? EINVAL
									 : 0;
		if (bad) {
			warn(DVS_ATTACH_STEP_OVERLAY, i, bad);
			close(src);
			continue;
		}
		int dst = ensure_mountpoint(&root, rel, S_ISDIR(st.st_mode));
		if (dst < 0) {
			warn(DVS_ATTACH_STEP_OVERLAY, i, -dst);
			close(src);
			continue;
		}
		int tree = dvs_open_tree(src, "",
					 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE |
						 AT_EMPTY_PATH);
		int r = tree < 0 ? tree : attach_onto(tree, dst);
		if (r < 0)
			warn(DVS_ATTACH_STEP_OVERLAY, i, -r);
		if (tree >= 0)
			close(tree);
		close(dst);
		close(src);
	}
	close(croot);

	/* enter the view: the topmost mount on the tools root becomes "/" */
	int top = dvs_openat2(root, ".", O_PATH | O_DIRECTORY | O_CLOEXEC, 0, RESOLVE_TREE);
	if (top < 0)
		fail(DVS_ATTACH_STEP_CHROOT, 0, -top);
	sys_ok(fchdir(top), DVS_ATTACH_STEP_CHROOT, 1);
	sys_ok(chroot("."), DVS_ATTACH_STEP_CHROOT, 2);
	close(top);
}

static void enter_exec_root(const struct dvs_attach *req)
{
	sys_ok(fchdir(req->root_fd), DVS_ATTACH_STEP_CHROOT, 0);
	sys_ok(chroot("."), DVS_ATTACH_STEP_CHROOT, 1);
}

/* ---- the keeper: terminal -------------------------------------------------------------- */

/* Open a PTY on the container's devpts; returns the master and sets *slave, or -errno. */
static int open_container_pty(const struct dvs_attach *req, int *slave)
{
	int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (master < 0)
		return -errno;
	struct stat st;
	unsigned int ptn;
	int unlock = 0;
	int err = 0;
	if (fstat(master, &st) < 0 || !S_ISCHR(st.st_mode)) {
		err = -ENOTTY; /* not a character device: not a ptmx */
		goto bad;
	}
	if (ioctl(master, TIOCGPTN, &ptn) < 0 || ioctl(master, TIOCSPTLCK, &unlock) < 0) {
		err = -errno;
		goto bad;
	}
	int fl = fcntl(master, F_GETFL);
	if (fl < 0 || fcntl(master, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		err = -errno;
		goto bad;
	}
	struct winsize ws = { .ws_row = req->rows, .ws_col = req->cols };
	if (req->rows && req->cols)
		ioctl(master, TIOCSWINSZ, &ws);
	*slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*slave < 0) {
		err = -errno;
		goto bad;
	}
	if (req->set_ids)
		fchown(*slave, (uid_t)req->uid, (gid_t)-1); /* best effort, like login(1) */
	return master;
bad:
	close(master);
	return err;
}

/* ---- the command ----------------------------------------------------------------------- */

static int g_exec_pipe = -1;
/* read end of a pipe whose write end only the keeper holds (non-blocking) */
static int g_life_fd = -1;

static __attribute__((noreturn)) void cmd_fail(int step, int index, int err)
{
	char c = 'F';
	send_msg(DVS_MSG_FAIL, step, index, err, 0, -1);
	while (write(g_exec_pipe, &c, 1) < 0 && errno == EINTR)
		;
	_exit(127);
}

static void install_filters(const struct dvs_attach *req)
{
	const uint8_t *insns = req->filter_insns;
	for (int i = 0; i < req->n_filters; i++) {
		struct sock_fprog prog = {
			.len = (unsigned short)req->filter_lens[i],
			.filter = (struct sock_filter *)(uintptr_t)insns,
		};
		unsigned int flags = req->filter_flags[i] & SECCOMP_FILTER_FLAG_LOG;
		if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog) < 0)
			cmd_fail(DVS_ATTACH_STEP_SECCOMP, i, errno);
		insns += (size_t)req->filter_lens[i] * sizeof(struct sock_filter);
	}
}

/* after the id change: the target's permitted/effective/inheritable and ambient sets */
static void set_cap_sets(const struct dvs_attach *req)
{
	uint64_t valid = req->cap_last >= 63 ? ~0ULL : (1ULL << (req->cap_last + 1)) - 1;
	uint64_t keep = req->cap_keep & valid;
	uint64_t permitted = req->cap_permitted & keep;
	uint64_t effective = req->cap_effective & permitted;
	uint64_t inheritable = req->cap_inheritable & keep;
	struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
	struct __user_cap_data_struct data[2] = {
		{(uint32_t)effective, (uint32_t)permitted, (uint32_t)inheritable},
		{(uint32_t)(effective >> 32), (uint32_t)(permitted >> 32),
		 (uint32_t)(inheritable >> 32)},
	};
	if (syscall(SYS_capset, &header, data) < 0)
		cmd_fail(DVS_ATTACH_STEP_CAP_SETS, 1, errno);
	uint64_t ambient = req->cap_ambient & permitted & inheritable;
	for (int cap = 0; cap < 64; cap++)
		if ((ambient & (1ULL << cap)) &&
		    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0)
			cmd_fail(DVS_ATTACH_STEP_CAP_SETS, 2 + cap, errno);
}

static void exec_command(const struct dvs_attach *req)
{
	const char *file = req->argv[0];
	int has_slash = 0;
	for (const char *p = file; *p; p++)
		if (*p == '/')
			has_slash = 1;
	if (has_slash || !req->search_path) {
		execve(file, req->argv, req->envp);
		cmd_fail(DVS_ATTACH_STEP_EXEC, 0, errno);
	}
	size_t flen = str_len(file);
	int best = ENOENT;
	const char *p = req->search_path;
	for (;;) {
		const char *end = p;
		while (*end && *end != ':')
			end++;
		size_t dlen = (size_t)(end - p);
		char full[PATH_MAX];
		if (dlen + 1 + flen + 1 <= sizeof(full)) {
			if (dlen == 0) {
				memcpy(full, file, flen + 1); /* empty element: current directory */
			} else {
				memcpy(full, p, dlen);
				full[dlen] = '/';
				memcpy(full + dlen + 1, file, flen + 1);
			}
			execve(full, req->argv, req->envp);
			if (errno == EACCES)
				best = EACCES;
			else if (errno != ENOENT && errno != ENOTDIR)
				cmd_fail(DVS_ATTACH_STEP_EXEC, 0, errno);
		}
		if (!*end)
			break;
		p = end + 1;
	}
	cmd_fail(DVS_ATTACH_STEP_EXEC, 0, best);
}

static __attribute__((noreturn)) void command_main(const struct dvs_attach *req, int slave)
{
	/* terminal or pipes on 0..2 */
	if (slave >= 0) {
		if (setsid() < 0)
			cmd_fail(DVS_ATTACH_STEP_STDIO, 0, errno);
		if (ioctl(slave, TIOCSCTTY, 0) < 0)
			cmd_fail(DVS_ATTACH_STEP_STDIO, 1, errno);
		for (int i = 0; i < 3; i++)
			if (dup2(slave, i) < 0)
				cmd_fail(DVS_ATTACH_STEP_STDIO, 2, errno);
	} else {
		/* pipe mode without a terminal on stdin: a session of its own, so that what the
		 * command leaves running can be found (and ended) by its session id */
		if (req->new_session && setsid() < 0)
			cmd_fail(DVS_ATTACH_STEP_STDIO, 3, errno);
		int moved[3];
		for (int i = 0; i < 3; i++) {
			moved[i] = -1;
			if (req->stdio[i] >= 0 &&
			    (moved[i] = fcntl(req->stdio[i], F_DUPFD_CLOEXEC, 3)) < 0)
				cmd_fail(DVS_ATTACH_STEP_STDIO, i, errno);
		}
		for (int i = 0; i < 3; i++)
			if (moved[i] >= 0 && dup2(moved[i], i) < 0)
				cmd_fail(DVS_ATTACH_STEP_STDIO, i, errno);
	}

	/* ids are changed with raw syscalls: glibc's wrappers broadcast the change to every
	 * thread it knows of (setxid), and the thread list and locks it would use are the
	 * interpreter's, copied by clone3 -- they can be held by threads that do not exist
	 * here (a FUSE server's, say) and hang the child. One thread is all there is. */
	if (req->set_ids) {
		if (syscall(SYS_setgroups, (size_t)req->n_groups, (const gid_t *)req->groups) < 0)
			/* a user namespace with setgroups "deny" keeps the groups we have */
			send_msg(DVS_MSG_WARN, DVS_ATTACH_STEP_GROUPS, 0, errno, 0, -1);
		if (syscall(SYS_setresgid, (gid_t)req->gid, (gid_t)req->gid, (gid_t)req->gid) < 0)
			cmd_fail(DVS_ATTACH_STEP_GID, 0, errno);
	}
	for (int cap = 0; cap <= req->cap_last && cap < 64; cap++)
		if (!(req->cap_keep & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 &&
		    errno != EINVAL)
			cmd_fail(DVS_ATTACH_STEP_CAPS, cap, errno);
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	if (req->set_cap_sets && prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
		cmd_fail(DVS_ATTACH_STEP_CAP_SETS, 0, errno);

	if (req->lsm_attr && req->lsm_value) {
		char path[128] = "thread-self/attr/";
		size_t pre = str_len(path), alen = str_len(req->lsm_attr);
		if (pre + alen + 1 > sizeof(path))
			cmd_fail(DVS_ATTACH_STEP_LSM, 0, ENAMETOOLONG);
		memcpy(path + pre, req->lsm_attr, alen + 1);
		int fd = openat(req->host_proc_fd, path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			cmd_fail(DVS_ATTACH_STEP_LSM, 1, errno);
		size_t vlen = str_len(req->lsm_value);
		if (write(fd, req->lsm_value, vlen) != (ssize_t)vlen)
			cmd_fail(DVS_ATTACH_STEP_LSM, 2, errno);
		close(fd);
	}

	if (!req->no_new_privs)
		install_filters(req); /* needs CAP_SYS_ADMIN, which setresuid may take away */
	if (req->set_ids &&
	    syscall(SYS_setresuid, (uid_t)req->uid, (uid_t)req->uid, (uid_t)req->uid) < 0)
		cmd_fail(DVS_ATTACH_STEP_UID, 0, errno);
	if (req->set_cap_sets)
		set_cap_sets(req);
	if (req->no_new_privs) {
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
			cmd_fail(DVS_ATTACH_STEP_NO_NEW_PRIVS, 0, errno);
		install_filters(req);
	}

	/* die with the keeper; set after setresuid, which clears it. If the keeper died
	 * before that, the write end of the life pipe is closed: read() sees EOF. (read is
	 * the one check every seccomp filter lets through; getppid may be refused.) */
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	char probe;
	if (read(g_life_fd, &probe, 1) == 0)
		cmd_fail(DVS_ATTACH_STEP_SYNC, 0, ESRCH);

	exec_command(req);
	_exit(127);
}

/* ---- the keeper: supervising the command ----------------------------------------------- */

int dvs_proc_stat_session(const char *stat, int64_t len)
{
	/* "pid (comm) state ppid pgrp session ...": comm (set by the process itself, so
	 * untrusted) may contain ") " and digits, so parse from the last ')' */
	int64_t i = len - 1;
	while (i >= 0 && stat[i] != ')')
		i--;
	if (i < 0)
		return -1;
	int field = 2; /* the ')' ends field 2 */
	long value = 0;
	int in_num = 0;
	for (i++; i < len; i++) {
		char c = stat[i];
		if (c == ' ') {
			if (in_num && field == 6)
				return (int)value;
			in_num = 0;
			field++;
			value = 0;
			continue;
		}
		if (field == 6) {
			if (c < '0' || c > '9')
				return -1;
			value = value * 10 + (c - '0');
			if (value > INT_MAX)
				return -1;
			in_num = 1;
		}
	}
	return in_num && field == 6 ? (int)value : -1;
}

/* SIGKILL every process of session `sid` (host pids); repeat while new ones appear */
static void kill_session(int proc_fd, int sid)
{
	if (proc_fd < 0 || sid <= 0)
		return;
	for (int round = 0; round < 16; round++) {
		int dir = openat(proc_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dir < 0)
			return;
		int killed = 0;
		char buf[8192];
		for (;;) {
			ssize_t n = getdents64(dir, buf, sizeof(buf));
			if (n <= 0)
				break;
			for (ssize_t off = 0; off < n;) {
				struct linux_dirent64_hdr *d = (void *)(buf + off);
				off += d->d_reclen;
				long pid = 0;
				const char *s = d->d_name;
				if (!*s)
					continue;
				for (; *s >= '0' && *s <= '9' && pid <= INT_MAX; s++)
					pid = pid * 10 + (*s - '0');
				if (*s || pid <= 0 || pid > INT_MAX)
					continue;
				char path[32], stat[512];
				memcpy(path, d->d_name, (size_t)(s - d->d_name));
				memcpy(path + (s - d->d_name), "/stat", 6);
				int fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
				if (fd < 0)
					continue;
				ssize_t len = read(fd, stat, sizeof(stat));
				close(fd);
				if (len > 0 && dvs_proc_stat_session(stat, len) == sid && kill((pid_t)pid, SIGKILL) == 0)
					killed++;
			}
		}
		close(dir);
		if (!killed)
			return;
	}
}

static __attribute__((noreturn)) void supervise(const struct dvs_attach *req, int cmd_pid,
						 int cmd_pidfd)
{
	sigset_t handled;
	sigemptyset(&handled);
	sigaddset(&handled, SIGCHLD);
	sigaddset(&handled, SIGTERM);
	int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
	int keep[] = { g_report_fd, req->host_proc_fd, cmd_pidfd, sfd, g_life_fd };
	close_all_except(keep, 5);

	siginfo_t info;
	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = g_report_fd, .events = POLLIN },
			{ .fd = sfd, .events = POLLIN },
		};
		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			break;
		if (pfd[0].revents) {
			char drain[64];
			ssize_t n = recv(g_report_fd, drain, sizeof(drain), MSG_DONTWAIT);
			if (n == 0 || (pfd[0].revents & (POLLHUP | POLLERR))) {
				break; /* dvs went away (or closed its end to end the session) */
			}
		}
		if (pfd[1].revents) {
			struct signalfd_siginfo si;
			int terminate = 0;
			while (read(sfd, &si, sizeof(si)) > 0)
				if (si.ssi_signo == SIGTERM)
					terminate = 1;
			if (terminate)
				break; /* asked to end the session: as if dvs went away */
			/* peek first (WNOWAIT): until the command is reaped its pid -- which is
			 * also its session's id -- cannot be reused, so the session clean-up
			 * below can never hit a stranger */
			memset(&info, 0, sizeof(info));
			if (waitid(P_PIDFD, (id_t)cmd_pidfd, &info, WEXITED | WNOHANG | WNOWAIT) < 0)
				break;
			if (info.si_pid == 0) {
				memset(&info, 0, sizeof(info));
				if (waitid(P_PIDFD, (id_t)cmd_pidfd, &info,
					   WSTOPPED | WCONTINUED | WNOHANG) < 0)
					break;
				if (info.si_pid != 0 &&
				    (info.si_code == CLD_STOPPED || info.si_code == CLD_TRAPPED))
					send_msg(DVS_MSG_STOPPED, 0, 0, 0, info.si_status, -1);
				continue;
			}
			/* exited, killed or dumped */
			if (req->kill_session)
				kill_session(req->host_proc_fd, cmd_pid);
			while (waitid(P_PIDFD, (id_t)cmd_pidfd, &info, WEXITED) < 0 && errno == EINTR)
				;
			send_msg(DVS_MSG_EXITED, 0, info.si_code, 0, info.si_status, -1);
			_exit(0);
		}
	}
	/* detached (dvs is gone or asked to end): nothing of the session may stay */
	dvs_pidfd_send_signal(cmd_pidfd, SIGKILL, 0);
	kill_session(req->host_proc_fd, cmd_pid);
	while (waitid(P_PIDFD, (id_t)cmd_pidfd, &info, WEXITED) < 0 && errno == EINTR)
		;
	_exit(0);
}

/* ---- the keeper ------------------------------------------------------------------------ */

static __attribute__((noreturn)) void keeper_main(const struct dvs_attach *req, pid_t parent)
{
	g_report_fd = req->report_fd;
	/* dvs dying before the command runs takes the keeper (and the namespace) with it */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != parent)
		_exit(127);
	/* SIGCHLD and SIGTERM are read from a signalfd later; block them before any child
	 * exists. Terminal signals are the command's business: the keeper shares dvs's
	 * process group, and a hang-up of dvs's terminal must not kill it before it has
	 * cleaned up (the command resets every disposition before execve). */
	sigset_t handled;
	sigemptyset(&handled);
	sigaddset(&handled, SIGCHLD);
	sigaddset(&handled, SIGTERM);
	sigprocmask(SIG_BLOCK, &handled, NULL);
	struct sigaction ign;
	memset(&ign, 0, sizeof(ign));
	ign.sa_handler = SIG_IGN;
	sigaction(SIGHUP, &ign, NULL);
	sigaction(SIGINT, &ign, NULL);
	sigaction(SIGQUIT, &ign, NULL);
	sigaction(SIGPIPE, &ign, NULL);

	for (int i = 0; i < req->n_cgroup_fds; i++)
		if (write(req->cgroup_fds[i], "0", 1) != 1)
			warn(DVS_ATTACH_STEP_CGROUP, i, errno);

	must(dvs_setns(req->mnt_ns_fd, CLONE_NEWNS), DVS_ATTACH_STEP_SETNS_MNT, 0);
	if (req->mode == DVS_ATTACH_MODE_ATTACH)
		build_attach_view(req);
	else
		enter_exec_root(req);
	if (req->cwd && chdir(req->cwd) < 0) {
		warn(DVS_ATTACH_STEP_CWD, 0, errno);
		if (chdir("/") < 0)
			fail(DVS_ATTACH_STEP_CWD, 1, errno);
	}

	for (int i = 0; i < req->n_ns; i++)
		must(dvs_setns(req->ns_fds[i], req->ns_types[i]), DVS_ATTACH_STEP_SETNS, i);

	int master = -1, slave = -1;
	if (req->use_pty) {
		master = open_container_pty(req, &slave);
		if (master < 0) {
			if (req->fallback_pty_slave < 0)
				fail(DVS_ATTACH_STEP_PTY, 0, -master);
			warn(DVS_ATTACH_STEP_PTY, 0, -master);
			slave = req->fallback_pty_slave;
		}
	}

	int exec_pipe[2];
	sys_ok(pipe2(exec_pipe, O_CLOEXEC), DVS_ATTACH_STEP_FORK, 0);

	/* from here on the keeper outlives dvs long enough to clean up (see supervise) */
	prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0);

	int life[2];
	sys_ok(pipe2(life, O_CLOEXEC | O_NONBLOCK), DVS_ATTACH_STEP_FORK, 2);

	int cmd_pidfd = -1;
	struct clone_args args;
	memset(&args, 0, sizeof(args));
	args.flags = CLONE_PIDFD;
	args.pidfd = (uint64_t)(uintptr_t)&cmd_pidfd;
	args.exit_signal = SIGCHLD;
	long pid = syscall(__NR_clone3, &args, sizeof(args));
	if (pid < 0)
		fail(DVS_ATTACH_STEP_FORK, 1, errno);
	if (pid == 0) {
		/* the interpreter ignores SIGPIPE and SIGXFSZ; ignored signals survive execve */
		struct sigaction dfl;
		memset(&dfl, 0, sizeof(dfl));
		dfl.sa_handler = SIG_DFL;
		for (int sig = 1; sig < NSIG; sig++)
			if (sig != SIGKILL && sig != SIGSTOP)
				sigaction(sig, &dfl, NULL);
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		close(exec_pipe[0]);
		g_exec_pipe = exec_pipe[1];
		close(life[1]);
		g_life_fd = life[0];
		if (master >= 0)
			close(master);
		command_main(req, slave);
	}
	close(exec_pipe[1]);
	close(life[0]);
	g_life_fd = life[1]; /* held until the keeper exits */
	if (slave >= 0)
		close(slave);
	if (req->use_pty)
		send_msg(DVS_MSG_PTY, 0, 0, 0, 0, master); /* master -1: use the fallback */
	if (master >= 0)
		close(master);

	char c;
	ssize_t n;
	do
		n = read(exec_pipe[0], &c, 1);
	while (n < 0 && errno == EINTR);
	close(exec_pipe[0]);
	if (n != 0) {
		/* the command reported its failure itself; reap it and stop */
		siginfo_t info;
		while (waitid(P_PIDFD, (id_t)cmd_pidfd, &info, WEXITED) < 0 && errno == EINTR)
			;
		_exit(127);
	}
	send_msg(DVS_MSG_STARTED, 0, 0, 0, pid, cmd_pidfd);
	supervise(req, (int)pid, cmd_pidfd);
}

int dvs_attach_start(struct dvs_attach *req)
{
	req->pid = -1;
	req->pidfd = -1;
	if (req->mode != DVS_ATTACH_MODE_ATTACH && req->mode != DVS_ATTACH_MODE_EXEC)
		return -EINVAL;
	if (req->n_cgroup_fds < 0 || req->n_cgroup_fds > DVS_ATTACH_MAX_CGROUPS ||
	    req->n_ns < 0 || req->n_ns > DVS_ATTACH_MAX_NS || req->n_overlays < 0 ||
	    req->n_overlays > DVS_ATTACH_MAX_OVERLAYS || req->n_groups < 0 ||
	    req->n_groups > DVS_ATTACH_MAX_GROUPS || req->n_filters < 0 ||
	    req->n_filters > DVS_ATTACH_MAX_FILTERS || !req->argv || !req->argv[0] ||
	    !req->envp || req->report_fd < 0 || req->mnt_ns_fd < 0 || req->root_fd < 0)
		return -EINVAL;
	if (req->mode == DVS_ATTACH_MODE_ATTACH && (req->tools_fd < 0 || !req->base_dir))
		return -EINVAL;
	for (int i = 0; i < req->n_filters; i++)
		if (req->filter_lens[i] == 0 || req->filter_lens[i] > BPF_MAXINSNS)
			return -EINVAL;

	pid_t parent = getpid();
	int pidfd = -1;
	struct clone_args args;
	memset(&args, 0, sizeof(args));
	args.flags = CLONE_PIDFD;
	args.pidfd = (uint64_t)(uintptr_t)&pidfd;
	args.exit_signal = SIGCHLD;
	long pid = syscall(__NR_clone3, &args, sizeof(args));
	if (pid < 0)
		return -errno;
	if (pid == 0)
		keeper_main(req, parent);
	req->pid = (int32_t)pid;
	req->pidfd = pidfd;
	return 0;
}

int dvs_attach_recv(int fd, struct dvs_attach_msg *msg, int32_t timeout_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int r;
	do
		r = poll(&pfd, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	if (r == 0)
		return -ETIMEDOUT;

	struct iovec iov = { msg, sizeof(*msg) };
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} control;
	struct msghdr mh;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = control.buf;
	mh.msg_controllen = sizeof(control.buf);
	ssize_t n;
	do
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	int got_fd = -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count; i++) {
			int f;
			memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (got_fd < 0)
				got_fd = f;
			else
				close(f);
		}
	}
	if (n == 0) {
		if (got_fd >= 0)
			close(got_fd);
		return 0;
	}
	if ((size_t)n != sizeof(*msg) || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
		if (got_fd >= 0)
			close(got_fd);
		return -EPROTO;
	}
	msg->fd = got_fd;
	return 1;
}

/* ---- copying a process's seccomp filters ----------------------------------------------- */

int dvs_seccomp_copy(int32_t pid, uint8_t *insns, uint32_t insns_cap, uint32_t *lens,
		     uint32_t *flags, uint32_t max_filters)
{
	if (ptrace(PTRACE_SEIZE, pid, 0, 0) < 0)
		return -errno;
	int err = 0, status, pending_sig = 0;
	if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0) {
		err = -errno;
		goto detach;
	}
	for (;;) {
		pid_t w = waitpid(pid, &status, __WALL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			err = -errno;
			goto detach;
		}
		if (WIFEXITED(status) || WIFSIGNALED(status))
			return -ESRCH;
		if (WIFSTOPPED(status)) {
			/* a signal-delivery-stop (no event bits) holds a signal we must hand back
			 * at detach; the interrupt's own stop is PTRACE_EVENT_STOP */
			if ((status >> 16) == 0)
				pending_sig = WSTOPSIG(status);
			break;
		}
	}

	/* filter_off 0 is the oldest filter (the kernel walks back from the newest
	 * count-1-off steps); count them first so the buffer checks happen up front */
	uint32_t count = 0;
	for (;;) {
		long n = ptrace(PTRACE_SECCOMP_GET_FILTER, pid, (void *)(uintptr_t)count, NULL);
		if (n < 0) {
			if (errno == ENOENT)
				break;
			err = -errno;
			goto detach;
		}
		if (++count > max_filters) {
			err = -E2BIG;
			goto detach;
		}
	}
	size_t used = 0;
	for (uint32_t i = 0; i < count; i++) {
		uint32_t index = i;
		long n = ptrace(PTRACE_SECCOMP_GET_FILTER, pid, (void *)(uintptr_t)index, NULL);
		if (n <= 0 || n > BPF_MAXINSNS) {
			err = n < 0 ? -errno : -EPROTO;
			goto detach;
		}
		size_t bytes = (size_t)n * sizeof(struct sock_filter);
		if (used + bytes > insns_cap) {
			err = -E2BIG;
			goto detach;
		}
		/* the buffer may be unaligned: fetch into an aligned copy first */
		struct sock_filter prog[BPF_MAXINSNS];
		long got = ptrace(PTRACE_SECCOMP_GET_FILTER, pid, (void *)(uintptr_t)index, prog);
		if (got != n) {
			err = got < 0 ? -errno : -EPROTO;
			goto detach;
		}
		memcpy(insns + used, prog, bytes);
		used += bytes;
		lens[i] = (uint32_t)n;
		struct __ptrace_seccomp_metadata md = { .filter_off = index, .flags = 0 };
		flags[i] = ptrace(PTRACE_SECCOMP_GET_METADATA, pid, (void *)sizeof(md), &md) < 0
				   ? 0
				   : (uint32_t)md.flags;
	}
	err = (int)count;
detach:
	ptrace(PTRACE_DETACH, pid, 0, (void *)(uintptr_t)pending_sig);
	return err;
}
