/*
 * probe.h -- kernel feature probes that need C: the FUSE INIT handshake (the only way to
 * learn the kernel's FUSE protocol minor and its offered init flags) and the io_uring
 * opcode probe (IORING_REGISTER_PROBE through liburing).
 */
#ifndef DVS_PROBE_H
#define DVS_PROBE_H

#include <stdint.h>

/* cffi:begin */
struct dvs_fuse_init_info {
	uint32_t major;
	uint32_t minor;
	uint32_t max_readahead;
	uint64_t flags; /* init_in.flags | (uint64_t)init_in.flags2 << 32 */
	int32_t passthrough_result; /* FUSE_DEV_IOC_BACKING_OPEN on backing_file: id or -errno */
};
/* Mount a throw-away FUSE filesystem on mountpoint (an empty directory), read the
 * kernel's FUSE_INIT, answer it (asking for passthrough when offered), and when
 * backing_file is given try to register it as a passthrough backing file; unmount.
 * Needs CAP_SYS_ADMIN. */
int dvs_probe_fuse_init(const char *mountpoint, const char *backing_file,
			struct dvs_fuse_init_info *out);

/* Fill supported[op] = 1 for each io_uring opcode < n_ops the kernel supports;
 * *last_op = the kernel's last opcode. -errno when io_uring cannot be set up
 * (ENOSYS: not built; EPERM: io_uring_disabled or seccomp). */
int dvs_probe_uring(uint8_t *supported, uint32_t n_ops, uint32_t *last_op);
/* cffi:end */

#endif
