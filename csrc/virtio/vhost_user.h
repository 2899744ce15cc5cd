/*
 * vhost_user.h -- a vhost-user back-end (QEMU docs/interop/vhost-user.rst) for a dvs_blk.
 *
 * The front-end (QEMU) connects over a unix stream socket and sends messages: a 12-byte
 * header {u32 request, u32 flags, u32 size} and `size` payload bytes, with file descriptors
 * as SCM_RIGHTS. It shares guest RAM as memfd regions (SET_MEM_TABLE), which are mapped
 * here, so the virtqueues run over the *local* guest-memory backend; ring addresses arrive
 * as the front-end's virtual addresses and are translated to guest-physical ones through
 * the region table. Kicks arrive on an eventfd per queue, interrupts leave through another
 * (the "call" fd), and a queue that breaks a virtqueue rule is stopped and signalled on its
 * "err" fd -- the vhost-user form of DEVICE_NEEDS_RESET. Every message is checked (size,
 * queue index, fd count, region table, config range) before it is acted on; a front-end that
 * breaks the protocol is disconnected with the rule it broke (DVS_VU_ERR_*).
 *
 * dvs_vu_serve() runs one connection on the calling thread (an epoll loop) until the
 * front-end disconnects or `stop_fd` becomes readable.
 */
#ifndef DVS_VHOST_USER_H
#define DVS_VHOST_USER_H

#include <stdint.h>

#include "virtio/blk.h"

/* cffi:begin */
#define DVS_VU_MAX_QUEUES 16

#define DVS_VU_ERR_NONE 0
#define DVS_VU_ERR_SHORT_MESSAGE 1   /* connection closed inside a message */
#define DVS_VU_ERR_VERSION 2         /* flags do not carry protocol version 1 */
#define DVS_VU_ERR_PAYLOAD_SIZE 3    /* payload size wrong for the request, or too large */
#define DVS_VU_ERR_QUEUE_INDEX 4     /* queue index beyond the device's queues */
#define DVS_VU_ERR_FD_COUNT 5        /* wrong number of file descriptors for the request */
#define DVS_VU_ERR_MEM_TABLE 6       /* bad region table (count, overlap, wrap) or mmap failed */
#define DVS_VU_ERR_RING_ADDRESS 7    /* a ring address lies in no shared region */
#define DVS_VU_ERR_FEATURES 8        /* features set that the back-end did not offer */
#define DVS_VU_ERR_CONFIG_RANGE 9    /* config space access out of range */
#define DVS_VU_ERR_VRING_BASE 10     /* split-ring base above 65535 */
#define DVS_VU_ERR_MAX 11

struct dvs_vu_stats {
	uint64_t messages;
	uint64_t kicks;
	uint64_t calls;        /* interrupts sent */
	uint64_t requests;     /* virtio requests handled */
	uint64_t polled;       /* of which found by polling, without a kick */
	uint32_t connected;
	uint32_t queues_started;
	uint32_t protocol_error;  /* DVS_VU_ERR_* that ended the last connection */
	uint32_t last_request;    /* request code of the last message */
	uint32_t broken_queue;    /* index + 1 of the first queue that broke a rule, 0: none */
	uint32_t queue_rule;      /* DVS_VQ_ERR_* it broke */
	uint64_t queue_rule_detail;
	uint64_t features;        /* acked virtio features */
	uint64_t protocol_features;
};

struct dvs_vu;

/* A back-end serving `blk` (which stays the caller's and must outlive the back-end). */
int dvs_vu_blk_create(struct dvs_blk *blk, struct dvs_vu **out);
/* Serve one connection: 0 when the front-end closed it, 1 when stop_fd became readable,
 * -EPROTO when the front-end broke the protocol (stats.protocol_error says how), another
 * -errno on a local failure. The connection fd stays the caller's. */
int dvs_vu_serve(struct dvs_vu *vu, int conn_fd, int stop_fd);
int dvs_vu_get_stats(const struct dvs_vu *vu, struct dvs_vu_stats *stats);
/* Busy-poll a queue for up to poll_ns after it runs empty before waiting for a kick
 * (0, the default: never). Trades host CPU for fewer guest exits. */
int dvs_vu_set_poll(struct dvs_vu *vu, uint64_t poll_ns);
const char *dvs_vu_error_name(uint32_t err);
void dvs_vu_destroy(struct dvs_vu *vu);
/* cffi:end */

#endif
