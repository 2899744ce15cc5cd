"""SQLite on sealed volumes, through Python's own sqlite3 module: unmodified SQL, keys and
passphrases, journals and temporary files sealed too, tampered pages reported as
IntegrityError naming file and block, locking between connections and processes, and
crash consistency of committed transactions under SIGKILL."""

from __future__ import annotations

import itertools
import mmap
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvs.errors import IntegrityError
from dvs.lowlevel.shield import BLOCK
from dvs.shield import sqlite as ssql
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(180)

KEY = bytes(range(200, 232))
_names = itertools.count()


@pytest.fixture
def vfs() -> Iterator[ssql.ShieldVfs]:
    v = ssql.register(f"dvs-test-{os.getpid()}-{next(_names)}", key=KEY, capacity=1 << 30)
    yield v
    v.unregister()


def _raw_contains(path: Path, needle: bytes) -> bool:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle) >= 0


def test_unmodified_sql_runs_and_the_file_is_sealed(vfs: ssql.ShieldVfs, tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    db = vfs.connect(path)
    db.executescript(
        """
        create table customer(id integer primary key, name text unique, city text);
        create table orders(id integer primary key, customer integer references customer,
                            total real);
        create index orders_by_customer on orders(customer);
        """
    )
    with db:
        db.executemany(
            "insert into customer(name, city) values (?, ?)",
            [(f"customer-secret-{i}", f"city {i % 7}") for i in range(500)],
        )
        db.executemany(
            "insert into orders(customer, total) values (?, ?)",
            [(1 + i % 500, i * 1.5) for i in range(5000)],
        )
    with db:
        db.execute("update orders set total = total * 2 where customer % 3 = 0")
        db.execute("delete from customer where id > 450")
    rows = db.execute(
        "select c.city, count(*), round(sum(o.total)) from customer c join orders o "
        "on o.customer = c.id group by c.city order by c.city"
    ).fetchall()
    assert len(rows) == 7
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert db.execute("pragma journal_mode").fetchone() == ("delete",)
    db.close()
    assert not _raw_contains(path, b"customer-secret-1"), "plaintext reached the file"
    assert not (tmp_path / "shop.db-journal").exists()
    db = vfs.connect(path)
    assert db.execute("select count(*) from customer").fetchone() == (450,)
    assert db.execute("select name from customer where id = 17").fetchone() == (
        "customer-secret-16",
    )
    db.close()
    info = vfs.info()
    assert info.volumes_formatted >= 2, "the database and its journals are sealed volumes"
    assert info.syncs > 0 and info.open_files == 0


def test_a_tampered_page_raises_integrity_error_naming_it(
    vfs: ssql.ShieldVfs, tmp_path: Path
) -> None:
    path = tmp_path / "t.db"
    db = vfs.connect(path)
    db.execute("create table t(x text)")
    with db:
        db.executemany("insert into t values (?)", [("v" * 500,) for _ in range(2000)])
    db.close()
    with Volume.open(path, key=KEY) as vol:
        page = vol.locate(5)  # the sixth database page
    assert page is not None
    with path.open("r+b") as f:
        f.seek(page * BLOCK + 77)
        byte = f.read(1)
        f.seek(page * BLOCK + 77)
        f.write(bytes([byte[0] ^ 0x20]))
    db = vfs.connect(path)
    with pytest.raises(sqlite3.DatabaseError) as info:
        db.execute("select count(*), max(length(x)) from t").fetchall()
    assert info.value.sqlite_errorcode == ssql.SQLITE_IOERR_DATA
    with pytest.raises(IntegrityError) as integrity:
        with vfs.translate_errors():
            db.execute("select * from t").fetchall()
    assert integrity.value.block == 5 and str(path) in str(integrity.value)
    db.close()


def test_a_passphrase_database_reopens_only_with_the_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    base = f"dvs-pass-{os.getpid()}-{next(_names)}"
    first = ssql.register(base + "a", passphrase="hunter2", database=path, scrypt_log2_n=12)
    db = first.connect(path)
    db.execute("create table t(x)")
    db.execute("insert into t values ('kept')")
    db.commit()
    db.close()
    first.unregister()
    again = ssql.register(base + "b", passphrase="hunter2", database=path)
    db = again.connect(path)
    assert db.execute("select x from t").fetchone() == ("kept",)
    db.close()
    again.unregister()
    wrong = ssql.register(base + "c", passphrase="hunter3", database=path)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        wrong.connect(path).execute("select * from t").fetchall()
    wrong.unregister()


def test_temporary_files_and_journal_modes(vfs: ssql.ShieldVfs, tmp_path: Path) -> None:
    db = vfs.connect(tmp_path / "m.db")
    db.execute("pragma temp_store = file")
    db.execute("create table t(a, b)")
    with db:
        db.executemany("insert into t values (?, ?)", ((i, -i) for i in range(20_000)))
    # an ORDER BY on an unindexed column sorts through a temporary file
    first = db.execute("select a from t order by b limit 3").fetchall()
    assert first == [(19_999,), (19_998,), (19_997,)]
    for mode in ("truncate", "persist", "delete"):
        assert db.execute(f"pragma journal_mode = {mode}").fetchone() == (mode,)
        with db:
            db.execute("update t set b = b + 1 where a < 100")
    # WAL needs shared memory, which the VFS does not offer: SQLite stays in rollback mode
    assert db.execute("pragma journal_mode = wal").fetchone() == ("delete",)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()


def test_connections_in_one_process_share_the_volume_and_lock(
    vfs: ssql.ShieldVfs, tmp_path: Path
) -> None:
    path = tmp_path / "s.db"
    writer = vfs.connect(path, timeout=0.1)
    reader = vfs.connect(path, timeout=0.1)
    writer.execute("create table t(x)")
    writer.commit()
    writer.execute("begin immediate")
    writer.execute("insert into t values (1)")
    assert reader.execute("select count(*) from t").fetchone() == (0,)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reader.execute("begin immediate")
    writer.commit()
    assert reader.execute("select count(*) from t").fetchone() == (1,)
    reader.close()
    writer.close()


def test_another_process_is_kept_out(vfs: ssql.ShieldVfs, tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = vfs.connect(path)
    db.execute("create table t(x)")
    db.commit()
    child = textwrap.dedent(
        f"""
        import sqlite3, sys
        from dvs.shield import sqlite as ssql
        vfs = ssql.register("other", key={KEY!r})
        try:
            vfs.connect({str(path)!r}).execute("select * from t").fetchall()
        except sqlite3.OperationalError as exc:
            print("refused:", exc)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=60
    )
    assert "refused: database is locked" in out.stdout, out.stdout + out.stderr
    db.close()


WRITER = textwrap.dedent(
    """
    import os, sys
    from dvs.shield import sqlite as ssql
    path, key = sys.argv[1], bytes.fromhex(sys.argv[2])
    vfs = ssql.register("writer", key=key)
    db = vfs.connect(path, isolation_level=None)
    db.execute("create table if not exists t(n integer primary key, pad text)")
    n = db.execute("select coalesce(max(n) / 100, 0) from t").fetchone()[0]
    while True:
        n += 1
        db.execute("begin")
        db.executemany("insert into t(n, pad) values (?, ?)",
                       [(n * 100 + i, "x" * 300) for i in range(50)])
        db.execute("update t set pad = 'y' where n % 7 = 0 and n > ?", (n * 100 - 500,))
        db.execute("commit")
        os.write(1, f"{n}\\n".encode())
    """
)


def test_committed_transactions_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    vfs = ssql.register(f"dvs-crash-{os.getpid()}", key=KEY)
    try:
        for trial in range(8):
            proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(path), KEY.hex()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if not first.strip().isdigit():
                proc.wait()
                assert proc.stderr is not None
                pytest.fail(f"the writer did not start: {proc.stderr.read()}")
            time.sleep(0.02 + 0.03 * (trial % 4))
            proc.send_signal(signal.SIGKILL)
            acked = [int(first)] + [int(x) for x in proc.stdout.read().split()]
            proc.wait()
            # the dead writer's flock goes with its ring, asynchronously
            deadline = time.monotonic() + 10
            while True:
                db = None
                try:
                    db = vfs.connect(path, timeout=0)
                    count = db.execute("select count(*) from t").fetchone()[0]
                    break
                except sqlite3.OperationalError:
                    if db is not None:
                        db.close()
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert db.execute("pragma integrity_check").fetchone() == ("ok",)
            batches = db.execute("select count(distinct n / 100) from t").fetchone()[0]
            db.close()
            assert count == batches * 50, "never half a transaction"
            # every acknowledged commit is there; at most the one in flight on top
            assert max(acked) <= batches <= max(acked) + 1, (trial, acked[-1], batches)
    finally:
        vfs.unregister()
