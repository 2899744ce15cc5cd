"""SQLite on sealed storage with Python's own sqlite3 module.

Every database, journal and temporary file is a sealed volume: AES-256-GCM per 4 KiB
block, a MAC tree up to a sealed superblock, crash-consistent syncs, all through an
io_uring ring. The SQL is unmodified; only the connect call names the VFS.

    python3 examples/shield_sqlite.py [DIRECTORY]
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

from dvs.errors import IntegrityError
from dvs.shield import sqlite as shield_sqlite
from dvs.shield.volume import Volume


def main(directory: Path) -> None:
    db_path = directory / "ledger.db"
    # the passphrase goes through scrypt once; the salt is kept in the database's header
    vfs = shield_sqlite.register(
        "ledger", passphrase="correct horse battery staple", database=db_path, scrypt_log2_n=14
    )
    db = vfs.connect(db_path)
    db.executescript(
        """
        create table if not exists account(id integer primary key, owner text, balance int);
        create index if not exists account_owner on account(owner);
        """
    )
    with db:  # one transaction: atomic on disk too
        db.executemany(
            "insert into account(owner, balance) values (?, ?)",
            [(f"owner-{i}", 100 * i) for i in range(1000)],
        )
    with db:
        db.execute("update account set balance = balance - 50 where owner = 'owner-7'")
    print("rows:", db.execute("select count(*), sum(balance) from account").fetchone())
    db.close()
    print("plaintext in the file?", b"owner-7" in db_path.read_bytes()[: 1 << 20])

    # the storage host flips one bit of the page that holds the table's data
    with Volume.open(db_path, passphrase="correct horse battery staple", readonly=True) as vol:
        page = vol.locate(1)
    assert page is not None
    with db_path.open("r+b") as f:
        f.seek(page * 4096 + 100)
        byte = f.read(1)
        f.seek(page * 4096 + 100)
        f.write(bytes([byte[0] ^ 1]))
    db = vfs.connect(db_path)
    try:
        with vfs.translate_errors():
            db.execute("select sum(balance) from account").fetchone()
    except IntegrityError as exc:
        print("tampering detected:", exc)
    except sqlite3.DatabaseError as exc:
        print("tampering detected by SQLite:", exc)
    finally:
        db.close()
        vfs.unregister()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
