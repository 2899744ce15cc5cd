/*
 * uring_loop.c -- the plain C baseline for benchmarks/bench_shield.py: the loop an
 * experienced liburing user writes (io_uring_queue_init, registered buffers, keep QD
 * requests in flight, io_uring_submit_and_wait(1) then drain every CQE with
 * io_uring_peek_batch_cqe and refill), or the same workload with pread/pwrite.
 *
 *   uring_loop ENGINE MODE FILE FILE_BYTES BS QD OPS DIRECT SYNC
 *     ENGINE  uring | psync
 *     MODE    randread | randwrite | seqread | seqwrite
 *     DIRECT  0 | 1 (O_DIRECT)
 *     SYNC    0 | 1 (an fdatasync at the end, inside the timing: durable writes)
 * Prints one line: "ops=N seconds=S". Syscalls are counted from outside (perf).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rng_state = 88172645463325252ULL;
static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static uint64_t offset_of(uint64_t i, int random, uint64_t file_bytes, uint64_t bs)
{
	uint64_t slots = file_bytes / bs;
	return (random ? rng() % slots : i % slots) * bs;
}

int main(int argc, char **argv)
{
	if (argc != 10) {
		fprintf(stderr, "usage: %s uring|psync MODE FILE FILE_BYTES BS QD OPS DIRECT SYNC\n",
			argv[0]);
		return 2;
	}
	int use_uring = !strcmp(argv[1], "uring");
	const char *mode = argv[2];
	int write = strstr(mode, "write") != NULL;
	int random = !strncmp(mode, "rand", 4);
	uint64_t file_bytes = strtoull(argv[4], NULL, 0);
	uint64_t bs = strtoull(argv[5], NULL, 0);
	unsigned qd = (unsigned)strtoul(argv[6], NULL, 0);
	uint64_t ops = strtoull(argv[7], NULL, 0);
	int direct = atoi(argv[8]);
	int sync = atoi(argv[9]);
	int fd = open(argv[3], (write ? O_RDWR : O_RDONLY) | (direct ? O_DIRECT : 0));
	if (fd < 0) {
		perror("open");
		return 1;
	}
	size_t buf_bytes = (size_t)bs * qd;
	char *bufs = mmap(NULL, buf_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (bufs == MAP_FAILED)
		return 1;
	memset(bufs, 0x5a, buf_bytes);
	double t0, t1;
	if (!use_uring) {
		t0 = now();
		for (uint64_t i = 0; i < ops; i++) {
			uint64_t off = offset_of(i, random, file_bytes, bs);
			ssize_t n = write ? pwrite(fd, bufs, bs, (off_t)off) : pread(fd, bufs, bs, (off_t)off);
			if (n != (ssize_t)bs) {
				fprintf(stderr, "short transfer %zd\n", n);
				return 1;
			}
		}
		if (sync && fdatasync(fd) < 0) {
			perror("fdatasync");
			return 1;
		}
		t1 = now();
	} else {
		struct io_uring ring;
		int ret = io_uring_queue_init(qd < 2 ? 2 : qd, &ring, 0);
		if (ret < 0) {
			fprintf(stderr, "queue_init: %s\n", strerror(-ret));
			return 1;
		}
		struct iovec *iov = calloc(qd, sizeof(*iov));
		for (unsigned i = 0; i < qd; i++) {
			iov[i].iov_base = bufs + (size_t)i * bs;
			iov[i].iov_len = bs;
		}
		ret = io_uring_register_buffers(&ring, iov, qd);
		if (ret < 0) {
			fprintf(stderr, "register_buffers: %s\n", strerror(-ret));
			return 1;
		}
		uint64_t sent = 0, done = 0;
		unsigned *free_bufs = calloc(qd, sizeof(unsigned)), n_free = qd;
		for (unsigned i = 0; i < qd; i++)
			free_bufs[i] = i;
		struct io_uring_cqe *cqes[256];
		t0 = now();
		while (done < ops) {
			while (sent < ops && n_free) {
				struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
				if (!sqe)
					break;
				unsigned b = free_bufs[--n_free];
				uint64_t off = offset_of(sent, random, file_bytes, bs);
				if (write)
					io_uring_prep_write_fixed(sqe, fd, iov[b].iov_base, (unsigned)bs, off, (int)b);
				else
					io_uring_prep_read_fixed(sqe, fd, iov[b].iov_base, (unsigned)bs, off, (int)b);
				io_uring_sqe_set_data64(sqe, b);
				sent++;
			}
			ret = io_uring_submit_and_wait(&ring, 1);
			if (ret < 0 && ret != -EINTR) {
				fprintf(stderr, "submit: %s\n", strerror(-ret));
				return 1;
			}
			unsigned got = io_uring_peek_batch_cqe(&ring, cqes, 256);
			for (unsigned i = 0; i < got; i++) {
				if (cqes[i]->res != (int)bs) {
					fprintf(stderr, "transfer: %d\n", cqes[i]->res);
					return 1;
				}
				free_bufs[n_free++] = (unsigned)io_uring_cqe_get_data64(cqes[i]);
			}
			io_uring_cq_advance(&ring, got);
			done += got;
		}
		if (sync) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
			struct io_uring_cqe *cqe;
			io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
			io_uring_submit_and_wait(&ring, 1);
			if (io_uring_wait_cqe(&ring, &cqe) < 0 || cqe->res < 0) {
				fprintf(stderr, "fdatasync failed\n");
				return 1;
			}
			io_uring_cqe_seen(&ring, cqe);
		}
		t1 = now();
		io_uring_queue_exit(&ring);
	}
	printf("ops=%llu seconds=%.6f\n", (unsigned long long)ops, t1 - t0);
	return 0;
}
