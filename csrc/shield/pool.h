/*
 * pool.h -- a second core for AES-GCM on large requests (internal to the sealed volume).
 *
 * One helper thread per volume, started on the first large request when the machine has
 * more than one CPU. A job is n independent items (seal or open one block); the caller and
 * the helper claim small batches of items under a mutex and the caller returns only when
 * every item has finished, so nothing decrypted leaves before its tag checked out. The
 * caller works through the items itself too: a helper that is not scheduled (a loaded
 * machine) costs one wake-up, never a wait for it to start. Each thread has its own
 * EVP_CIPHER_CTX (a context is not safe to share), keyed with the same key; the nonces
 * come from the items, which the volume assigns before the job starts.
 */
#ifndef DVS_SHIELD_POOL_H
#define DVS_SHIELD_POOL_H

#include <stdint.h>

#include "shield/crypto.h"

struct dvs_crypto_pool;

/* One item: 0 or -errno. Must touch nothing but what item i owns. */
typedef int (*dvs_pool_fn)(void *arg, struct dvs_gcm *g, uint32_t i);

/* Start the helper with its own copy of the keyed context g. */
int dvs_pool_start(struct dvs_crypto_pool **out, const struct dvs_gcm *g);
/* Stop and join the helper; its context (key schedule) is wiped. */
void dvs_pool_stop(struct dvs_crypto_pool *p);
/* Run fn(arg, ctx, i) for every i < n on the caller (with own) and the helper; returns
 * after all of them: 0, or the result of the lowest failing item (its index in *failed). */
int dvs_pool_run(struct dvs_crypto_pool *p, struct dvs_gcm *own, dvs_pool_fn fn, void *arg,
		 uint32_t n, uint32_t *failed);

#endif
