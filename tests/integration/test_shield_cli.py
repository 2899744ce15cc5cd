"""``dvs shield format|fsck|bench|sqlite`` as a user runs them: format (with the progress
bar), check, catch a tampered block, keep an anchor, run SQL on a sealed database, and a
quick benchmark. The commands are driven in-process through the shield's own ``register``,
so this test does not depend on other capabilities' CLI modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dvs.cli import Cli
from dvs.shield import cli as shield_cli
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(180)


def run(*argv: str) -> int:
    cli = Cli()
    shield_cli.register(cli)
    args = cli.parser.parse_args(["shield", *argv])
    result: int = args.handler(args)
    return result


def test_format_fsck_and_a_tampered_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVS_SHIELD_PASSPHRASE", "cli passphrase")
    path, anchor = tmp_path / "v.vol", tmp_path / "anchor.json"
    assert (
        run(
            "format",
            str(path),
            "--size",
            "8M",
            "--fill",
            "--scrypt-log2n",
            "10",
            "--anchor",
            str(anchor),
        )
        == 0
    )
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["capacity"] == 8 << 20 and info["kdf"] == "scrypt"
    assert "format [" in err and "100.0%" in err, "the progress bar"
    assert anchor.exists()

    assert run("fsck", str(path), "--anchor", str(anchor)) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["blocks_with_data"] == 2048 and report["superblock_copies_damaged"] == []
    assert "fsck [" in err

    with Volume.open(path, passphrase="cli passphrase", readonly=True) as vol:
        page = vol.locate(1000)
    assert page is not None
    with path.open("r+b") as f:
        f.seek(page * 4096 + 9)
        f.write(b"\xee")
    assert run("fsck", str(path)) == 1
    _, err = capsys.readouterr()
    assert "FAILED" in err and "block 1000" in err


def test_fsck_refuses_a_rolled_back_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex())
    path, anchor = tmp_path / "v.vol", tmp_path / "anchor.json"
    assert (
        run(
            "format",
            str(path),
            "--size",
            "1M",
            "--key-file",
            str(key_file),
            "--anchor",
            str(anchor),
        )
        == 0
    )
    old = path.read_bytes()
    with Volume.open(path, key=bytes.fromhex(key_file.read_text()), anchor_file=anchor) as vol:
        vol.write(0, b"newer")
    path.write_bytes(old)
    assert run("fsck", str(path), "--key-file", str(key_file), "--anchor", str(anchor)) == 1
    _, err = capsys.readouterr()
    assert "freshness" in err


def test_sql_on_a_sealed_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVS_SHIELD_PASSPHRASE", "sql passphrase")
    db = tmp_path / "notes.db"
    assert (
        run(
            "sqlite",
            str(db),
            "create table notes(t text)",
            "insert into notes values ('sealed'), ('twice')",
        )
        == 0
    )
    assert run("sqlite", str(db), "select count(*), min(t) from notes") == 0
    out, _ = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "2|sealed"
    assert b"twice" not in db.read_bytes()[: 1 << 20]


def test_the_quick_benchmark_reports_syscalls_and_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("bench", "--size", "8M", "--ops", "4000", "--dir", str(tmp_path)) == 0
    out, _ = capsys.readouterr()
    assert "syscalls/op" in out and "MODEL" in out and "sealed volume" in out
