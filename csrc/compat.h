/*
 * compat.h -- the one place for kernel constants newer than the build host's headers.
 *
 * dvs builds on Debian 12 (linux-libc-dev 6.1, glibc 2.36) and runs on much newer kernels
 * (6.18 here). Anything the 6.1 UAPI lacks -- FUSE passthrough, FUSE-over-io_uring, newer
 * io_uring opcodes, newer syscalls -- is defined here, guarded so a newer header wins.
 * Values are the kernel's ABI: they never change once released.
 */
#ifndef DVS_COMPAT_H
#define DVS_COMPAT_H

#include <stdint.h>
#include <sys/syscall.h>
#include <linux/types.h>
#include <linux/ioctl.h>

/* ---- syscall numbers (x86-64) ---- */
#ifndef __NR_open_tree
#define __NR_open_tree 428
#endif
#ifndef __NR_move_mount
#define __NR_move_mount 429
#endif
#ifndef __NR_fsopen
#define __NR_fsopen 430
#endif
#ifndef __NR_fsconfig
#define __NR_fsconfig 431
#endif
#ifndef __NR_fsmount
#define __NR_fsmount 432
#endif
#ifndef __NR_fspick
#define __NR_fspick 433
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef __NR_openat2
#define __NR_openat2 437
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
#ifndef __NR_mount_setattr
#define __NR_mount_setattr 442
#endif
#ifndef __NR_statmount
#define __NR_statmount 457 /* 6.8 */
#endif
#ifndef __NR_listmount
#define __NR_listmount 458 /* 6.8 */
#endif
#ifndef __NR_open_tree_attr
#define __NR_open_tree_attr 467 /* 6.15 */
#endif

/* ---- userfaultfd (5.11) ---- */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* ---- namespaces ---- */
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080 /* 5.6 */
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL /* 5.7 */
#endif

/* ---- FUSE protocol (Debian 12 headers stop at 7.38) ---- */
#define DVS_FUSE_MINOR_SUPPORTED 45
/* FUSE_INIT flags: bits 32..63 travel in init_in/out.flags2 (FUSE_INIT_EXT). */
#ifndef FUSE_INIT_EXT
#define FUSE_INIT_EXT (1ULL << 30)
#endif
#ifndef FUSE_SECURITY_CTX
#define FUSE_SECURITY_CTX (1ULL << 32)
#endif
#ifndef FUSE_HAS_INODE_DAX
#define FUSE_HAS_INODE_DAX (1ULL << 33)
#endif
#ifndef FUSE_CREATE_SUPP_GROUP
#define FUSE_CREATE_SUPP_GROUP (1ULL << 34)
#endif
#ifndef FUSE_HAS_EXPIRE_ONLY
#define FUSE_HAS_EXPIRE_ONLY (1ULL << 35)
#endif
#ifndef FUSE_DIRECT_IO_ALLOW_MMAP
#define FUSE_DIRECT_IO_ALLOW_MMAP (1ULL << 36) /* 7.39 */
#endif
#ifndef FUSE_PASSTHROUGH
#define FUSE_PASSTHROUGH (1ULL << 37) /* 7.40, Linux 6.9 */
#endif
#ifndef FUSE_NO_EXPORT_SUPPORT
#define FUSE_NO_EXPORT_SUPPORT (1ULL << 38)
#endif
#ifndef FUSE_HAS_RESEND
#define FUSE_HAS_RESEND (1ULL << 39)
#endif
#ifndef FUSE_ALLOW_IDMAP
#define FUSE_ALLOW_IDMAP (1ULL << 40) /* 7.40, Linux 6.12 */
#endif
#ifndef FUSE_OVER_IO_URING
#define FUSE_OVER_IO_URING (1ULL << 41) /* 7.42, Linux 6.14 */
#endif
#ifndef FUSE_REQUEST_TIMEOUT
#define FUSE_REQUEST_TIMEOUT (1ULL << 42)
#endif
#ifndef FOPEN_PASSTHROUGH
#define FOPEN_PASSTHROUGH (1 << 7)
#endif
#ifndef FUSE_DEV_IOC_MAGIC
#define FUSE_DEV_IOC_MAGIC 229
#endif
struct dvs_fuse_backing_map { /* struct fuse_backing_map, 7.40 */
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
#ifndef FUSE_DEV_IOC_BACKING_OPEN
#define FUSE_DEV_IOC_BACKING_OPEN _IOW(FUSE_DEV_IOC_MAGIC, 1, struct dvs_fuse_backing_map)
#endif
#ifndef FUSE_DEV_IOC_BACKING_CLOSE
#define FUSE_DEV_IOC_BACKING_CLOSE _IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t)
#endif

/* FUSE opcodes and structures added after 7.38 (include/uapi/linux/fuse.h of Linux 6.18). */
#define DVS_FUSE_STATX 52		 /* 7.39 */
#define DVS_FUSE_COPY_FILE_RANGE_64 53 /* 7.45 */
struct dvs_fuse_sx_time {
	int64_t tv_sec;
	uint32_t tv_nsec;
	int32_t reserved;
};
struct dvs_fuse_statx { /* struct fuse_statx: bit-compatible with struct statx */
	uint32_t mask;
	uint32_t blksize;
	uint64_t attributes;
	uint32_t nlink;
	uint32_t uid;
	uint32_t gid;
	uint16_t mode;
	uint16_t spare0[1];
	uint64_t ino;
	uint64_t size;
	uint64_t blocks;
	uint64_t attributes_mask;
	struct dvs_fuse_sx_time atime, btime, ctime, mtime;
	uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
	uint64_t spare2[14];
};
struct dvs_fuse_statx_in {
	uint32_t getattr_flags;
	uint32_t reserved;
	uint64_t fh;
	uint32_t sx_flags;
	uint32_t sx_mask;
};
struct dvs_fuse_statx_out {
	uint64_t attr_valid;
	uint32_t attr_valid_nsec;
	uint32_t flags;
	uint64_t spare[2];
	struct dvs_fuse_statx stat;
};
struct dvs_fuse_copy_file_range_out { /* reply to FUSE_COPY_FILE_RANGE_64 */
	uint64_t bytes_copied;
};
/* fuse_init_out as of 7.43: unused[0] became max_stack_depth (7.40), then request_timeout */
struct dvs_fuse_init_out {
	uint32_t major;
	uint32_t minor;
	uint32_t max_readahead;
	uint32_t flags;
	uint16_t max_background;
	uint16_t congestion_threshold;
	uint32_t max_write;
	uint32_t time_gran;
	uint16_t max_pages;
	uint16_t map_alignment;
	uint32_t flags2;
	uint32_t max_stack_depth;
	uint16_t request_timeout;
	uint16_t unused[11];
};
/* fuse_open_out as of 7.40: the padding became backing_id */
struct dvs_fuse_open_out {
	uint64_t fh;
	uint32_t open_flags;
	int32_t backing_id;
};
/* FUSE over io_uring (7.42, Linux 6.14): requests and replies travel through ring entries
 * registered with IORING_OP_URING_CMD on /dev/fuse (SQE128; the command sits in the SQE's
 * 80-byte cmd area). Each entry is two user buffers: a header (below) and a payload. */
#ifndef FUSE_URING_IN_OUT_HEADER_SZ
#define FUSE_URING_IN_OUT_HEADER_SZ 128
#define FUSE_URING_OP_IN_OUT_SZ 128
#endif
#define DVS_FUSE_IO_URING_CMD_REGISTER 1	 /* register an entry, then wait for a request */
#define DVS_FUSE_IO_URING_CMD_COMMIT_AND_FETCH 2 /* reply to the entry's request, wait again */
struct dvs_fuse_uring_ent_in_out { /* struct fuse_uring_ent_in_out */
	uint64_t flags;
	uint64_t commit_id; /* the request's unique, echoed in the commit command */
	uint32_t payload_sz; /* bytes valid in the payload buffer, either direction */
	uint32_t padding;
	uint64_t reserved;
};
struct dvs_fuse_uring_req_header { /* struct fuse_uring_req_header: iov[0] of REGISTER */
	char in_out[FUSE_URING_IN_OUT_HEADER_SZ]; /* fuse_in_header / fuse_out_header */
	char op_in[FUSE_URING_OP_IN_OUT_SZ];	   /* the opcode's fixed argument (in_args[0]) */
	struct dvs_fuse_uring_ent_in_out ring_ent_in_out;
};
struct dvs_fuse_uring_cmd_req { /* struct fuse_uring_cmd_req, in sqe->cmd */
	uint64_t flags;
	uint64_t commit_id;
	uint16_t qid;
	uint8_t padding[6];
};
#ifndef FUSE_MIN_READ_BUFFER
#define FUSE_MIN_READ_BUFFER 8192
#endif

#ifndef FILESYSTEM_MAX_STACK_DEPTH
#define FILESYSTEM_MAX_STACK_DEPTH 2
#endif

/* ---- syscalls newer than glibc 2.36 wraps ---- */
#ifndef __NR_fchmodat2
#define __NR_fchmodat2 452 /* 6.6 */
#endif

/* ---- io_uring (liburing 2.3 / 6.1 headers) ---- */
#ifndef IORING_SETUP_NO_SQARRAY
#define IORING_SETUP_NO_SQARRAY (1U << 16) /* 6.6 */
#endif

#endif /* DVS_COMPAT_H */
