/*
 * virtqueue.h -- the device side of a virtio 1.2 split virtqueue (spec §2.7), over the
 * guest-memory interface of guestmem/guestmem.h.
 *
 * A split virtqueue is three areas in guest RAM that the driver (the guest) lays out:
 *   descriptor table  16 * size bytes, 16-aligned: {le64 addr, le32 len, le16 flags, le16 next}
 *   available ring    6 + 2 * size bytes, 2-aligned: {le16 flags, le16 idx, le16 ring[size],
 *                     le16 used_event}; written by the driver only
 *   used ring         6 + 8 * size bytes, 4-aligned: {le16 flags, le16 idx,
 *                     {le32 id, le32 len} ring[size], le16 avail_event}; written by the device
 * The guest is an adversary: every value read from these areas is copied once, then checked,
 * then used. A violated rule of the spec is recorded once (`rule`, one DVS_VQ_ERR_* per rule)
 * and the queue stops for good: every later call fails with -EPROTO until the queue is set
 * up again (the transport reports DEVICE_NEEDS_RESET). Nothing a guest writes can make the
 * walker loop without bound, read or write outside guest RAM, or allocate memory.
 *
 * Indices: the device keeps its own copies of the next available slot to read
 * (last_avail_idx) and the next used slot to fill (used_idx). It never reads the used
 * index back from guest memory, which the guest could overwrite.
 */
#ifndef DVS_VIRTQUEUE_H
#define DVS_VIRTQUEUE_H

#include <stdint.h>

#include "guestmem/guestmem.h"

/* cffi:begin */
/* Feature bits (spec §6) the queue itself interprets. */
#define DVS_VIRTIO_F_INDIRECT_DESC 28
#define DVS_VIRTIO_F_EVENT_IDX 29
#define DVS_VIRTIO_F_VERSION_1 32

#define DVS_VIRTQ_DESC_F_NEXT 1
#define DVS_VIRTQ_DESC_F_WRITE 2
#define DVS_VIRTQ_DESC_F_INDIRECT 4
#define DVS_VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define DVS_VIRTQ_USED_F_NO_NOTIFY 1

/* Device status bit (spec §2.1) a transport sets when a queue broke a rule. */
#define DVS_VIRTIO_STATUS_NEEDS_RESET 64

#define DVS_VQ_MAX_SIZE 32768
/* Segments one chain may have in this device (spec §2.7.4.1: "The device MAY have a
 * reasonable limit of descriptors it will allow in a chain"). */
#define DVS_VQ_MAX_SEGS 1024

/* The rules a driver can break, one code each (0: none). Names in dvs_vq_rule_name(). */
#define DVS_VQ_OK 0
#define DVS_VQ_ERR_QUEUE_SIZE 1             /* size is not a power of two in 1..32768 */
#define DVS_VQ_ERR_RING_ALIGNMENT 2         /* desc 16-, avail 2-, used 4-byte aligned */
#define DVS_VQ_ERR_RING_OUTSIDE_MEMORY 3    /* a ring area is not wholly in guest RAM */
#define DVS_VQ_ERR_AVAIL_IDX_AHEAD 4        /* avail idx more than size ahead of the device */
#define DVS_VQ_ERR_HEAD_OUT_OF_RANGE 5      /* avail ring entry >= size */
#define DVS_VQ_ERR_HEAD_IN_FLIGHT 6         /* head offered again while the device owns it */
#define DVS_VQ_ERR_NEXT_OUT_OF_RANGE 7      /* next >= table entries */
#define DVS_VQ_ERR_CHAIN_TOO_LONG 8         /* longer than the queue size (or a loop) */
#define DVS_VQ_ERR_CHAIN_OVER_DEVICE_LIMIT 9 /* more segments than the device accepts */
#define DVS_VQ_ERR_CHAIN_BYTES 10           /* more than 2^32 bytes in total */
#define DVS_VQ_ERR_BUFFER_OUTSIDE_MEMORY 11 /* a buffer is not wholly in guest RAM */
#define DVS_VQ_ERR_READABLE_AFTER_WRITABLE 12 /* device-readable after device-writable */
#define DVS_VQ_ERR_INDIRECT_NOT_NEGOTIATED 13
#define DVS_VQ_ERR_INDIRECT_WITH_NEXT 14    /* INDIRECT and NEXT both set */
#define DVS_VQ_ERR_INDIRECT_NESTED 15       /* INDIRECT inside an indirect table */
#define DVS_VQ_ERR_INDIRECT_LENGTH 16       /* table length 0 or not a multiple of 16 */
#define DVS_VQ_ERR_INDIRECT_OUTSIDE_MEMORY 17
/* Device-type rules (a queue of that device type stops the same way). */
#define DVS_VQ_ERR_CONSOLE_RX_READABLE 32   /* spec §5.3.6.1: readable buffer in a receiveq */
#define DVS_VQ_ERR_CONSOLE_TX_WRITABLE 33   /* spec §5.3.6.1: writable buffer in a transmitq */
#define DVS_VQ_RULE_MAX 34

struct dvs_vq_config {
	uint16_t size;
	uint16_t last_avail_idx; /* where to resume (vhost-user SET_VRING_BASE); 0 when new */
	uint16_t used_idx;       /* next used slot; equal to last_avail_idx when nothing is owed */
	uint16_t max_segs;       /* device limit per chain, 1..DVS_VQ_MAX_SEGS */
	uint64_t features;       /* negotiated feature bits */
	uint64_t desc_gpa;
	uint64_t avail_gpa;
	uint64_t used_gpa;
};

struct dvs_vq {
	uint16_t size;
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint16_t signalled_used;   /* used_idx at the last notification (EVENT_IDX) */
	uint8_t signalled_valid;
	uint8_t event_idx;
	uint8_t indirect;
	uint8_t ready;
	uint16_t max_segs;
	uint16_t in_flight;        /* chains popped and not yet pushed */
	uint32_t rule;             /* first rule broken, DVS_VQ_ERR_*; 0 while healthy */
	uint64_t rule_detail;      /* the offending index, address or length */
	uint64_t desc_gpa;
	uint64_t avail_gpa;
	uint64_t used_gpa;
	uint64_t desc_hva;         /* host pointers to the areas (local backend), else 0 */
	uint64_t avail_hva;
	uint64_t used_hva;
	uint64_t popped;           /* chains handed to the device, ever */
	uint64_t pushed;
	uint64_t owned[512];       /* bit per descriptor head the device owns (32768 bits) */
};

struct dvs_vq_seg {
	uint64_t gpa;
	uint32_t len;
	uint32_t writable;
};

/* One descriptor chain as popped: readable segments first, then writable ones. */
struct dvs_vq_chain {
	uint16_t head;
	uint16_t n_segs;
	uint16_t n_readable;
	uint16_t indirect;        /* 1 if the chain went through an indirect table */
	uint64_t readable_bytes;
	uint64_t writable_bytes;
	struct dvs_vq_seg segs[1024]; /* DVS_VQ_MAX_SEGS */
};

struct dvs_vq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* Validate the layout and start the queue. -EPROTO (rule set) if the driver's layout
 * breaks a rule; -EINVAL for a bad device-side argument (max_segs). */
int dvs_vq_init(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		const struct dvs_vq_config *cfg);
/* Take the next available chain: 1 and *chain filled, 0 if none, -EPROTO if the queue is
 * (or now becomes) broken, another -errno if guest memory could not be read. */
int dvs_vq_pop(struct dvs_vq *vq, const struct dvs_guest_mem *mem, struct dvs_vq_chain *chain);
/* Give chains back: used elements are written, then (after a release fence) used->idx
 * once for the whole batch. -EINVAL if an id is not a chain the device owns. */
int dvs_vq_push(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		const struct dvs_vq_used_elem *elems, uint32_t n);
/* 1 if the driver wants a used-buffer notification now (EVENT_IDX or NO_INTERRUPT), else 0. */
int dvs_vq_should_notify(struct dvs_vq *vq, const struct dvs_guest_mem *mem);
/* Ask for kicks again (avail_event := last_avail_idx, or clear NO_NOTIFY) and return 1 if
 * buffers arrived meanwhile (the caller must process them), 0 if the ring is empty. */
int dvs_vq_enable_kicks(struct dvs_vq *vq, const struct dvs_guest_mem *mem);
/* How many chains the driver has made available beyond what the device popped (read-only:
 * a bad index is reported by the next pop, not here). For polling without kicks. */
int dvs_vq_pending(const struct dvs_vq *vq, const struct dvs_guest_mem *mem);
/* Tell the driver kicks are not needed while the device is busy (no-op with EVENT_IDX). */
int dvs_vq_disable_kicks(struct dvs_vq *vq, const struct dvs_guest_mem *mem);
/* The device status a transport with a status register (virtio-mmio, virtio-pci) reports:
 * `status` with DEVICE_NEEDS_RESET added once any of the device's queues broke a rule.
 * (vhost-user has no such register: its back-end signals the queue's error eventfd.) */
uint32_t dvs_vq_device_status(uint32_t status, struct dvs_vq *const *queues, uint32_t n);
/* Mark the queue broken by a device-type rule (e.g. DVS_VQ_ERR_CONSOLE_RX_READABLE). */
int dvs_vq_fail(struct dvs_vq *vq, uint32_t rule, uint64_t detail);
const char *dvs_vq_rule_name(uint32_t rule);
/* cffi:end */

/* C-only: bounded sequential access to a chain's bytes (header parsing, status bytes). */
/* Copy up to len bytes starting `offset` bytes into the chain's readable part. Returns
 * bytes copied (short at the end of the readable part) or -errno. */
int64_t dvs_vq_chain_read(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *chain,
			  uint64_t offset, void *dst, uint64_t len);
/* Same for writing into the writable part, offset counted from its first byte. */
int64_t dvs_vq_chain_write(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *chain,
			   uint64_t offset, const void *src, uint64_t len);

#endif
