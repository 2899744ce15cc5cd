/*
 * fsbench.c -- metadata micro-benchmarks for bench_fs.py, in C so the loop costs nothing
 * next to the filesystem (a Python loop would hide the differences being measured).
 *
 *   fsbench stat DIR N ROUNDS      stat() of DIR/0 .. DIR/N-1, ROUNDS times
 *   fsbench create DIR N SIZE      per file: open(O_CREAT) + write SIZE + close + unlink
 *   fsbench readdir DIR ROUNDS     opendir + readdir to the end + closedir, ROUNDS times
 *   fsbench mkfiles DIR N          create N empty files (set-up)
 * Output: one JSON object per line, {"op": ..., "round": i, "ops_per_s": x, "entries": n}.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int die(const char *what, const char *path)
{
	fprintf(stderr, "fsbench: %s %s: %s\n", what, path, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	char path[4096];
	if (argc < 4) {
		fprintf(stderr, "usage: fsbench stat|create|readdir|mkfiles DIR ...\n");
		return 2;
	}
	const char *op = argv[1], *dir = argv[2];
	if (!strcmp(op, "mkfiles")) {
		long n = atol(argv[3]);
		for (long i = 0; i < n; i++) {
			snprintf(path, sizeof(path), "%s/%ld", dir, i);
			int fd = open(path, O_CREAT | O_WRONLY, 0644);
			if (fd < 0)
				return die("create", path);
			close(fd);
		}
		return 0;
	}
	if (!strcmp(op, "stat") && argc >= 5) {
		long n = atol(argv[3]), rounds = atol(argv[4]);
		for (long r = 0; r < rounds; r++) {
			double t0 = now();
			struct stat st;
			for (long i = 0; i < n; i++) {
				snprintf(path, sizeof(path), "%s/%ld", dir, i);
				if (stat(path, &st) < 0)
					return die("stat", path);
			}
			double dt = now() - t0;
			printf("{\"op\": \"stat\", \"round\": %ld, \"ops_per_s\": %.1f}\n", r, n / dt);
		}
		return 0;
	}
	if (!strcmp(op, "create") && argc >= 5) {
		long n = atol(argv[3]), size = atol(argv[4]);
		char *buf = calloc(1, (size_t)size + 1);
		memset(buf, 'x', (size_t)size);
		double t0 = now();
		for (long i = 0; i < n; i++) {
			snprintf(path, sizeof(path), "%s/c%ld", dir, i);
			int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
			if (fd < 0)
				return die("create", path);
			if (write(fd, buf, (size_t)size) != size)
				return die("write", path);
			close(fd);
			if (unlink(path) < 0)
				return die("unlink", path);
		}
		double dt = now() - t0;
		printf("{\"op\": \"create\", \"round\": 0, \"ops_per_s\": %.1f}\n", n / dt);
		free(buf);
		return 0;
	}
	if (!strcmp(op, "readdir")) {
		long rounds = atol(argv[3]);
		for (long r = 0; r < rounds; r++) {
			double t0 = now();
			DIR *d = opendir(dir);
			if (!d)
				return die("opendir", dir);
			long entries = 0;
			while (readdir(d))
				entries++;
			closedir(d);
			double dt = now() - t0;
			printf("{\"op\": \"readdir\", \"round\": %ld, \"ops_per_s\": %.2f, \"entries\": %ld}\n",
			       r, 1.0 / dt, entries);
		}
		return 0;
	}
	fprintf(stderr, "fsbench: bad arguments\n");
	return 2;
}
