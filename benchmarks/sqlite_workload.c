/*
 * sqlite_workload.c -- the mixed SQLite workload of benchmarks/bench_shield.py in C, so
 * the same driver runs on a plain file, on the dvs sealed-volume VFS (-DWITH_DVS, linked
 * with the dvs C core) and on SQLCipher (-DWITH_SQLCIPHER, Debian's libsqlcipher).
 *
 * Per round: one transaction inserting 500 rows; 200 point selects through a text index;
 * 50 range aggregates through an integer index; one transaction updating 200 rows by key.
 * Default SQLite settings (journal_mode=DELETE, synchronous=FULL), 4 KiB pages everywhere
 * (SQLCipher's cipher_page_size set to 4096 to match).
 *
 *   sqlite_workload DBPATH ROUNDS     prints "statements=N seconds=S"
 */
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef WITH_DVS
#include "shield/shield.h"
#endif

static uint64_t state = 0x2545F4914F6CDD1DULL;
static uint32_t rnd(uint32_t n)
{
	state ^= state << 13;
	state ^= state >> 7;
	state ^= state << 17;
	return (uint32_t)(state % n);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(sqlite3 *db, const char *what)
{
	fprintf(stderr, "%s: %s\n", what, db ? sqlite3_errmsg(db) : "?");
	exit(1);
}

static void exec(sqlite3 *db, const char *sql)
{
	char *err = NULL;
	if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
		fprintf(stderr, "%s: %s\n", sql, err);
		exit(1);
	}
}

static sqlite3_stmt *prep(sqlite3 *db, const char *sql)
{
	sqlite3_stmt *st;
	if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
		die(db, sql);
	return st;
}

static void run(sqlite3 *db, sqlite3_stmt *st)
{
	int rc;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		;
	if (rc != SQLITE_DONE)
		die(db, "step");
	sqlite3_reset(st);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s DBPATH ROUNDS\n", argv[0]);
		return 2;
	}
	const char *vfs = NULL;
#ifdef WITH_DVS
	struct dvs_vfs_config cfg;
	memset(&cfg, 0, sizeof(cfg));
	cfg.name = "dvs-bench";
	cfg.kdf = DVS_KDF_RAW;
	for (int i = 0; i < 32; i++)
		cfg.secret[i] = (uint8_t)i;
	cfg.capacity_blocks = 1u << 20;
	cfg.engine_kind = getenv("DVS_ENGINE") && !strcmp(getenv("DVS_ENGINE"), "threads")
				  ? DVS_ENGINE_THREADS
				  : DVS_ENGINE_RING;
	cfg.read_slots = 32;
	cfg.write_slots = 256;
	if (dvs_vfs_register(&cfg) < 0) {
		fprintf(stderr, "dvs_vfs_register failed\n");
		return 1;
	}
	vfs = "dvs-bench";
#endif
	sqlite3 *db;
	if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, vfs) !=
	    SQLITE_OK)
		die(db, "open");
#ifdef WITH_SQLCIPHER
	exec(db, "pragma key = 'dvs benchmark passphrase'");
	exec(db, "pragma cipher_page_size = 4096");
#endif
	exec(db, "create table if not exists items(id integer primary key, category integer, "
		 "name text, price real, stock integer, payload text)");
	exec(db, "create index if not exists items_category on items(category)");
	exec(db, "create index if not exists items_name on items(name)");
	sqlite3_stmt *ins = prep(db, "insert into items values (?, ?, ?, ?, ?, ?)");
	sqlite3_stmt *point = prep(db, "select price, stock from items where name = ?");
	sqlite3_stmt *range = prep(db, "select count(*), sum(price) from items where category = ?");
	sqlite3_stmt *upd = prep(db, "update items set stock = stock - 1 where id = ?");
	int rounds = atoi(argv[2]);
	long statements = 0;
	int next_id = 1;
	char name[32], payload[400];
	double t0 = now();
	for (int r = 0; r < rounds; r++) {
		exec(db, "begin");
		for (int i = 0; i < 500; i++, next_id++) {
			snprintf(name, sizeof(name), "item-%08d", next_id);
			int len = 50 + (int)rnd(250);
			memset(payload, 'p', (size_t)len);
			payload[len] = 0;
			sqlite3_bind_int(ins, 1, next_id);
			sqlite3_bind_int(ins, 2, (int)rnd(100));
			sqlite3_bind_text(ins, 3, name, -1, SQLITE_TRANSIENT);
			sqlite3_bind_double(ins, 4, rnd(10000) / 100.0);
			sqlite3_bind_int(ins, 5, (int)rnd(1000));
			sqlite3_bind_text(ins, 6, payload, -1, SQLITE_TRANSIENT);
			run(db, ins);
		}
		exec(db, "commit");
		for (int i = 0; i < 200; i++) {
			snprintf(name, sizeof(name), "item-%08d", 1 + (int)rnd((uint32_t)next_id - 1));
			sqlite3_bind_text(point, 1, name, -1, SQLITE_TRANSIENT);
			run(db, point);
		}
		for (int i = 0; i < 50; i++) {
			sqlite3_bind_int(range, 1, (int)rnd(100));
			run(db, range);
		}
		exec(db, "begin");
		for (int i = 0; i < 200; i++) {
			sqlite3_bind_int(upd, 1, 1 + (int)rnd((uint32_t)next_id - 1));
			run(db, upd);
		}
		exec(db, "commit");
		statements += 950;
	}
	double t1 = now();
	sqlite3_finalize(ins);
	sqlite3_finalize(point);
	sqlite3_finalize(range);
	sqlite3_finalize(upd);
	if (sqlite3_close(db) != SQLITE_OK)
		die(db, "close");
	printf("statements=%ld seconds=%.6f\n", statements, t1 - t0);
	return 0;
}
