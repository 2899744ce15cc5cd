"""atheris harness for the sealed volume's untrusted-input paths (longer campaigns than the
hypothesis tests in test_shield_fuzz.py):

    python3 tests/fuzz/fuzz_shield.py -atheris_runs=200000

The input is split into a superblock slot and a tree node/data page for a memory-disk
volume; the only acceptable outcomes are typed dvs errors or the authentic contents.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from dvs.errors import DvsError, IntegrityError
    from dvs.lowlevel import uring as u
    from dvs.lowlevel.shield import BLOCK, Key, parse_header
    from dvs.shield.volume import Volume

KEY = Key.raw(bytes(range(32)))
ENGINE = u.Engine("memdisk", files=[-1])
_vol = Volume.create_on(ENGINE, 20_000, KEY)
for _b in (0, 300, 19_999):
    _vol.write_blocks(_b, bytes([_b % 251]) * BLOCK)
_vol.flush()
LIVE = _vol.live_blocks()
_vol.close()
ORIGINAL = {p: ENGINE.peek(0, p) for p in LIVE}


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    try:
        parse_header(fdp.ConsumeBytes(BLOCK))
    except (DvsError, OSError):
        pass
    page = LIVE[fdp.ConsumeIntInRange(0, len(LIVE) - 1)]
    content = fdp.ConsumeBytes(BLOCK).ljust(BLOCK, b"\0")
    ENGINE.poke(0, page, content)
    try:
        vol = Volume.open_on(ENGINE, KEY, readonly=True)
    except DvsError:
        ENGINE.poke(0, page, ORIGINAL[page])
        return
    try:
        vol.verify()
        for b in (0, 300, 19_999):
            if vol.read_blocks(b, 1) != bytes([b % 251]) * BLOCK:
                raise AssertionError(f"block {b} read back wrong without an error")
    except IntegrityError:
        pass
    finally:
        vol.close(discard=True)
        ENGINE.poke(0, page, ORIGINAL[page])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
