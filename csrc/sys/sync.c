/*
 * sync.c -- futex and seccomp shims (see sync.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys/sync.h"

int dvs_futex_wait(uint32_t *addr, uint32_t expected)
{
	long ret = syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
	return ret < 0 ? -errno : 0;
}

int dvs_futex_wake(uint32_t *addr, int n)
{
	long ret = syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
	return ret < 0 ? -errno : (int)ret;
}

int dvs_seccomp_deny(const int32_t *nrs, uint32_t n, int32_t errno_value)
{
	if (n == 0 || n > 200 || errno_value <= 0 || errno_value > 4095)
		return -EINVAL;
	/* check the architecture, load the number, one compare per denied call, allow */
	uint32_t len = 4 + 2 * n + 1;
	struct sock_filter *prog = calloc(len, sizeof(*prog));
	if (!prog)
		return -ENOMEM;
	uint32_t i = 0;
	prog[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
						 offsetof(struct seccomp_data, arch));
	prog[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
	prog[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
	prog[i++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
						 offsetof(struct seccomp_data, nr));
	for (uint32_t k = 0; k < n; k++) {
		prog[i++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)nrs[k],
							 0, 1);
		prog[i++] = (struct sock_filter)BPF_STMT(
			BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((uint32_t)errno_value & SECCOMP_RET_DATA));
	}
	prog[i++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	struct sock_fprog fprog = { .len = (unsigned short)i, .filter = prog };
	int ret = 0;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) < 0)
		ret = -errno;
	free(prog);
	return ret;
}
