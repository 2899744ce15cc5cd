/*
 * blkbench.c -- a tiny static block-device benchmark that runs inside test guests (fio is
 * not in the guest kit). Built by benchmarks/bench_virtio.py with `gcc -static -O2 -pthread`
 * and shipped to the guest on a small read-only disk.
 *
 *   blkbench seqread|seqwrite DEVICE BLOCK_BYTES TOTAL_MIB
 *   blkbench randread|randwrite DEVICE BLOCK_BYTES SECONDS THREADS SPAN_MIB
 *
 * All I/O is O_DIRECT (the guest page cache is bypassed, so every operation is a virtio
 * request), with 4096-aligned buffers. Random offsets are uniform over the first SPAN_MIB of
 * the device, aligned to the block size; each thread keeps one request in flight, so THREADS
 * is the queue depth. Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *device;
static size_t block;
static uint64_t span_blocks;
static int writing;
static double deadline;
static volatile int failed;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct worker {
	pthread_t thread;
	uint64_t seed;
	uint64_t ops;
};

static void *random_io(void *arg)
{
	struct worker *w = arg;
	int fd = open(device, (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
	void *buf;
	if (fd < 0 || posix_memalign(&buf, 4096, block)) {
		failed = 1;
		return NULL;
	}
	memset(buf, 0x5a, block);
	uint64_t x = w->seed;
	while (now() < deadline) {
		for (int i = 0; i < 16; i++) {
			x ^= x << 13; /* xorshift64 */
			x ^= x >> 7;
			x ^= x << 17;
			off_t off = (off_t)((x % span_blocks) * block);
			ssize_t r = writing ? pwrite(fd, buf, block, off) : pread(fd, buf, block, off);
			if (r != (ssize_t)block) {
				failed = 1;
				return NULL;
			}
			w->ops++;
		}
	}
	close(fd);
	free(buf);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: see blkbench.c\n");
		return 2;
	}
	const char *mode = argv[1];
	device = argv[2];
	block = strtoull(argv[3], NULL, 0);
	double started, elapsed;
	uint64_t ops = 0;
	if (!strncmp(mode, "seq", 3)) {
		writing = !strcmp(mode, "seqwrite");
		uint64_t total = strtoull(argv[4], NULL, 0) << 20;
		int fd = open(device, (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
		void *buf;
		if (fd < 0 || posix_memalign(&buf, 4096, block))
			return perror(device), 1;
		memset(buf, 0xa5, block);
		started = now();
		for (uint64_t off = 0; off + block <= total; off += block, ops++) {
			ssize_t r = writing ? pwrite(fd, buf, block, (off_t)off)
					    : pread(fd, buf, block, (off_t)off);
			if (r != (ssize_t)block)
				return perror("io"), 1;
		}
		/* No fdatasync: O_DIRECT writes are complete when the device says so, and a FLUSH
		 * would compare durability policies (qemu-storage-daemon's export is write-through
		 * and never sees one) rather than data paths. */
		elapsed = now() - started;
	} else {
		if (argc < 7)
			return 2;
		writing = !strcmp(mode, "randwrite");
		double seconds = strtod(argv[4], NULL);
		int threads = atoi(argv[5]);
		span_blocks = (strtoull(argv[6], NULL, 0) << 20) / block;
		struct worker *ws = calloc((size_t)threads, sizeof(*ws));
		started = now();
		deadline = started + seconds;
		for (int i = 0; i < threads; i++) {
			ws[i].seed = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
			pthread_create(&ws[i].thread, NULL, random_io, &ws[i]);
		}
		for (int i = 0; i < threads; i++) {
			pthread_join(ws[i].thread, NULL);
			ops += ws[i].ops;
		}
		elapsed = now() - started;
		if (failed)
			return fprintf(stderr, "I/O failed\n"), 1;
	}
	double bytes = (double)ops * (double)block;
	printf("{\"mode\": \"%s\", \"block\": %zu, \"ops\": %llu, \"seconds\": %.3f, "
	       "\"mb_per_s\": %.2f, \"iops\": %.1f}\n",
	       mode, block, (unsigned long long)ops, elapsed, bytes / elapsed / 1e6,
	       (double)ops / elapsed);
	return 0;
}
