/*
 * spawn.c -- start a program inside a prepared context (namespaces, cgroup, root, ids).
 *
 * Kernel semantics relied on:
 * - clone3(CLONE_PIDFD) returns a pidfd for the child atomically, so the caller can never
 *   signal or wait for a recycled pid; CLONE_INTO_CGROUP (5.7) places the child in the
 *   cgroup before it runs a single instruction.
 * - Between clone and execve only this C code runs, in a single-threaded child: setns(2)
 *   into a mount or user namespace fails in a multi-threaded process, and Python must not
 *   run in a forked child of a threaded interpreter. The child calls only async-signal-safe
 *   functions (no malloc, no stdio).
 * - A new user namespace starts without uid/gid maps; only a process outside it may write
 *   them, so the child blocks on a pipe until the parent has written /proc/PID/{uid_map,
 *   setgroups,gid_map}.
 * - setns(CLONE_NEWPID) affects only later children; the caller orders ns_fds so that the
 *   user namespace (if any) comes last, since joining it drops privileges over the others.
 * - The child reports a failure as {step, index, errno} on a close-on-exec pipe; EOF on
 *   that pipe means execve succeeded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compat.h"
#include "sys/sys.h"


extern char **environ;

struct child_failure {
	int32_t step;
	int32_t index;
	int32_t err;
};

static void write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		p += n;
		len -= (size_t)n;
	}
}

static __attribute__((noreturn)) void child_fail(int report_fd, int step, int index)
{
	struct child_failure f = { step, index, errno };
	write_all(report_fd, &f, sizeof(f));
	_exit(127);
}

static __attribute__((noreturn)) void child_main(const struct dvs_spawn *req, int report_fd,
						 int go_fd)
{
	if (req->pdeath_signal && prctl(PR_SET_PDEATHSIG, req->pdeath_signal) < 0)
		child_fail(report_fd, DVS_STEP_SYNC, 0);
	if (go_fd >= 0) {
		char go;
		ssize_t n;
		do
			n = read(go_fd, &go, 1);
		while (n < 0 && errno == EINTR);
		if (n != 1) {
			errno = ECANCELED; /* the parent gave up before writing the maps */
			child_fail(report_fd, DVS_STEP_MAPS, 0);
		}
		close(go_fd);
	}
	for (int i = 0; i < req->n_ns_fds; i++)
		if (setns(req->ns_fds[i], 0) < 0)
			child_fail(report_fd, DVS_STEP_SETNS, i);
	if (req->root && chroot(req->root) < 0)
		child_fail(report_fd, DVS_STEP_CHROOT, 0);
	/* dup2 the requested fds onto 0..2; move sources above 2 first so that one
	 * target does not clobber another's source. */
	int moved[3];
	for (int i = 0; i < 3; i++) {
		moved[i] = -1;
		if (req->stdio[i] >= 0 && (moved[i] = fcntl(req->stdio[i], F_DUPFD_CLOEXEC, 3)) < 0)
			child_fail(report_fd, DVS_STEP_STDIO, i);
	}
	for (int i = 0; i < 3; i++)
		if (moved[i] >= 0 && dup2(moved[i], i) < 0)
			child_fail(report_fd, DVS_STEP_STDIO, i);
	/* raw syscalls, not glibc's setgroups/setres[ug]id: those broadcast the change to every
	 * thread glibc believes exists (POSIX process-wide credentials), and after clone3 from a
	 * threaded parent those threads exist only in glibc's copied bookkeeping -- it would wait
	 * for them forever. The kernel's credentials are per thread, and we are the only one. */
	if (req->gid >= 0 && (syscall(SYS_setgroups, 0, NULL) < 0 ||
			      syscall(SYS_setresgid, req->gid, req->gid, req->gid) < 0))
		child_fail(report_fd, DVS_STEP_CREDS, 0);
	if (req->uid >= 0 && syscall(SYS_setresuid, req->uid, req->uid, req->uid) < 0)
		child_fail(report_fd, DVS_STEP_CREDS, 1);
	if (req->cwd && chdir(req->cwd) < 0)
		child_fail(report_fd, DVS_STEP_CHDIR, 0);
	if (!req->path) {
		close(report_fd); /* EOF tells the parent we are in place */
		for (;;)
			pause();
	}
	execve(req->path, req->argv, req->envp ? req->envp : environ);
	child_fail(report_fd, DVS_STEP_EXEC, 0);
}

static int write_file(int pid, const char *name, const char *content)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/%s", pid, name);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	size_t len = strlen(content);
	ssize_t n = write(fd, content, len);
	int err = n < 0 ? -errno : ((size_t)n == len ? 0 : -EIO);
	close(fd);
	return err;
}

static int write_maps(int pid, const struct dvs_spawn *req)
{
	int err = 0;
	if (req->uid_map)
		err = write_file(pid, "uid_map", req->uid_map);
	if (!err && req->gid_map) {
		/* an unprivileged mapper must deny setgroups first; a privileged one must not,
		 * or the child could not drop its groups (setgroups(0) when asked for a gid) */
		if (geteuid() != 0) {
			int deny = write_file(pid, "setgroups", "deny");
			if (deny && deny != -EPERM)
				return deny;
		}
		err = write_file(pid, "gid_map", req->gid_map);
	}
	return err;
}

int dvs_spawn(struct dvs_spawn *req)
{
	int report[2], go[2] = { -1, -1 };
	int pidfd = -1;
	int need_maps = (req->clone_flags & CLONE_NEWUSER) && (req->uid_map || req->gid_map);

	req->pid = -1;
	req->pidfd = -1;
	req->failed_step = DVS_STEP_NONE;
	req->failed_index = 0;
	if (req->n_ns_fds < 0 || (req->n_ns_fds && !req->ns_fds))
		return -EINVAL;
	if (pipe2(report, O_CLOEXEC) < 0)
		return -errno;
	if (need_maps && pipe2(go, O_CLOEXEC) < 0) {
		int err = -errno;
		close(report[0]);
		close(report[1]);
		return err;
	}

	struct clone_args args;
	memset(&args, 0, sizeof(args));
	args.flags = CLONE_PIDFD | req->clone_flags;
	args.pidfd = (uint64_t)(uintptr_t)&pidfd;
	args.exit_signal = SIGCHLD;
	if (req->cgroup_fd >= 0) {
		args.flags |= CLONE_INTO_CGROUP;
		args.cgroup = (uint64_t)req->cgroup_fd;
	}
	long pid = syscall(__NR_clone3, &args, sizeof(args));
	if (pid == 0) {
		close(report[0]);
		if (go[1] >= 0)
			close(go[1]);
		child_main(req, report[1], go[0]);
	}
	int err = pid < 0 ? -errno : 0;
	close(report[1]);
	if (go[0] >= 0)
		close(go[0]);
	if (err) {
		req->failed_step = DVS_STEP_CLONE;
		goto out_close;
	}

	if (need_maps) {
		err = write_maps((int)pid, req);
		if (!err && write(go[1], "g", 1) != 1)
			err = -errno;
		if (err)
			req->failed_step = DVS_STEP_MAPS;
	}
	if (go[1] >= 0) {
		close(go[1]);
		go[1] = -1;
	}
	if (!err) {
		struct child_failure f;
		ssize_t n;
		do
			n = read(report[0], &f, sizeof(f));
		while (n < 0 && errno == EINTR);
		if (n == sizeof(f)) {
			req->failed_step = f.step;
			req->failed_index = f.index;
			err = f.err ? -f.err : -EIO;
		} else if (n != 0) {
			req->failed_step = DVS_STEP_SYNC;
			err = n < 0 ? -errno : -EIO;
		}
	}
	if (err) {
		/* reap the child that failed (or that we gave up on) so no zombie remains */
		syscall(__NR_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
		siginfo_t info;
		while (waitid(P_PIDFD, (id_t)pidfd, &info, WEXITED) < 0 && errno == EINTR)
			;
		close(pidfd);
		goto out_close;
	}
	req->pid = (int32_t)pid;
	req->pidfd = pidfd;
out_close:
	close(report[0]);
	if (go[1] >= 0)
		close(go[1]);
	return err;
}
