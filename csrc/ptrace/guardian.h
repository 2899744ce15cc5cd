/*
 * guardian.h -- the entry point of the guardian child (internal to csrc/ptrace/).
 * client.c forks and calls dvs_hv_guardian_main() in the child, which never returns.
 */
#ifndef DVS_PTRACE_GUARDIAN_H
#define DVS_PTRACE_GUARDIAN_H

#include <stdint.h>

struct dvs_hv_guardian_args {
	int32_t pid;
	int control_fd;
	int mmio_fd;
	int log_fd;
	uint64_t syscall_insn;
	uint32_t scratch_size;
	uint32_t attach_timeout_ms;
	uint32_t flags;
	uint8_t *shared_bank;
	uint32_t shared_bank_size;
};

void dvs_hv_guardian_main(const struct dvs_hv_guardian_args *args) __attribute__((noreturn));

#endif
