/*
 * backends.h -- the engines behind the dvs_engine_* facade of uring.h (internal): the
 * thread-pool fallback and the fault-injecting memory disk.
 */
#ifndef DVS_URING_BACKENDS_H
#define DVS_URING_BACKENDS_H

#include "uring/uring.h"

struct dvs_threads;
int dvs_threads_create(uint32_t entries, uint32_t n_threads, struct dvs_threads **out);
int dvs_threads_register_files(struct dvs_threads *t, const int32_t *fds, uint32_t n);
int dvs_threads_enable(struct dvs_threads *t);
int dvs_threads_update_file(struct dvs_threads *t, uint32_t index, int32_t fd);
int dvs_threads_submit(struct dvs_threads *t, const struct dvs_io *ios, uint32_t n);
int dvs_threads_reap(struct dvs_threads *t, struct dvs_io_done *out, uint32_t max,
		     uint32_t min_wait);
int dvs_threads_stats(struct dvs_threads *t, struct dvs_io_stats *out);
int dvs_threads_max_in_flight(struct dvs_threads *t);
int dvs_threads_destroy(struct dvs_threads *t);

struct dvs_memdisk;
int dvs_memdisk_create(uint32_t entries, struct dvs_memdisk **out);
int dvs_memdisk_register_files(struct dvs_memdisk *m, uint32_t n);
int dvs_memdisk_submit(struct dvs_memdisk *m, const struct dvs_io *ios, uint32_t n);
int dvs_memdisk_reap(struct dvs_memdisk *m, struct dvs_io_done *out, uint32_t max);
int dvs_memdisk_stats(struct dvs_memdisk *m, struct dvs_io_stats *out);
int dvs_memdisk_max_in_flight(struct dvs_memdisk *m);
int dvs_memdisk_destroy(struct dvs_memdisk *m);
int dvs_memdisk_set_fail_after(struct dvs_memdisk *m, int64_t ops);
int dvs_memdisk_power_loss(struct dvs_memdisk *m, uint32_t mode, uint64_t seed);
int dvs_memdisk_peek_page(struct dvs_memdisk *m, uint32_t file, uint64_t page, uint8_t *out);
int dvs_memdisk_poke_page(struct dvs_memdisk *m, uint32_t file, uint64_t page,
			  const uint8_t *in);
int64_t dvs_memdisk_page_list(struct dvs_memdisk *m, uint32_t file, uint64_t *out,
			      uint64_t max);
int64_t dvs_memdisk_log_len(struct dvs_memdisk *m);
int dvs_memdisk_copy_file(struct dvs_memdisk *m, uint32_t file, uint32_t into);

#endif
