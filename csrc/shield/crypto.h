/*
 * crypto.h -- the sealed volume's cryptography over OpenSSL 3 libcrypto (internal).
 *
 * AES-256-GCM: a 96-bit nonce must never repeat under one key (a repeat leaks the XOR of
 * the plaintexts and lets an attacker forge tags); the tag authenticates ciphertext and
 * associated data together. One EVP_CIPHER_CTX per volume is keyed once and re-initialised
 * per block with only a new IV (EVP_CipherInit_ex with NULL cipher and key keeps the key
 * schedule), switching direction with the enc flag.
 * AES-256-SIV (RFC 5297) seals the superblock: a deterministic AEAD whose synthetic IV is
 * a MAC of the associated data and the plaintext, so it needs no nonce that must stay
 * unique -- a superblock write that a crash loses may be repeated with the same inputs
 * without harm (repeating them only shows two identical messages). Its key is 64 bytes.
 * scrypt (RFC 7914) turns a passphrase into the master key; HKDF-SHA256 (RFC 5869) derives
 * independent per-volume keys from the master key and the volume id.
 */
#ifndef DVS_SHIELD_CRYPTO_H
#define DVS_SHIELD_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

struct dvs_gcm {
	void *ctx; /* EVP_CIPHER_CTX * */
};

int dvs_gcm_init(struct dvs_gcm *g, const uint8_t key[32]);
/* A second context with the same key, for another thread (a context is not shared). */
int dvs_gcm_clone(struct dvs_gcm *dst, const struct dvs_gcm *src);
void dvs_gcm_free(struct dvs_gcm *g);
/* Encrypt len bytes in -> out (may alias), tag out. */
int dvs_gcm_seal(struct dvs_gcm *g, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
		 const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16]);
/* Decrypt and verify; -EBADMSG on a bad tag, and then out holds no plaintext (wiped). */
int dvs_gcm_open(struct dvs_gcm *g, const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
		 const uint8_t *in, uint8_t *out, size_t len, const uint8_t tag[16]);

/* AES-256-SIV over one associated-data string: in -> out (len bytes), 16-byte tag (the
 * synthetic IV). open: -EBADMSG when it does not authenticate, and out is wiped. */
int dvs_siv_seal(const uint8_t key[64], const uint8_t *aad, size_t aad_len, const uint8_t *in,
		 uint8_t *out, size_t len, uint8_t tag[16]);
int dvs_siv_open(const uint8_t key[64], const uint8_t *aad, size_t aad_len, const uint8_t *in,
		 uint8_t *out, size_t len, const uint8_t tag[16]);

int dvs_scrypt(const uint8_t *pass, size_t pass_len, const uint8_t *salt, size_t salt_len,
	       uint32_t log2_n, uint32_t r, uint32_t p, uint8_t out[32]);
int dvs_hkdf(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt, size_t salt_len,
	     const char *info, uint8_t *out, size_t out_len);
int dvs_random(uint8_t *out, size_t len);
void dvs_wipe(void *p, size_t len);

#endif
