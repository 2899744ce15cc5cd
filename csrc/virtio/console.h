/*
 * console.h -- the virtio-console device model, port 0 only (virtio 1.2 §5.3): receiveq 0
 * carries host input into device-writable guest buffers, transmitq 1 carries guest output
 * out of device-readable buffers. The host ends are file descriptors -- a pty master or the
 * two ends of pipes -- which must be non-blocking: the device never waits on them. Output
 * that the host side cannot take yet stays in the transmit chain (the guest's buffer is
 * not returned, so the guest is throttled); input is read only while the guest has a
 * receive buffer posted, so a guest that posts none is never sent data.
 */
#ifndef DVS_VIRTIO_CONSOLE_H
#define DVS_VIRTIO_CONSOLE_H

#include <stdint.h>

#include "guestmem/guestmem.h"
#include "virtio/virtqueue.h"

/* cffi:begin */
#define DVS_VIRTIO_ID_CONSOLE 3
#define DVS_VIRTIO_CONSOLE_F_SIZE 0
#define DVS_CONSOLE_RECEIVEQ 0
#define DVS_CONSOLE_TRANSMITQ 1
#define DVS_VIRTIO_CONSOLE_CONFIG_BYTES 12

struct dvs_console_config {
	int32_t in_fd;   /* host -> guest (read end / pty master), non-blocking; -1: none */
	int32_t out_fd;  /* guest -> host (write end / pty master), non-blocking; -1: discard */
	uint16_t cols;
	uint16_t rows;
};

struct dvs_console_stats {
	uint64_t rx_bytes;
	uint64_t tx_bytes;
	uint64_t rx_chains;
	uint64_t tx_chains;
	uint64_t tx_dropped;  /* bytes written while the host end was closed */
	uint32_t in_eof;      /* the input fd reported end of file / hang-up */
	uint32_t out_closed;  /* the output fd refused data for good (EPIPE, EIO) */
};

struct dvs_console_result {
	uint32_t completed;  /* chains pushed to the used ring */
	uint32_t notify;     /* 1: send a used-buffer notification */
	uint32_t blocked;    /* 1: waiting for the fd (POLLIN for rx, POLLOUT for tx) */
	uint32_t more;       /* 1: stopped at the budget; call again */
};

struct dvs_console;

int dvs_console_create(const struct dvs_console_config *cfg, struct dvs_console **out);
void dvs_console_destroy(struct dvs_console *con);
uint64_t dvs_console_features(const struct dvs_console *con);
int dvs_console_config_space(const struct dvs_console *con, uint8_t *buf, uint32_t len);
uint16_t dvs_console_max_segs(const struct dvs_console *con);
/* Move guest output from the transmitq to out_fd. -EPROTO if the queue broke a rule. */
int dvs_console_tx(struct dvs_console *con, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		   struct dvs_console_result *result);
/* Move available input from in_fd into receive buffers. -EPROTO if the queue broke a rule. */
int dvs_console_rx(struct dvs_console *con, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		   struct dvs_console_result *result);
int dvs_console_get_stats(const struct dvs_console *con, struct dvs_console_stats *stats);
/* cffi:end */

#endif
