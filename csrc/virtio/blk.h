/*
 * blk.h -- the virtio-blk device model (virtio 1.2 §5.2): request parsing and validation,
 * completion, configuration space. The queue mechanics are virtqueue.h's; the storage is a
 * dvs_blk_backend (blk_backend.h).
 *
 * A request is one descriptor chain: a 16-byte device-readable header {le32 type,
 * le32 reserved, le64 sector}, then data (device-readable for OUT, DISCARD and WRITE_ZEROES,
 * device-writable for IN and GET_ID), then one device-writable status byte -- the last
 * writable byte of the chain. The layout across descriptors is not assumed (§2.7.4): the
 * header and ranges may be split anywhere. A request that breaks a request rule is answered
 * with VIRTIO_BLK_S_IOERR or _UNSUPP (the rule is counted, see DVS_BLK_REQ_*); only queue
 * rules stop the queue (DEVICE_NEEDS_RESET).
 */
#ifndef DVS_VIRTIO_BLK_H
#define DVS_VIRTIO_BLK_H

#include <stdint.h>

#include "guestmem/guestmem.h"
#include "virtio/blk_backend.h"
#include "virtio/virtqueue.h"

/* cffi:begin */
#define DVS_VIRTIO_ID_BLOCK 2

#define DVS_VIRTIO_BLK_F_SIZE_MAX 1
#define DVS_VIRTIO_BLK_F_SEG_MAX 2
#define DVS_VIRTIO_BLK_F_RO 5
#define DVS_VIRTIO_BLK_F_BLK_SIZE 6
#define DVS_VIRTIO_BLK_F_FLUSH 9
#define DVS_VIRTIO_BLK_F_MQ 12
#define DVS_VIRTIO_BLK_F_DISCARD 13
#define DVS_VIRTIO_BLK_F_WRITE_ZEROES 14

#define DVS_VIRTIO_BLK_T_IN 0
#define DVS_VIRTIO_BLK_T_OUT 1
#define DVS_VIRTIO_BLK_T_FLUSH 4
#define DVS_VIRTIO_BLK_T_GET_ID 8
#define DVS_VIRTIO_BLK_T_DISCARD 11
#define DVS_VIRTIO_BLK_T_WRITE_ZEROES 13

#define DVS_VIRTIO_BLK_S_OK 0
#define DVS_VIRTIO_BLK_S_IOERR 1
#define DVS_VIRTIO_BLK_S_UNSUPP 2

#define DVS_VIRTIO_BLK_ID_BYTES 20
#define DVS_VIRTIO_BLK_CONFIG_BYTES 60 /* up to write_zeroes_may_unmap + padding */

/* Request rules: a request breaking one is answered with an error status, nothing more. */
#define DVS_BLK_REQ_OK 0
#define DVS_BLK_REQ_NO_STATUS 1         /* no device-writable byte for the status */
#define DVS_BLK_REQ_SHORT_HEADER 2      /* fewer than 16 device-readable header bytes */
#define DVS_BLK_REQ_UNALIGNED_LENGTH 3  /* IN/OUT data not a multiple of 512 bytes */
#define DVS_BLK_REQ_BEYOND_CAPACITY 4   /* sector range ends beyond the capacity */
#define DVS_BLK_REQ_WRONG_DIRECTION 5   /* data buffers of the wrong direction for the type */
#define DVS_BLK_REQ_READ_ONLY 6         /* write to a read-only device */
#define DVS_BLK_REQ_UNSUPPORTED_TYPE 7
#define DVS_BLK_REQ_GET_ID_LENGTH 8     /* GET_ID data is not 20 bytes */
#define DVS_BLK_REQ_RANGE_LENGTH 9      /* discard/write-zeroes data not n * 16 bytes, n >= 1 */
#define DVS_BLK_REQ_TOO_MANY_RANGES 10  /* more ranges than max_*_seg */
#define DVS_BLK_REQ_RANGE_TOO_LARGE 11  /* num_sectors above max_*_sectors */
#define DVS_BLK_REQ_UNKNOWN_FLAGS 12    /* reserved range flag bits set */
#define DVS_BLK_REQ_DISCARD_UNMAP 13    /* unmap flag on a discard */
#define DVS_BLK_REQ_TOO_LARGE 14        /* data larger than the bounce limit (remote memory) */
#define DVS_BLK_REQ_BACKEND_ERROR 15    /* the backing store failed the operation */
#define DVS_BLK_REQ_RULE_MAX 16

#define DVS_BLK_MAX_QUEUES 16

struct dvs_blk_config {
	uint64_t capacity;        /* sectors of 512 bytes; 0: the backend's size / 512 */
	uint32_t read_only;
	uint32_t seg_max;         /* data segments per request (chain limit = seg_max + 2) */
	uint32_t num_queues;      /* 1..DVS_BLK_MAX_QUEUES */
	uint32_t blk_size;        /* advertised logical block size (512 if 0) */
	uint32_t max_discard_sectors;
	uint32_t max_discard_seg;
	uint32_t max_write_zeroes_sectors;
	uint32_t max_write_zeroes_seg;
	uint8_t id[20];           /* GET_ID answer, NUL-padded */
};

struct dvs_blk_stats {
	uint64_t requests;
	uint64_t reads;
	uint64_t writes;
	uint64_t flushes;
	uint64_t get_ids;
	uint64_t discards;
	uint64_t write_zeroes;
	uint64_t bytes_read;
	uint64_t bytes_written;
	uint64_t errors;          /* requests answered IOERR or UNSUPP */
	uint64_t deferred;        /* requests the backend handed back (full) and were retried */
	uint64_t rule_counts[16]; /* per DVS_BLK_REQ_* */
	uint32_t last_rule;
	uint32_t in_flight;
};

/* The outcome of one dvs_blk_process() call. */
struct dvs_blk_result {
	uint32_t handled;    /* requests popped */
	uint32_t completed;  /* requests pushed back to the used ring */
	uint32_t notify;     /* 1: send the driver a used-buffer notification */
	uint32_t more;       /* 1: stopped at the budget; call again soon */
	uint32_t stalled;    /* 1: the backend is full; call again after dvs_blk_poll() */
};

struct dvs_blk;

/* Takes ownership of the backend (destroyed with the device, also on failure). */
int dvs_blk_create(const struct dvs_blk_config *cfg, struct dvs_blk_backend *backend,
		   struct dvs_blk **out);
void dvs_blk_destroy(struct dvs_blk *blk);
uint64_t dvs_blk_features(const struct dvs_blk *blk);
uint64_t dvs_blk_capacity(const struct dvs_blk *blk);
/* The little-endian struct virtio_blk_config; returns bytes written (<= len). */
int dvs_blk_config_space(const struct dvs_blk *blk, uint8_t *buf, uint32_t len);
/* Segments per chain the device accepts; use as dvs_vq_config.max_segs. */
uint16_t dvs_blk_max_segs(const struct dvs_blk *blk);
/* Serve every available request of one queue (bounded by a budget): pop, validate, submit,
 * complete, push, then decide on notification. -EPROTO if the queue broke a rule. */
int dvs_blk_process(struct dvs_blk *blk, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		    struct dvs_blk_result *result);
/* The same; with DVS_BLK_KEEP_KICKS_OFF the queue is left with kicks suppressed when it runs
 * empty (the caller polls it, then calls dvs_blk_process to re-arm). */
#define DVS_BLK_KEEP_KICKS_OFF 1
int dvs_blk_process_flags(struct dvs_blk *blk, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
			  uint32_t flags, struct dvs_blk_result *result);
/* Reap asynchronous completions (no-op for synchronous backends); returns how many. */
int dvs_blk_poll(struct dvs_blk *blk, int wait);
int dvs_blk_event_fd(struct dvs_blk *blk);
int dvs_blk_get_stats(const struct dvs_blk *blk, struct dvs_blk_stats *stats);
const char *dvs_blk_request_rule_name(uint32_t rule);
/* cffi:end */

#endif
