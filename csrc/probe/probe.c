/*
 * probe.c -- FUSE INIT and io_uring opcode probes (see probe.h).
 *
 * FUSE: mount(2) of a "fuse" filesystem with fd=N returns at once; the kernel then queues a
 * FUSE_INIT request on the device whose fuse_init_in carries the kernel's protocol version
 * and the capability flags it offers (flags, and flags2 for bits 32..63 when FUSE_INIT_EXT
 * is set). Answering INIT properly lets the unmount proceed without an aborted connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <unistd.h>

#include "compat.h"
#include "probe/probe.h"

/* After a successful INIT that granted FUSE_PASSTHROUGH, register backing_file as a
 * backing file (the step a passthrough server does per open) and release it again. */
static int32_t try_backing_open(int fuse_fd, const char *backing_file)
{
	int file = open(backing_file, O_RDONLY | O_CLOEXEC);
	if (file < 0)
		return -errno;
	struct dvs_fuse_backing_map map = { .fd = file };
	int id = ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, &map);
	int32_t result = id < 0 ? -errno : id;
	if (id >= 0) {
		uint32_t backing_id = (uint32_t)id;
		ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, &backing_id);
	}
	close(file);
	return result;
}

int dvs_probe_fuse_init(const char *mountpoint, const char *backing_file,
			struct dvs_fuse_init_info *out)
{
	/* FUSE_MIN_READ_BUFFER: the kernel refuses reads into smaller buffers */
	static __thread uint8_t buf[8192 + 4096];
	char opts[128];
	int err = 0;

	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0", fd);
	if (mount("dvs-probe", mountpoint, "fuse.dvs-probe", MS_NOSUID | MS_NODEV, opts) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	ssize_t n = read(fd, buf, sizeof(buf));
	const struct fuse_in_header *in = (const void *)buf;
	if (n < 0) {
		err = -errno;
	} else if ((size_t)n < sizeof(*in) + 4 * sizeof(uint32_t) || in->opcode != FUSE_INIT ||
		   in->len != (uint32_t)n) {
		err = -EPROTO;
	} else {
		/* fuse_init_in: major, minor, max_readahead, flags, then (7.36+) flags2 */
		const uint32_t *w = (const uint32_t *)(in + 1);
		size_t words = ((size_t)n - sizeof(*in)) / sizeof(uint32_t);
		out->major = w[0];
		out->minor = w[1];
		out->max_readahead = w[2];
		out->flags = w[3];
		if (words >= 5 && (w[3] & FUSE_INIT_EXT))
			out->flags |= (uint64_t)w[4] << 32;

		struct {
			struct fuse_out_header hdr;
			struct fuse_init_out init;
		} reply;
		memset(&reply, 0, sizeof(reply));
		reply.hdr.len = sizeof(reply);
		reply.hdr.unique = in->unique;
		reply.init.major = FUSE_KERNEL_VERSION;
		reply.init.minor = FUSE_KERNEL_MINOR_VERSION;
		reply.init.max_readahead = out->max_readahead;
		reply.init.max_write = 4096;
		reply.init.max_background = 1;
		reply.init.congestion_threshold = 1;
		int want_passthrough = backing_file && (out->flags & FUSE_PASSTHROUGH);
		if (want_passthrough) {
			reply.init.flags = FUSE_INIT_EXT;
			reply.init.flags2 = (uint32_t)(FUSE_PASSTHROUGH >> 32);
			reply.init.unused[0] = 1; /* max_stack_depth (7.40): backing fs depth */
		}
		out->passthrough_result = -EOPNOTSUPP;
		if (write(fd, &reply, sizeof(reply)) != (ssize_t)sizeof(reply))
			err = -errno;
		else if (want_passthrough)
			out->passthrough_result = try_backing_open(fd, backing_file);
	}
	if (umount2(mountpoint, MNT_DETACH) < 0 && !err)
		err = -errno;
	close(fd);
	return err;
}

int dvs_probe_uring(uint8_t *supported, uint32_t n_ops, uint32_t *last_op)
{
	struct io_uring ring;
	int ret = io_uring_queue_init(2, &ring, 0);
	if (ret < 0)
		return ret;
	struct io_uring_probe *probe = io_uring_get_probe_ring(&ring);
	if (!probe) {
		io_uring_queue_exit(&ring);
		return -EOPNOTSUPP;
	}
	*last_op = probe->last_op;
	for (uint32_t op = 0; op < n_ops; op++)
		supported[op] = op <= probe->last_op && io_uring_opcode_supported(probe, (int)op);
	io_uring_free_probe(probe);
	io_uring_queue_exit(&ring);
	return 0;
}
