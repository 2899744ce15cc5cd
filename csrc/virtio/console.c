/*
 * console.c -- virtio-console port 0 (see console.h).
 *
 * fd semantics relied on: with O_NONBLOCK, read/write/readv/writev return -EAGAIN instead of
 * waiting; a pipe whose reader is gone fails writes with EPIPE (SIGPIPE must be ignored or
 * blocked by the process); a pty master whose slave side is closed fails reads with EIO,
 * which is a hang-up, not an error of ours. A partial write leaves the rest of the chain
 * for the next call: the chain's offset is remembered with it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "virtio/console.h"

#define CONSOLE_MAX_SEGS 64
#define BOUNCE 4096

struct dvs_console {
	struct dvs_console_config cfg;
	struct dvs_console_stats stats;
	int tx_pending;          /* tx_chain popped, tx_offset bytes of it written */
	uint64_t tx_offset;
	int rx_pending;          /* rx_chain popped, waiting for input */
	struct dvs_vq_chain tx_chain;
	struct dvs_vq_chain rx_chain;
};

int dvs_console_create(const struct dvs_console_config *cfg, struct dvs_console **out)
{
	struct dvs_console *con = calloc(1, sizeof(*con));
	if (!con)
		return -ENOMEM;
	con->cfg = *cfg;
	*out = con;
	return 0;
}

void dvs_console_destroy(struct dvs_console *con)
{
	free(con);
}

uint64_t dvs_console_features(const struct dvs_console *con)
{
	return (1ull << DVS_VIRTIO_F_VERSION_1) | (1ull << DVS_VIRTIO_F_INDIRECT_DESC) |
	       (1ull << DVS_VIRTIO_F_EVENT_IDX) | (1ull << DVS_VIRTIO_CONSOLE_F_SIZE);
}

int dvs_console_config_space(const struct dvs_console *con, uint8_t *buf, uint32_t len)
{
	uint8_t c[DVS_VIRTIO_CONSOLE_CONFIG_BYTES] = { 0 };
	/* struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; } */
	c[0] = (uint8_t)con->cfg.cols;
	c[1] = (uint8_t)(con->cfg.cols >> 8);
	c[2] = (uint8_t)con->cfg.rows;
	c[3] = (uint8_t)(con->cfg.rows >> 8);
	c[4] = 1; /* max_nr_ports, meaningful only with MULTIPORT */
	uint32_t n = len < sizeof(c) ? len : (uint32_t)sizeof(c);
	memcpy(buf, c, n);
	return (int)n;
}

uint16_t dvs_console_max_segs(const struct dvs_console *con)
{
	return CONSOLE_MAX_SEGS;
}

int dvs_console_get_stats(const struct dvs_console *con, struct dvs_console_stats *stats)
{
	*stats = con->stats;
	return 0;
}

/* iovecs for the chain's readable or writable bytes from `offset`; -E2BIG/-EOPNOTSUPP mean
 * "copy through a bounce buffer". */
static int chain_iov(const struct dvs_guest_mem *mem, const struct dvs_vq_chain *ch, int writable,
		     uint64_t offset, struct iovec *iov, uint32_t max_iov)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < ch->n_segs; i++) {
		const struct dvs_vq_seg *s = &ch->segs[i];
		if ((int)s->writable != writable)
			continue;
		if (offset >= s->len) {
			offset -= s->len;
			continue;
		}
		int got = dvs_guest_mem_iov(mem, s->gpa + offset, s->len - offset, iov + n,
					    max_iov - n);
		if (got < 0)
			return got;
		n += (uint32_t)got;
		offset = 0;
	}
	return (int)n;
}

static int push(struct dvs_vq *vq, const struct dvs_guest_mem *mem, uint16_t head, uint32_t len,
		struct dvs_console_result *result)
{
	struct dvs_vq_used_elem e = { head, len };
	int err = dvs_vq_push(vq, mem, &e, 1);
	if (err)
		return err;
	result->completed++;
	return 0;
}

static int finish(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		  struct dvs_console_result *result, int ret)
{
	if (result->completed && dvs_vq_should_notify(vq, mem) > 0)
		result->notify = 1;
	return ret;
}

/* Write what is left of the pending transmit chain. 1: all written; 0: the fd is full. */
static int64_t tx_write(struct dvs_console *con, const struct dvs_guest_mem *mem)
{
	const struct dvs_vq_chain *ch = &con->tx_chain;
	uint64_t left = ch->readable_bytes - con->tx_offset;
	if (left == 0)
		return 1;
	if (con->cfg.out_fd < 0 || con->stats.out_closed) {
		con->stats.tx_dropped += left;
		con->tx_offset += left;
		return 1;
	}
	struct iovec iov[CONSOLE_MAX_SEGS * 2];
	uint8_t bounce[BOUNCE];
	int n = chain_iov(mem, ch, 0, con->tx_offset, iov, CONSOLE_MAX_SEGS * 2);
	if (n < 0) {
		uint64_t step = left < BOUNCE ? left : BOUNCE;
		int64_t got = dvs_vq_chain_read(mem, ch, con->tx_offset, bounce, step);
		if (got < 0)
			return got;
		iov[0].iov_base = bounce;
		iov[0].iov_len = (size_t)got;
		n = 1;
	}
	ssize_t w;
	do
		w = writev(con->cfg.out_fd, iov, n);
	while (w < 0 && errno == EINTR);
	if (w < 0) {
		if (errno == EAGAIN)
			return 0;
		/* EPIPE, EIO (pty slave gone) ...: nobody will read this output again */
		con->stats.out_closed = 1;
		con->stats.tx_dropped += left;
		con->tx_offset += left;
		return 1;
	}
	con->tx_offset += (uint64_t)w;
	con->stats.tx_bytes += (uint64_t)w;
	return con->tx_offset == ch->readable_bytes;
}

/* The next chain of a queue. When the queue looks empty, kicks are re-enabled and the queue
 * checked again, so a buffer the driver adds meanwhile is not missed. Each pop spends one unit
 * of the call's budget (a driver refilling as fast as we drain cannot keep us here).
 * 1: a chain; 0: nothing to do now (result->more set when the budget ran out); -errno. */
static int take_chain(struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		      struct dvs_vq_chain *chain, uint32_t *budget,
		      struct dvs_console_result *result)
{
	for (;;) {
		if (*budget == 0) {
			result->more = 1;
			return 0;
		}
		(*budget)--;
		int r = dvs_vq_pop(vq, mem, chain);
		if (r != 0)
			return r;
		r = dvs_vq_enable_kicks(vq, mem);
		if (r <= 0)
			return r;
	}
}

int dvs_console_tx(struct dvs_console *con, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		   struct dvs_console_result *result)
{
	memset(result, 0, sizeof(*result));
	uint32_t budget = 2u * (vq->size ? vq->size : 1);
	for (;;) {
		if (!con->tx_pending) {
			int r = take_chain(vq, mem, &con->tx_chain, &budget, result);
			if (r <= 0)
				return finish(vq, mem, result, r);
			if (con->tx_chain.n_readable != con->tx_chain.n_segs) {
				/* keep the device's ownership: the queue is dead anyway */
				return finish(vq, mem, result,
					      dvs_vq_fail(vq, DVS_VQ_ERR_CONSOLE_TX_WRITABLE,
							  con->tx_chain.head));
			}
			con->tx_pending = 1;
			con->tx_offset = 0;
			con->stats.tx_chains++;
		}
		int64_t done = tx_write(con, mem);
		if (done < 0)
			return finish(vq, mem, result, (int)done);
		if (done == 0) {
			result->blocked = 1;
			return finish(vq, mem, result, 0);
		}
		con->tx_pending = 0;
		int err = push(vq, mem, con->tx_chain.head, 0, result);
		if (err)
			return finish(vq, mem, result, err);
	}
}

/* Read input into the pending receive chain. >0: bytes; 0: nothing available (EAGAIN);
 * -EPIPE: end of input. */
static int64_t rx_read(struct dvs_console *con, const struct dvs_guest_mem *mem)
{
	const struct dvs_vq_chain *ch = &con->rx_chain;
	struct iovec iov[CONSOLE_MAX_SEGS * 2];
	uint8_t bounce[BOUNCE];
	int n = chain_iov(mem, ch, 1, 0, iov, CONSOLE_MAX_SEGS * 2);
	int bounced = n < 0;
	if (bounced) {
		iov[0].iov_base = bounce;
		iov[0].iov_len = ch->writable_bytes < BOUNCE ? ch->writable_bytes : BOUNCE;
		n = 1;
	}
	ssize_t r;
	do
		r = readv(con->cfg.in_fd, iov, n);
	while (r < 0 && errno == EINTR);
	if (r < 0 && errno == EAGAIN)
		return 0;
	if (r <= 0) { /* 0: EOF of a pipe; EIO: pty slave closed */
		con->stats.in_eof = 1;
		return -EPIPE;
	}
	if (bounced) {
		int64_t put = dvs_vq_chain_write(mem, ch, 0, bounce, (uint64_t)r);
		if (put < 0)
			return put;
	}
	return r;
}

int dvs_console_rx(struct dvs_console *con, struct dvs_vq *vq, const struct dvs_guest_mem *mem,
		   struct dvs_console_result *result)
{
	memset(result, 0, sizeof(*result));
	if (con->cfg.in_fd < 0 || con->stats.in_eof)
		return 0;
	uint32_t budget = 2u * (vq->size ? vq->size : 1);
	for (;;) {
		if (!con->rx_pending) {
			int r = take_chain(vq, mem, &con->rx_chain, &budget, result);
			if (r <= 0) /* no buffer (input stays where it is), budget spent, or broken */
				return finish(vq, mem, result, r);
			if (con->rx_chain.n_readable != 0)
				return finish(vq, mem, result,
					      dvs_vq_fail(vq, DVS_VQ_ERR_CONSOLE_RX_READABLE,
							  con->rx_chain.head));
			con->rx_pending = 1;
			con->stats.rx_chains++;
		}
		if (con->rx_chain.writable_bytes == 0) { /* an empty buffer: give it back */
			con->rx_pending = 0;
			int err = push(vq, mem, con->rx_chain.head, 0, result);
			if (err)
				return finish(vq, mem, result, err);
			continue;
		}
		int64_t got = rx_read(con, mem);
		if (got == 0) {
			result->blocked = 1;
			return finish(vq, mem, result, 0);
		}
		if (got == -EPIPE)
			return finish(vq, mem, result, 0); /* keep the buffer; nothing will come */
		if (got < 0)
			return finish(vq, mem, result, (int)got);
		con->rx_pending = 0;
		con->stats.rx_bytes += (uint64_t)got;
		int err = push(vq, mem, con->rx_chain.head, (uint32_t)got, result);
		if (err)
			return finish(vq, mem, result, err);
	}
}
