/*
 * fuse_decoder_fuzz.c -- libFuzzer harness for CntrFS's request decoder and dispatcher, built
 * with AddressSanitizer so out-of-bounds reads of a malformed request are findings even when
 * they would not crash. Not part of the Python extension (csrc/fuzz is excluded).
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc csrc/fuzz/fuse_decoder_fuzz.c \
 *         csrc/fuse/[a-z]*.c csrc/sys/sys.c -lpthread -o /tmp/fuse_fuzz
 *   sudo /tmp/fuse_fuzz -max_total_time=60 -rss_limit_mb=4096
 *
 * Each input is one raw request (as read from /dev/fuse), served by a server without a mount
 * (DVS_FUSE_NO_DEVICE) over a scratch directory; the first request of the run is a valid
 * FUSE_INIT so that every opcode is reachable.
 */
#define _GNU_SOURCE
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuse/cntrfs.h"

static struct dvs_fuse_server *server;
static uint8_t reply[(1 << 20) + 8192];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	static char top[] = "/tmp/dvs-fuse-fuzz-XXXXXX";
	char path[256];
	if (!mkdtemp(top))
		abort();
	snprintf(path, sizeof(path), "%s/file", top);
	FILE *f = fopen(path, "w");
	if (f) {
		fputs("content", f);
		fclose(f);
	}
	snprintf(path, sizeof(path), "%s/dir", top);
	mkdir(path, 0755);
	struct dvs_fuse_config cfg;
	memset(&cfg, 0, sizeof(cfg));
	cfg.source = top;
	cfg.flags = DVS_FUSE_NO_DEVICE;
	cfg.entry_timeout_ns = 1000000000ull;
	cfg.attr_timeout_ns = 1000000000ull;
	if (dvs_fuse_new(&cfg, &server) < 0 || dvs_fuse_start(server) < 0)
		abort();
	struct {
		struct fuse_in_header h;
		struct fuse_init_in init;
	} init;
	memset(&init, 0, sizeof(init));
	init.h.len = sizeof(init);
	init.h.opcode = FUSE_INIT;
	init.h.unique = 1;
	init.init.major = 7;
	init.init.minor = 45;
	init.init.max_readahead = 131072;
	init.init.flags = 0x7fffffff;
	init.init.flags2 = 0xffff;
	uint32_t len;
	dvs_fuse_fuzz_request(server, (const uint8_t *)&init, sizeof(init), reply, sizeof(reply), &len);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint32_t len = 0;
	if (size > (1 << 20))
		return 0;
	dvs_fuse_fuzz_request(server, data, (uint32_t)size, reply, sizeof(reply), &len);
	if (len >= sizeof(struct fuse_out_header)) {
		const struct fuse_out_header *out = (const void *)reply;
		if (out->len != len || out->error > 0 || out->error < -4095)
			abort(); /* a malformed reply */
	}
	return 0;
}
