/*
 * vhost_user.c -- vhost-user back-end for virtio-blk (see vhost_user.h).
 *
 * Protocol facts relied on (QEMU docs/interop/vhost-user.rst):
 *  - header {u32 request, u32 flags, u32 size}; flags bits 0-1 = version (1), bit 2 = reply,
 *    bit 3 = need_reply (answered with a u64 status when REPLY_ACK was negotiated);
 *  - SET_VRING_KICK/CALL/ERR carry u64: bits 0-7 queue index, bit 8 "no fd";
 *  - a ring starts when its kick fd arrives; with VHOST_USER_F_PROTOCOL_FEATURES negotiated
 *    it is also disabled until SET_VRING_ENABLE(1);
 *  - GET_VRING_BASE stops the ring and answers the next available index to resume from;
 *  - ring addresses in SET_VRING_ADDR are front-end virtual addresses ("user addresses");
 *    region userspace_addr maps them to guest-physical addresses;
 *  - regions are mmap()ed from their fd at mmap_offset (MAP_SHARED: the guest's own RAM).
 * SIGPIPE on the socket is avoided with MSG_NOSIGNAL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "virtio/vhost_user.h"

enum {
	VU_GET_FEATURES = 1,
	VU_SET_FEATURES = 2,
	VU_SET_OWNER = 3,
	VU_RESET_OWNER = 4,
	VU_SET_MEM_TABLE = 5,
	VU_SET_LOG_BASE = 6,
	VU_SET_LOG_FD = 7,
	VU_SET_VRING_NUM = 8,
	VU_SET_VRING_ADDR = 9,
	VU_SET_VRING_BASE = 10,
	VU_GET_VRING_BASE = 11,
	VU_SET_VRING_KICK = 12,
	VU_SET_VRING_CALL = 13,
	VU_SET_VRING_ERR = 14,
	VU_GET_PROTOCOL_FEATURES = 15,
	VU_SET_PROTOCOL_FEATURES = 16,
	VU_GET_QUEUE_NUM = 17,
	VU_SET_VRING_ENABLE = 18,
	VU_GET_CONFIG = 24,
	VU_SET_CONFIG = 25,
	VU_RESET_DEVICE = 34,
};

#define VU_VERSION 1u
#define VU_FLAG_REPLY (1u << 2)
#define VU_FLAG_NEED_REPLY (1u << 3)
#define VU_F_PROTOCOL_FEATURES 30
#define VU_PF_MQ 0
#define VU_PF_REPLY_ACK 3
#define VU_PF_CONFIG 9
#define VU_PF_RESET_DEVICE 13
#define VU_MAX_REGIONS 8
#define VU_MAX_FDS 8
#define VU_MAX_PAYLOAD 4096
#define VU_CONFIG_MAX 256
#define VU_HDR 12

#define TAG_CONN 1
#define TAG_STOP 2
#define TAG_BACKEND 3
#define TAG_KICK 16

struct vu_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t uaddr;   /* front-end virtual address */
	void *map;        /* our mapping (page-aligned start) */
	size_t map_len;
	uint64_t hva;     /* where gpa lives in our mapping */
};

struct vu_queue {
	uint32_t num;
	uint16_t base;             /* SET_VRING_BASE: next available index */
	int enabled;
	int started;
	int broken;
	int more;                  /* process again without waiting for a kick */
	int stalled;               /* the backend was full: process again after completions */
	int addr_set;
	int vq_valid;              /* vq was set up (its indices are meaningful) */
	uint64_t desc_uaddr, avail_uaddr, used_uaddr;
	int kick_fd, call_fd, err_fd;
	uint64_t pushed_seen;
	struct dvs_vq vq;
};

struct conn {
	int fd;
	int epfd;
	int stop_fd;
	uint32_t n_regions;
	struct vu_region regions[VU_MAX_REGIONS];
	struct dvs_guest_mem mem;
	struct vu_queue q[DVS_VU_MAX_QUEUES];
};

struct dvs_vu {
	struct dvs_blk *blk;
	uint32_t num_queues;
	uint64_t features;          /* offered */
	uint64_t protocol_features; /* offered */
	uint64_t acked_features;
	uint64_t acked_protocol;
	uint64_t poll_ns;           /* busy-poll window after a queue runs empty; 0: off */
	struct dvs_vu_stats stats;
};

static const char *const vu_error_names[DVS_VU_ERR_MAX] = {
	[DVS_VU_ERR_NONE] = "none",
	[DVS_VU_ERR_SHORT_MESSAGE] = "connection closed inside a message",
	[DVS_VU_ERR_VERSION] = "message flags do not carry protocol version 1",
	[DVS_VU_ERR_PAYLOAD_SIZE] = "payload size wrong for the request",
	[DVS_VU_ERR_QUEUE_INDEX] = "queue index beyond the device's queues",
	[DVS_VU_ERR_FD_COUNT] = "wrong number of file descriptors for the request",
	[DVS_VU_ERR_MEM_TABLE] = "invalid memory region table",
	[DVS_VU_ERR_RING_ADDRESS] = "ring address lies in no shared memory region",
	[DVS_VU_ERR_FEATURES] = "features set that the back-end did not offer",
	[DVS_VU_ERR_CONFIG_RANGE] = "config space access out of range",
	[DVS_VU_ERR_VRING_BASE] = "split-ring base above 65535",
};

const char *dvs_vu_error_name(uint32_t err)
{
	return err < DVS_VU_ERR_MAX ? vu_error_names[err] : "unknown error";
}

int dvs_vu_blk_create(struct dvs_blk *blk, struct dvs_vu **out)
{
	struct dvs_vu *vu = calloc(1, sizeof(*vu));
	if (!vu)
		return -ENOMEM;
	vu->blk = blk;
	uint8_t cfg[DVS_VIRTIO_BLK_CONFIG_BYTES];
	dvs_blk_config_space(blk, cfg, sizeof(cfg));
	vu->num_queues = (uint32_t)cfg[34] | ((uint32_t)cfg[35] << 8);
	vu->features = dvs_blk_features(blk) | (1ull << VU_F_PROTOCOL_FEATURES);
	vu->protocol_features = (1ull << VU_PF_MQ) | (1ull << VU_PF_REPLY_ACK) |
				(1ull << VU_PF_CONFIG) | (1ull << VU_PF_RESET_DEVICE);
	*out = vu;
	return 0;
}

int dvs_vu_set_poll(struct dvs_vu *vu, uint64_t poll_ns)
{
	vu->poll_ns = poll_ns;
	return 0;
}

void dvs_vu_destroy(struct dvs_vu *vu)
{
	free(vu);
}

int dvs_vu_get_stats(const struct dvs_vu *vu, struct dvs_vu_stats *stats)
{
	/* Counters are written by the serving thread; a concurrent copy is a monitoring snapshot. */
	memcpy(stats, &vu->stats, sizeof(*stats));
	return 0;
}

/* --- socket I/O ------------------------------------------------------------------------- */

static void close_fds(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* Read one message. Returns 1 with *n_fds fds received, 0 on orderly EOF before a header,
 * -EPROTO (protocol error set) or -errno. */
static int recv_msg(struct dvs_vu *vu, int fd, uint32_t hdr[3], uint8_t *payload, int *fds,
		    int *n_fds)
{
	struct iovec iov = { hdr, VU_HDR };
	union {
		char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			      .msg_controllen = sizeof(control.buf) };
	*n_fds = 0;
	ssize_t r;
	do
		r = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < n; i++) {
				int got;
				memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				if (*n_fds < VU_MAX_FDS)
					fds[(*n_fds)++] = got;
				else
					close(got);
			}
		}
	}
	if (r == 0)
		return 0;
	if (msg.msg_flags & MSG_CTRUNC) {
		close_fds(fds, *n_fds);
		vu->stats.protocol_error = DVS_VU_ERR_FD_COUNT;
		return -EPROTO;
	}
	size_t got = (size_t)r;
	while (got < VU_HDR) { /* a stream socket may split the header */
		r = recv(fd, (char *)hdr + got, VU_HDR - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			close_fds(fds, *n_fds);
			vu->stats.protocol_error = DVS_VU_ERR_SHORT_MESSAGE;
			return r < 0 ? -errno : -EPROTO;
		}
		got += (size_t)r;
	}
	if ((hdr[1] & 3u) != VU_VERSION) {
		close_fds(fds, *n_fds);
		vu->stats.protocol_error = DVS_VU_ERR_VERSION;
		return -EPROTO;
	}
	if (hdr[2] > VU_MAX_PAYLOAD) {
		close_fds(fds, *n_fds);
		vu->stats.protocol_error = DVS_VU_ERR_PAYLOAD_SIZE;
		return -EPROTO;
	}
	got = 0;
	while (got < hdr[2]) {
		r = recv(fd, payload + got, hdr[2] - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			close_fds(fds, *n_fds);
			vu->stats.protocol_error = DVS_VU_ERR_SHORT_MESSAGE;
			return r < 0 ? -errno : -EPROTO;
		}
		got += (size_t)r;
	}
	return 1;
}

static int send_reply(int fd, uint32_t request, const void *payload, uint32_t size)
{
	uint8_t buf[VU_HDR + VU_HDR + VU_CONFIG_MAX];
	uint32_t hdr[3] = { request, VU_VERSION | VU_FLAG_REPLY, size };
	if (size > sizeof(buf) - VU_HDR)
		return -EINVAL;
	memcpy(buf, hdr, VU_HDR);
	memcpy(buf + VU_HDR, payload, size);
	size_t total = VU_HDR + size, sent = 0;
	while (sent < total) {
		ssize_t w = send(fd, buf + sent, total - sent, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		sent += (size_t)w;
	}
	return 0;
}

static int reply_u64(int fd, uint32_t request, uint64_t value)
{
	return send_reply(fd, request, &value, sizeof(value));
}

/* --- memory table ----------------------------------------------------------------------- */

static void unmap_regions(struct vu_region *regions, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (regions[i].map)
			munmap(regions[i].map, regions[i].map_len);
}

static int uaddr_to_gpa(const struct conn *c, uint64_t uaddr, uint64_t *gpa)
{
	for (uint32_t i = 0; i < c->n_regions; i++) {
		const struct vu_region *r = &c->regions[i];
		if (uaddr >= r->uaddr && uaddr - r->uaddr < r->size) {
			*gpa = r->gpa + (uaddr - r->uaddr);
			return 0;
		}
	}
	return -EFAULT;
}

static int cmp_region(const void *a, const void *b)
{
	const struct vu_region *x = a, *y = b;
	return x->gpa < y->gpa ? -1 : x->gpa > y->gpa;
}

static int start_queue(struct dvs_vu *vu, struct conn *c, uint32_t index);
static void drain_queue(struct dvs_vu *vu, struct vu_queue *q);

static int set_mem_table(struct dvs_vu *vu, struct conn *c, const uint8_t *p, uint32_t size,
			 int *fds, int n_fds)
{
	uint32_t n;
	if (size < 8)
		goto bad_size;
	memcpy(&n, p, 4);
	if (n == 0 || n > VU_MAX_REGIONS || size < 8 + 32 * n)
		goto bad_size;
	if ((uint32_t)n_fds != n) {
		close_fds(fds, n_fds);
		vu->stats.protocol_error = DVS_VU_ERR_FD_COUNT;
		return -EPROTO;
	}
	struct vu_region fresh[VU_MAX_REGIONS];
	memset(fresh, 0, sizeof(fresh));
	long page = sysconf(_SC_PAGESIZE);
	int err = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t f[4]; /* guest_phys_addr, memory_size, userspace_addr, mmap_offset */
		memcpy(f, p + 8 + 32 * i, 32);
		struct vu_region *r = &fresh[i];
		r->gpa = f[0];
		r->size = f[1];
		r->uaddr = f[2];
		uint64_t off = f[3], aligned = off & ~(uint64_t)(page - 1);
		if (!err && (r->size == 0 || r->gpa + r->size < r->gpa ||
			     r->uaddr + r->size < r->uaddr || off + r->size < off ||
			     r->size > SIZE_MAX - (off - aligned)))
			err = -EINVAL;
		if (!err) {
			r->map_len = (size_t)(r->size + (off - aligned));
			void *m = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[i],
				       (off_t)aligned);
			if (m == MAP_FAILED)
				err = -errno;
			else {
				r->map = m;
				r->hva = (uintptr_t)m + (off - aligned);
			}
		}
		close(fds[i]);
	}
	qsort(fresh, n, sizeof(fresh[0]), cmp_region);
	struct dvs_guest_region table[VU_MAX_REGIONS];
	for (uint32_t i = 0; i < n; i++)
		table[i] = (struct dvs_guest_region){ fresh[i].gpa, fresh[i].size, fresh[i].hva };
	struct dvs_guest_mem mem;
	if (!err)
		err = dvs_guest_mem_init(&mem, 0, table, n); /* rejects overlap */
	if (err) {
		unmap_regions(fresh, n);
		vu->stats.protocol_error = DVS_VU_ERR_MEM_TABLE;
		return -EPROTO;
	}
	/* Swap in the new table, restart running queues on it, then drop the old mappings. */
	struct vu_region old[VU_MAX_REGIONS];
	uint32_t old_n = c->n_regions;
	memcpy(old, c->regions, sizeof(old));
	memcpy(c->regions, fresh, sizeof(fresh));
	c->n_regions = n;
	c->mem = mem;
	for (uint32_t i = 0; i < vu->num_queues; i++) {
		if (c->q[i].started) {
			drain_queue(vu, &c->q[i]);
			c->q[i].base = c->q[i].vq.last_avail_idx;
			c->q[i].started = 0;
			err = start_queue(vu, c, i);
			if (err == -EPROTO)
				break;
		}
	}
	unmap_regions(old, old_n);
	return err == -EPROTO ? err : 0;
bad_size:
	close_fds(fds, n_fds);
	vu->stats.protocol_error = DVS_VU_ERR_PAYLOAD_SIZE;
	return -EPROTO;
}

/* --- queues ------------------------------------------------------------------------------ */

static void reset_queue(struct conn *c, struct vu_queue *q)
{
	if (q->kick_fd >= 0) {
		epoll_ctl(c->epfd, EPOLL_CTL_DEL, q->kick_fd, NULL);
		close(q->kick_fd);
	}
	if (q->call_fd >= 0)
		close(q->call_fd);
	if (q->err_fd >= 0)
		close(q->err_fd);
	memset(q, 0, sizeof(*q));
	q->kick_fd = q->call_fd = q->err_fd = -1;
}

static void signal_fd(int fd)
{
	uint64_t one = 1;
	if (fd >= 0)
		(void)!write(fd, &one, sizeof(one));
}

/* Start a queue once it has a size, addresses, a kick fd and is enabled. Returns -EPROTO
 * if the front-end gave addresses outside the shared memory. */
static int start_queue(struct dvs_vu *vu, struct conn *c, uint32_t index)
{
	struct vu_queue *q = &c->q[index];
	if (q->started || q->broken || !q->enabled || q->kick_fd < 0 || !q->addr_set || !q->num ||
	    !c->n_regions)
		return 0;
	struct dvs_vq_config cfg = { 0 };
	if (uaddr_to_gpa(c, q->desc_uaddr, &cfg.desc_gpa) ||
	    uaddr_to_gpa(c, q->avail_uaddr, &cfg.avail_gpa) ||
	    uaddr_to_gpa(c, q->used_uaddr, &cfg.used_gpa)) {
		vu->stats.protocol_error = DVS_VU_ERR_RING_ADDRESS;
		return -EPROTO;
	}
	cfg.size = (uint16_t)q->num;
	if (q->num > DVS_VQ_MAX_SIZE)
		cfg.size = 0; /* reported below as the queue-size rule */
	cfg.last_avail_idx = q->base;
	cfg.used_idx = q->base; /* everything before base was completed and pushed */
	cfg.max_segs = dvs_blk_max_segs(vu->blk);
	cfg.features = vu->acked_features;
	int err = dvs_vq_init(&q->vq, &c->mem, &cfg);
	if (err == -EPROTO) {
		q->broken = 1;
		if (!vu->stats.broken_queue) {
			vu->stats.broken_queue = index + 1;
			vu->stats.queue_rule = q->vq.rule;
			vu->stats.queue_rule_detail = q->vq.rule_detail;
		}
		signal_fd(q->err_fd);
		return 0;
	}
	if (err)
		return err;
	q->started = 1;
	q->vq_valid = 1;
	q->more = 1; /* buffers may have been made available before the kick fd arrived */
	q->pushed_seen = q->vq.pushed;
	vu->stats.queues_started++;
	return 0;
}

/* Wait until every request of queue q has come back from the backend. */
static void drain_queue(struct dvs_vu *vu, struct vu_queue *q)
{
	/* poll(wait) returns 0 only when the backend has nothing in flight */
	while (q->vq_valid && q->vq.in_flight)
		if (dvs_blk_poll(vu->blk, 1) <= 0)
			break;
}

static void notify_if_needed(struct dvs_vu *vu, struct vu_queue *q, int notify)
{
	if (notify && q->call_fd >= 0) {
		signal_fd(q->call_fd);
		vu->stats.calls++;
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void after_completions(struct dvs_vu *vu, struct conn *c);

/* Serve the queue, then -- with a poll window -- keep serving it without kicks for as long
 * as the driver keeps adding within poll_ns of the last request: the driver skips the kick
 * (an exit to the hypervisor) for every request that arrives inside the window. */
static int process_polling(struct dvs_vu *vu, struct conn *c, struct vu_queue *q,
			   struct dvs_blk_result *res)
{
	int ret = dvs_blk_process_flags(vu->blk, &q->vq, &c->mem, DVS_BLK_KEEP_KICKS_OFF, res);
	vu->stats.requests += res->handled;
	q->pushed_seen = q->vq.pushed;
	notify_if_needed(vu, q, res->notify);
	if (ret < 0 || res->more || res->stalled)
		return ret;
	int async = dvs_blk_event_fd(vu->blk) >= 0;
	uint64_t last = now_ns();
	for (uint32_t spins = 1; now_ns() - last < vu->poll_ns; spins++) {
		if (async && dvs_blk_poll(vu->blk, 0) > 0)
			after_completions(vu, c);
		int pending = dvs_vq_pending(&q->vq, &c->mem);
		if (pending < 0)
			break;
		if (pending == 0) {
			/* a message, a kick of another queue or the stop fd ends the window; this
			 * queue's own kicks (sent before the driver saw kicks were off) are moot */
			if (spins % 64 == 0) {
				struct epoll_event ev;
				uint64_t count;
				(void)!read(q->kick_fd, &count, sizeof(count));
				if (epoll_wait(c->epfd, &ev, 1, 0) > 0)
					break;
			}
			__builtin_ia32_pause();
			continue;
		}
		ret = dvs_blk_process_flags(vu->blk, &q->vq, &c->mem, DVS_BLK_KEEP_KICKS_OFF, res);
		vu->stats.requests += res->handled;
		vu->stats.polled += res->handled;
		q->pushed_seen = q->vq.pushed;
		notify_if_needed(vu, q, res->notify);
		if (ret < 0 || res->more || res->stalled)
			return ret;
		last = now_ns();
	}
	/* re-arm kicks (and serve whatever raced with that) */
	ret = dvs_blk_process(vu->blk, &q->vq, &c->mem, res);
	vu->stats.requests += res->handled;
	q->pushed_seen = q->vq.pushed;
	notify_if_needed(vu, q, res->notify);
	return ret;
}

static void run_queue(struct dvs_vu *vu, struct conn *c, uint32_t index)
{
	struct vu_queue *q = &c->q[index];
	q->more = 0;
	if (!q->started || q->broken)
		return;
	struct dvs_blk_result res;
	int ret;
	if (vu->poll_ns) {
		ret = process_polling(vu, c, q, &res);
	} else {
		ret = dvs_blk_process(vu->blk, &q->vq, &c->mem, &res);
		vu->stats.requests += res.handled;
		q->pushed_seen = q->vq.pushed;
		notify_if_needed(vu, q, res.notify);
	}
	if (ret == -EPROTO) {
		q->broken = 1;
		if (!vu->stats.broken_queue) {
			vu->stats.broken_queue = index + 1;
			vu->stats.queue_rule = q->vq.rule;
			vu->stats.queue_rule_detail = q->vq.rule_detail;
		}
		signal_fd(q->err_fd); /* the vhost-user way of saying DEVICE_NEEDS_RESET */
		return;
	}
	q->more = res.more;
	q->stalled = res.stalled;
}

/* After asynchronous completions: interrupt queues that got used buffers, retry the ones
 * that stalled on a full backend (and only those: the others wait for their kick). */
static void after_completions(struct dvs_vu *vu, struct conn *c)
{
	for (uint32_t i = 0; i < vu->num_queues; i++) {
		struct vu_queue *q = &c->q[i];
		if (!q->started)
			continue;
		if (q->vq.pushed != q->pushed_seen) {
			q->pushed_seen = q->vq.pushed;
			notify_if_needed(vu, q, dvs_vq_should_notify(&q->vq, &c->mem) > 0);
		}
		if (q->stalled) {
			q->stalled = 0;
			q->more = 1;
		}
	}
}

/* --- message dispatch -------------------------------------------------------------------- */

static int bad_index(struct dvs_vu *vu, uint32_t index)
{
	if (index < vu->num_queues)
		return 0;
	vu->stats.protocol_error = DVS_VU_ERR_QUEUE_INDEX;
	return 1;
}

static int need_size(struct dvs_vu *vu, uint32_t size, uint32_t want)
{
	if (size >= want)
		return 0;
	vu->stats.protocol_error = DVS_VU_ERR_PAYLOAD_SIZE;
	return 1;
}

static int set_queue_fd(struct dvs_vu *vu, struct conn *c, uint32_t request, const uint8_t *p,
			uint32_t size, int *fds, int n_fds)
{
	uint64_t u;
	if (need_size(vu, size, 8)) {
		close_fds(fds, n_fds);
		return -EPROTO;
	}
	memcpy(&u, p, 8);
	uint32_t index = (uint32_t)(u & 0xff);
	int nofd = (u >> 8) & 1;
	if (bad_index(vu, index) || n_fds != (nofd ? 0 : 1)) {
		if (!vu->stats.protocol_error)
			vu->stats.protocol_error = DVS_VU_ERR_FD_COUNT;
		close_fds(fds, n_fds);
		return -EPROTO;
	}
	struct vu_queue *q = &c->q[index];
	int fd = nofd ? -1 : fds[0];
	int *slot = request == VU_SET_VRING_KICK ? &q->kick_fd
		    : request == VU_SET_VRING_CALL ? &q->call_fd
						   : &q->err_fd;
	if (*slot >= 0) {
		if (request == VU_SET_VRING_KICK)
			epoll_ctl(c->epfd, EPOLL_CTL_DEL, *slot, NULL);
		close(*slot);
	}
	*slot = fd;
	if (request == VU_SET_VRING_KICK) {
		if (fd < 0) {
			q->started = 0; /* polling mode is not offered: the ring stops */
			return 0;
		}
		/* non-blocking: the poll window drains stale kicks without waiting */
		int fl = fcntl(fd, F_GETFL);
		if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
			return -errno;
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TAG_KICK + index };
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev))
			return -errno;
		/* Without protocol features negotiated a ring is enabled from the start. */
		if (!(vu->acked_features & (1ull << VU_F_PROTOCOL_FEATURES)))
			q->enabled = 1;
		return start_queue(vu, c, index);
	}
	return 0;
}

/* A SET_*FEATURES payload: the front-end may only ack bits we offered. */
static int accept_bits(struct dvs_vu *vu, const uint8_t *p, uint32_t size, uint64_t offered,
		       uint64_t *acked)
{
	uint64_t bits;
	if (need_size(vu, size, 8))
		return -EPROTO;
	memcpy(&bits, p, 8);
	if (bits & ~offered) {
		vu->stats.protocol_error = DVS_VU_ERR_FEATURES;
		return -EPROTO;
	}
	*acked = bits;
	return 0;
}

static int handle(struct dvs_vu *vu, struct conn *c, const uint32_t hdr[3], const uint8_t *p,
		  int *fds, int n_fds)
{
	uint32_t request = hdr[0], size = hdr[2];
	int ack = (hdr[1] & VU_FLAG_NEED_REPLY) &&
		  (vu->acked_protocol & (1ull << VU_PF_REPLY_ACK));
	uint64_t status = 0;
	int err = 0;
	vu->stats.last_request = request;
	vu->stats.messages++;

	/* Only these requests carry descriptors; anything else sent with fds is closed. */
	if (request != VU_SET_MEM_TABLE && request != VU_SET_VRING_KICK &&
	    request != VU_SET_VRING_CALL && request != VU_SET_VRING_ERR) {
		close_fds(fds, n_fds);
		n_fds = 0;
	}
	switch (request) {
	case VU_GET_FEATURES:
		return reply_u64(c->fd, request, vu->features);
	case VU_SET_FEATURES:
		if (accept_bits(vu, p, size, vu->features, &vu->acked_features))
			return -EPROTO;
		vu->stats.features = vu->acked_features;
		break;
	case VU_GET_PROTOCOL_FEATURES:
		return reply_u64(c->fd, request, vu->protocol_features);
	case VU_SET_PROTOCOL_FEATURES:
		if (accept_bits(vu, p, size, vu->protocol_features, &vu->acked_protocol))
			return -EPROTO;
		vu->stats.protocol_features = vu->acked_protocol;
		break;
	case VU_GET_QUEUE_NUM:
		return reply_u64(c->fd, request, vu->num_queues);
	case VU_SET_OWNER:
		break;
	case VU_RESET_OWNER:
	case VU_RESET_DEVICE:
		for (uint32_t i = 0; i < vu->num_queues; i++) {
			drain_queue(vu, &c->q[i]);
			reset_queue(c, &c->q[i]);
		}
		vu->acked_features = 0;
		break;
	case VU_SET_MEM_TABLE:
		err = set_mem_table(vu, c, p, size, fds, n_fds);
		if (err)
			return err;
		break;
	case VU_SET_VRING_NUM:
	case VU_SET_VRING_BASE:
	case VU_SET_VRING_ENABLE: {
		uint32_t st[2];
		if (need_size(vu, size, 8))
			return -EPROTO;
		memcpy(st, p, 8);
		if (bad_index(vu, st[0]))
			return -EPROTO;
		struct vu_queue *q = &c->q[st[0]];
		if (request == VU_SET_VRING_NUM) {
			q->num = st[1];
		} else if (request == VU_SET_VRING_BASE) {
			if (st[1] > 0xffff) {
				vu->stats.protocol_error = DVS_VU_ERR_VRING_BASE;
				return -EPROTO;
			}
			q->base = (uint16_t)st[1];
		} else {
			q->enabled = st[1] != 0;
			if (q->enabled) {
				err = start_queue(vu, c, st[0]);
				if (err)
					return err;
			} else if (q->started) { /* stop; re-enabling resumes where it stopped */
				drain_queue(vu, q);
				q->base = q->vq.last_avail_idx;
				q->started = 0;
				q->more = 0;
			}
		}
		break;
	}
	case VU_SET_VRING_ADDR: {
		uint32_t idx;
		uint64_t a[4]; /* desc, used, avail, log */
		if (need_size(vu, size, 40))
			return -EPROTO;
		memcpy(&idx, p, 4);
		memcpy(a, p + 8, 32);
		if (bad_index(vu, idx))
			return -EPROTO;
		struct vu_queue *q = &c->q[idx];
		q->desc_uaddr = a[0];
		q->used_uaddr = a[1];
		q->avail_uaddr = a[2];
		q->addr_set = 1;
		err = start_queue(vu, c, idx);
		if (err)
			return err;
		break;
	}
	case VU_GET_VRING_BASE: {
		uint32_t st[2];
		if (need_size(vu, size, 8))
			return -EPROTO;
		memcpy(st, p, 8);
		if (bad_index(vu, st[0]))
			return -EPROTO;
		struct vu_queue *q = &c->q[st[0]];
		drain_queue(vu, q);
		uint16_t next = q->started && q->vq_valid ? q->vq.last_avail_idx : q->base;
		/* The ring stops; its fds are the front-end's to send again on restart. */
		reset_queue(c, q);
		uint32_t out[2] = { st[0], next };
		return send_reply(c->fd, request, out, sizeof(out));
	}
	case VU_SET_VRING_KICK:
	case VU_SET_VRING_CALL:
	case VU_SET_VRING_ERR:
		err = set_queue_fd(vu, c, request, p, size, fds, n_fds);
		if (err)
			return err;
		break;
	case VU_GET_CONFIG: {
		uint32_t off, len;
		uint8_t out[VU_HDR + VU_CONFIG_MAX];
		if (need_size(vu, size, 12))
			return -EPROTO;
		memcpy(&off, p, 4);
		memcpy(&len, p + 4, 4);
		if (len > VU_CONFIG_MAX || off > VU_CONFIG_MAX - len || size != 12 + len) {
			vu->stats.protocol_error = DVS_VU_ERR_CONFIG_RANGE;
			return -EPROTO;
		}
		uint8_t space[VU_CONFIG_MAX] = { 0 };
		dvs_blk_config_space(vu->blk, space, sizeof(space));
		memcpy(out, p, 12);
		memcpy(out + 12, space + off, len);
		return send_reply(c->fd, request, out, 12 + len);
	}
	case VU_SET_CONFIG:
		/* Nothing in the blk config is driver-writable without CONFIG_WCE (not offered). */
		status = 1;
		break;
	case VU_SET_LOG_BASE:
	case VU_SET_LOG_FD:
	default:
		/* Not offered (no LOG_SHMFD, no backend channel, no inflight ...): refuse. */
		status = 1;
		break;
	}
	if (ack)
		return reply_u64(c->fd, request, status);
	return 0;
}

/* --- the connection loop ---------------------------------------------------------------- */

static void conn_teardown(struct dvs_vu *vu, struct conn *c)
{
	for (uint32_t i = 0; i < DVS_VU_MAX_QUEUES; i++) {
		drain_queue(vu, &c->q[i]);
		reset_queue(c, &c->q[i]);
	}
	unmap_regions(c->regions, c->n_regions);
	c->n_regions = 0;
	if (c->epfd >= 0)
		close(c->epfd);
}

int dvs_vu_serve(struct dvs_vu *vu, int conn_fd, int stop_fd)
{
	struct conn *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->fd = conn_fd;
	c->stop_fd = stop_fd;
	for (uint32_t i = 0; i < DVS_VU_MAX_QUEUES; i++)
		c->q[i].kick_fd = c->q[i].call_fd = c->q[i].err_fd = -1;
	vu->acked_features = 0;
	vu->acked_protocol = 0;
	vu->stats.protocol_error = DVS_VU_ERR_NONE;
	vu->stats.connected = 1;
	int ret = 0;
	c->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (c->epfd < 0) {
		ret = -errno;
		goto out;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TAG_CONN };
	if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, conn_fd, &ev)) {
		ret = -errno;
		goto out;
	}
	if (stop_fd >= 0) {
		ev.data.u64 = TAG_STOP;
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, stop_fd, &ev)) {
			ret = -errno;
			goto out;
		}
	}
	int backend_fd = dvs_blk_event_fd(vu->blk);
	if (backend_fd >= 0) {
		ev.data.u64 = TAG_BACKEND;
		if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, backend_fd, &ev)) {
			ret = -errno;
			goto out;
		}
	}
	uint8_t *payload = malloc(VU_MAX_PAYLOAD);
	if (!payload) {
		ret = -ENOMEM;
		goto out;
	}
	for (;;) {
		int busy = 0;
		for (uint32_t i = 0; i < vu->num_queues; i++)
			busy |= c->q[i].more;
		struct epoll_event events[8];
		int n = epoll_wait(c->epfd, events, 8, busy ? 0 : -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ret = -errno;
			break;
		}
		int done = 0;
		for (int i = 0; i < n && !done; i++) {
			uint64_t tag = events[i].data.u64;
			if (tag == TAG_STOP) {
				ret = 1;
				done = 1;
			} else if (tag == TAG_CONN) {
				uint32_t hdr[3];
				int fds[VU_MAX_FDS], n_fds;
				int r = recv_msg(vu, conn_fd, hdr, payload, fds, &n_fds);
				if (r <= 0) {
					ret = r;
					done = 1;
					break;
				}
				r = handle(vu, c, hdr, payload, fds, n_fds);
				if (r < 0) {
					ret = r;
					done = 1;
				}
			} else if (tag == TAG_BACKEND) {
				if (dvs_blk_poll(vu->blk, 0) < 0) {
					ret = -EIO;
					done = 1;
				}
				after_completions(vu, c);
			} else if (tag >= TAG_KICK && tag < TAG_KICK + DVS_VU_MAX_QUEUES) {
				struct vu_queue *q = &c->q[tag - TAG_KICK];
				uint64_t count;
				if (q->kick_fd >= 0 && read(q->kick_fd, &count, sizeof(count)) > 0) {
					vu->stats.kicks++;
					q->more = 1;
				}
			}
		}
		if (done)
			break;
		for (uint32_t i = 0; i < vu->num_queues; i++)
			if (c->q[i].more)
				run_queue(vu, c, i);
	}
	free(payload);
out:
	conn_teardown(vu, c);
	free(c);
	vu->stats.connected = 0;
	return ret;
}
