/*
 * sync.h -- shims for futex(2) and a seccomp deny-list filter.
 *
 * futex: FUTEX_WAIT sleeps only while *addr still equals the expected value (so a wake
 * between the check and the sleep is never lost); FUTEX_WAKE wakes up to n sleepers. The
 * private variants skip the cross-process hash. The thread-pool engine counts each call as
 * one syscall of its I/O threads.
 *
 * seccomp: with no_new_privs set, SECCOMP_SET_MODE_FILTER installs a classic-BPF program
 * on the calling thread (inherited by its children and by threads it creates later) that
 * sees every syscall number. dvs uses it to deny chosen syscalls with an errno, e.g. to
 * run the shield engine in a child where io_uring_setup fails with EPERM, as a host's
 * container runtime profile would make it.
 */
#ifndef DVS_SYS_SYNC_H
#define DVS_SYS_SYNC_H

#include <stdint.h>

/* cffi:begin */
/* Deny the listed syscall numbers (x86-64) with -errno_value for this thread and every
 * thread or process it creates afterwards. Irreversible. */
int dvs_seccomp_deny(const int32_t *syscall_nrs, uint32_t n, int32_t errno_value);
/* cffi:constants __NR_io_uring_setup __NR_io_uring_enter __NR_io_uring_register */
/* cffi:end */

int dvs_futex_wait(uint32_t *addr, uint32_t expected);
int dvs_futex_wake(uint32_t *addr, int n);

#endif
