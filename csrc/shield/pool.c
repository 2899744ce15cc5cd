/*
 * pool.c -- the helper thread that shares AES-GCM work with the caller (see pool.h).
 *
 * Relies on POSIX threads: a mutex acquire/release orders memory, so what the helper wrote
 * into an item's output before it counted the batch done (under the mutex) is visible to
 * the caller after it sees the count (under the same mutex).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "shield/pool.h"

#define CLAIM 8u /* items per claim: 32 KiB of AES-GCM, ~15 us, few lock round trips */

struct dvs_crypto_pool {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t work;     /* a job was posted, or stop */
	pthread_cond_t finished; /* the job's last item finished */
	struct dvs_gcm gcm;      /* the helper's own context */
	int stop, sleeping;
	/* the current job (under lock) */
	uint64_t gen;
	dvs_pool_fn fn;
	void *arg;
	uint32_t n, next, done;
	int first_ret;
	uint32_t first_fail;
};

static void record(struct dvs_crypto_pool *p, uint32_t i, int ret)
{
	if (ret && (!p->first_ret || i < p->first_fail)) {
		p->first_ret = ret;
		p->first_fail = i;
	}
}

/* Claim and run batches of the current job until none is left; lock held on entry and
 * exit. */
static void work_through(struct dvs_crypto_pool *p, struct dvs_gcm *g)
{
	while (p->next < p->n) {
		uint32_t from = p->next, to = from + CLAIM < p->n ? from + CLAIM : p->n;
		p->next = to;
		dvs_pool_fn fn = p->fn;
		void *arg = p->arg;
		pthread_mutex_unlock(&p->lock);
		int ret = 0;
		uint32_t bad = 0;
		for (uint32_t i = from; i < to; i++) {
			int r = fn(arg, g, i);
			if (r && !ret) {
				ret = r;
				bad = i;
			}
		}
		pthread_mutex_lock(&p->lock);
		record(p, bad, ret);
		p->done += to - from;
		if (p->done == p->n)
			pthread_cond_signal(&p->finished);
	}
}

static void *helper(void *arg)
{
	struct dvs_crypto_pool *p = arg;
	pthread_mutex_lock(&p->lock);
	while (!p->stop) {
		if (p->next < p->n) {
			work_through(p, &p->gcm);
			continue;
		}
		p->sleeping = 1;
		pthread_cond_wait(&p->work, &p->lock);
		p->sleeping = 0;
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int dvs_pool_start(struct dvs_crypto_pool **out, const struct dvs_gcm *g)
{
	struct dvs_crypto_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	int ret = dvs_gcm_clone(&p->gcm, g);
	if (ret) {
		free(p);
		return ret;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->work, NULL);
	pthread_cond_init(&p->finished, NULL);
	/* the helper takes no signals: they stay with the threads that expect them */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	ret = -pthread_create(&p->thread, NULL, helper, p);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!ret)
		pthread_setname_np(p->thread, "dvs-gcm");
	if (ret) {
		dvs_gcm_free(&p->gcm);
		pthread_mutex_destroy(&p->lock);
		pthread_cond_destroy(&p->work);
		pthread_cond_destroy(&p->finished);
		free(p);
		return ret;
	}
	*out = p;
	return 0;
}

void dvs_pool_stop(struct dvs_crypto_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = 1;
	pthread_cond_signal(&p->work);
	pthread_mutex_unlock(&p->lock);
	pthread_join(p->thread, NULL);
	dvs_gcm_free(&p->gcm);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->work);
	pthread_cond_destroy(&p->finished);
	free(p);
}

int dvs_pool_run(struct dvs_crypto_pool *p, struct dvs_gcm *own, dvs_pool_fn fn, void *arg,
		 uint32_t n, uint32_t *failed)
{
	if (!n)
		return 0;
	pthread_mutex_lock(&p->lock);
	p->gen++;
	p->fn = fn;
	p->arg = arg;
	p->n = n;
	p->next = 0;
	p->done = 0;
	p->first_ret = 0;
	p->first_fail = 0;
	if (p->sleeping)
		pthread_cond_signal(&p->work);
	work_through(p, own);
	/* the helper may still run its last batch: the items' outputs are not complete
	 * (or not checked) before it is counted */
	while (p->done < p->n)
		pthread_cond_wait(&p->finished, &p->lock);
	int ret = p->first_ret;
	if (ret && failed)
		*failed = p->first_fail;
	p->n = p->next = p->done = 0;
	p->fn = NULL;
	p->arg = NULL;
	pthread_mutex_unlock(&p->lock);
	return ret;
}
