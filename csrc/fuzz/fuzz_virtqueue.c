/*
 * fuzz_virtqueue.c -- libFuzzer harness for the virtqueue walker and the devices on top of
 * it (built by benchmarks/fuzz_virtio.py with clang -fsanitize=fuzzer,address,undefined;
 * never part of the cffi extension).
 *
 * One input is one hostile guest: the bytes become 64 KiB of guest RAM split into two
 * regions that are adjacent in guest-physical space but not in the host (as QEMU splits RAM),
 * and three header bytes pick the queue size, features, device limit and which device
 * consumes the queue (bare queue, virtio-blk on a memfd-backed disk, console transmit or
 * receive). Whatever the bytes, the code under test must return -- no crash, no sanitizer
 * report, no hang -- and keep its own invariants: a queue that reports a broken rule stays
 * broken, and the used index only moves by what was pushed.
 *
 * Input layout: [0] log2 queue size (mod 8); [1] bit 0 INDIRECT_DESC, bit 1 EVENT_IDX,
 * bits 2-3 consumer, bits 4-5 max_segs choice; [2] 0xF? shifts the rings by ? bytes (to hit
 * the alignment rules); [3..] guest RAM from gpa 0 (zero-filled beyond the input).
 * Shared by the atheris harness tests/fuzz/fuzz_virtio.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "guestmem/guestmem.h"
#include "virtio/blk.h"
#include "virtio/console.h"
#include "virtio/virtqueue.h"

#define HALF 0x8000
#define DISK_BYTES (1 << 20)

static uint8_t *ram_low, *ram_high;
static struct dvs_blk *blk;
static struct dvs_console *con;
static int in_pipe[2];
static int null_fd;
static struct dvs_vq_chain chain;

static void setup_once(void)
{
	if (ram_low)
		return;
	/* Separate mappings with a guard page between: a stray access faults at once. */
	ram_low = mmap(NULL, HALF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ram_high = mmap(NULL, HALF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram_low == MAP_FAILED || ram_high == MAP_FAILED)
		abort();
	int disk = memfd_create("fuzz-disk", MFD_CLOEXEC);
	if (disk < 0 || ftruncate(disk, DISK_BYTES))
		abort();
	struct dvs_blk_backend *be;
	if (dvs_blk_backend_file(disk, 0, &be))
		abort();
	struct dvs_blk_config cfg = { .seg_max = 14, .id = "fuzz" };
	if (dvs_blk_create(&cfg, be, &blk))
		abort();
	if (pipe2(in_pipe, O_NONBLOCK | O_CLOEXEC))
		abort();
	null_fd = open("/dev/null", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	struct dvs_console_config ccfg = { .in_fd = in_pipe[0], .out_fd = null_fd, .cols = 80,
					   .rows = 25 };
	if (null_fd < 0 || dvs_console_create(&ccfg, &con))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	setup_once();
	if (size < 3)
		return 0;
	uint16_t qsize = (uint16_t)(1u << (data[0] % 8));
	uint8_t mode = data[1];
	uint32_t shift = (data[2] & 0xF0) == 0xF0 ? data[2] & 0x0F : 0;
	data += 3;
	size -= 3;
	memset(ram_low, 0, HALF);
	memset(ram_high, 0, HALF);
	memcpy(ram_low, data, size < HALF ? size : HALF);
	if (size > HALF)
		memcpy(ram_high, data + HALF, size - HALF < HALF ? size - HALF : HALF);

	struct dvs_guest_region regions[2] = {
		{ 0, HALF, (uintptr_t)ram_low },
		{ HALF, HALF, (uintptr_t)ram_high },
	};
	struct dvs_guest_mem mem;
	if (dvs_guest_mem_init(&mem, 0, regions, 2))
		abort();

	static const uint16_t segs[4] = { 1, 3, 16, 1024 };
	struct dvs_vq_config cfg = { 0 };
	cfg.size = qsize;
	cfg.max_segs = segs[(mode >> 4) & 3];
	cfg.features = (1ull << DVS_VIRTIO_F_VERSION_1) |
		       ((mode & 1) ? 1ull << DVS_VIRTIO_F_INDIRECT_DESC : 0) |
		       ((mode & 2) ? 1ull << DVS_VIRTIO_F_EVENT_IDX : 0);
	cfg.desc_gpa = 0x40 + shift;
	cfg.avail_gpa = cfg.desc_gpa + 16ull * qsize + shift;
	cfg.used_gpa = ((cfg.avail_gpa + 6 + 2ull * qsize + 3) & ~3ull) + shift;

	static struct dvs_vq vq;
	if (dvs_vq_init(&vq, &mem, &cfg))
		return 0;

	switch ((mode >> 2) & 3) {
	case 0: { /* the bare queue: pop everything, give it back in two batches */
		struct dvs_vq_used_elem used[256];
		uint32_t n = 0;
		int r;
		while (n < 256 && (r = dvs_vq_pop(&vq, &mem, &chain)) == 1) {
			if (chain.n_segs == 0 || chain.n_segs > cfg.max_segs)
				abort();
			used[n].id = chain.head;
			used[n].len = (uint32_t)chain.writable_bytes;
			n++;
		}
		if (r < 0 && vq.rule && dvs_vq_pop(&vq, &mem, &chain) != -EPROTO)
			abort(); /* a broken queue must stay broken */
		uint16_t before = vq.used_idx;
		if (dvs_vq_push(&vq, &mem, used + n / 2, n - n / 2) ||
		    dvs_vq_push(&vq, &mem, used, n / 2))
			abort(); /* everything popped must be accepted back */
		if ((uint16_t)(vq.used_idx - before) != n)
			abort();
		(void)dvs_vq_should_notify(&vq, &mem);
		(void)dvs_vq_enable_kicks(&vq, &mem);
		break;
	}
	case 1: {
		struct dvs_blk_result res;
		(void)dvs_blk_process(blk, &vq, &mem, &res);
		if (vq.in_flight)
			abort(); /* the synchronous backend completes everything it was given */
		break;
	}
	case 2:
	case 3: {
		struct dvs_console_result res;
		if ((mode >> 2) & 1) {
			(void)!write(in_pipe[1], "fuzz input", 10);
			(void)dvs_console_rx(con, &vq, &mem, &res);
			char sink[64];
			while (read(in_pipe[0], sink, sizeof(sink)) > 0) {
			}
		} else {
			(void)dvs_console_tx(con, &vq, &mem, &res);
		}
		/* the console keeps at most one chain per direction; start clean next time */
		dvs_console_destroy(con);
		struct dvs_console_config ccfg = { .in_fd = in_pipe[0], .out_fd = null_fd };
		if (dvs_console_create(&ccfg, &con))
			abort();
		break;
	}
	}
	return 0;
}
