/*
 * crypto.c -- AES-256-GCM, scrypt and HKDF through OpenSSL 3 (see crypto.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <string.h>

#include "shield/crypto.h"

/* Algorithms fetched from the provider once: an implicit fetch (EVP_aes_256_gcm() in an
 * init, EVP_KDF_fetch) takes the provider's locks and lookups every time, which a volume
 * per SQLite journal (one per transaction) would pay on each open. */
static EVP_CIPHER *gcm_cipher, *siv_cipher;
static EVP_KDF *hkdf_kdf;
static pthread_once_t fetch_once = PTHREAD_ONCE_INIT;

static void fetch_algorithms(void)
{
	gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	siv_cipher = EVP_CIPHER_fetch(NULL, "AES-256-SIV", NULL);
	hkdf_kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
}

int dvs_gcm_init(struct dvs_gcm *g, const uint8_t key[32])
{
	pthread_once(&fetch_once, fetch_algorithms);
	if (!gcm_cipher)
		return -EOPNOTSUPP;
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	if (EVP_CipherInit_ex(ctx, gcm_cipher, NULL, NULL, NULL, 1) != 1 ||
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1 ||
	    EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, 1) != 1) {
		EVP_CIPHER_CTX_free(ctx);
		return -EINVAL;
	}
	g->ctx = ctx;
	return 0;
}

int dvs_gcm_clone(struct dvs_gcm *dst, const struct dvs_gcm *src)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	if (EVP_CIPHER_CTX_copy(ctx, src->ctx) != 1) {
		EVP_CIPHER_CTX_free(ctx);
		return -EINVAL;
	}
	dst->ctx = ctx;
	return 0;
}

void dvs_gcm_free(struct dvs_gcm *g)
{
	if (g->ctx)
		EVP_CIPHER_CTX_free(g->ctx); /* wipes the key schedule */
	g->ctx = NULL;
}

int dvs_gcm_seal(struct dvs_gcm *g, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
		 const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16])
{
	EVP_CIPHER_CTX *ctx = g->ctx;
	int n;
	if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1) != 1 ||
	    (aad_len && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1) ||
	    EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1 ||
	    EVP_CipherFinal_ex(ctx, out + n, &n) != 1 ||
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
		return -EIO;
	return 0;
}

int dvs_gcm_open(struct dvs_gcm *g, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
		 const uint8_t *in, uint8_t *out, size_t len, const uint8_t tag[16])
{
	EVP_CIPHER_CTX *ctx = g->ctx;
	int n;
	if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0) != 1 ||
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, (void *)tag) != 1 ||
	    (aad_len && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1) ||
	    EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1) {
		dvs_wipe(out, len);
		return -EIO;
	}
	if (EVP_CipherFinal_ex(ctx, out + n, &n) != 1) {
		/* the tag does not match: never hand out what was decrypted */
		dvs_wipe(out, len);
		return -EBADMSG;
	}
	return 0;
}

static int siv(int enc, const uint8_t key[64], const uint8_t *aad, size_t aad_len,
	       const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16])
{
	pthread_once(&fetch_once, fetch_algorithms);
	if (!siv_cipher)
		return -EOPNOTSUPP;
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	int n, ret = -EIO;
	if (EVP_CipherInit_ex2(ctx, siv_cipher, key, NULL, enc, NULL) != 1 ||
	    (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, tag) != 1) ||
	    EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
		goto out;
	if (EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1 ||
	    EVP_CipherFinal_ex(ctx, out + n, &n) != 1) {
		/* decryption: the synthetic IV does not match, nothing may be used */
		ret = enc ? -EIO : -EBADMSG;
		goto out;
	}
	if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) != 1)
		goto out;
	ret = 0;
out:
	if (ret)
		dvs_wipe(out, len);
	EVP_CIPHER_CTX_free(ctx);
	return ret;
}

int dvs_siv_seal(const uint8_t key[64], const uint8_t *aad, size_t aad_len, const uint8_t *in,
		 uint8_t *out, size_t len, uint8_t tag[16])
{
	return siv(1, key, aad, aad_len, in, out, len, tag);
}

int dvs_siv_open(const uint8_t key[64], const uint8_t *aad, size_t aad_len, const uint8_t *in,
		 uint8_t *out, size_t len, const uint8_t tag[16])
{
	return siv(0, key, aad, aad_len, in, out, len, (uint8_t *)tag);
}

int dvs_scrypt(const uint8_t *pass, size_t pass_len, const uint8_t *salt, size_t salt_len,
	       uint32_t log2_n, uint32_t r, uint32_t p, uint8_t out[32])
{
	if (log2_n < 1 || log2_n > 30)
		return -EINVAL;
	uint64_t n = 1ULL << log2_n;
	/* scrypt needs 128*r*N bytes (+ 128*r*p); allow that with headroom */
	uint64_t maxmem = 128ULL * r * (n + p + 2) + (1u << 20);
	if (EVP_PBE_scrypt((const char *)pass, pass_len, salt, salt_len, n, r, p, maxmem, out,
			   32) != 1)
		return -EINVAL;
	return 0;
}

int dvs_hkdf(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt, size_t salt_len,
	     const char *info, uint8_t *out, size_t out_len)
{
	pthread_once(&fetch_once, fetch_algorithms);
	if (!hkdf_kdf)
		return -EOPNOTSUPP;
	EVP_KDF_CTX *kctx = EVP_KDF_CTX_new(hkdf_kdf);
	if (!kctx)
		return -ENOMEM;
	OSSL_PARAM params[] = {
		OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, "SHA256", 0),
		OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikm_len),
		OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len),
		OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, strlen(info)),
		OSSL_PARAM_construct_end(),
	};
	int ok = EVP_KDF_derive(kctx, out, out_len, params) == 1;
	EVP_KDF_CTX_free(kctx);
	return ok ? 0 : -EIO;
}

int dvs_random(uint8_t *out, size_t len)
{
	return RAND_bytes(out, (int)len) == 1 ? 0 : -EIO;
}

void dvs_wipe(void *p, size_t len)
{
	OPENSSL_cleanse(p, len);
}
