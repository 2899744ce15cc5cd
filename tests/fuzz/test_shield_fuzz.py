"""Untrusted bytes into the sealed volume's parsers never crash, hang or yield data: the
superblock header parser gets arbitrary blocks, and whole opens get arbitrary superblock
slots and tree nodes from the (hostile) storage. Every outcome is a typed error or, when a
slot is left intact, the authentic volume. The same targets run under atheris with
tests/fuzz/fuzz_shield.py for longer campaigns."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvs.errors import DvsError, IntegrityError
from dvs.lowlevel import uring as u
from dvs.lowlevel.shield import BLOCK, Key, parse_header
from dvs.shield.volume import Volume

pytestmark = pytest.mark.timeout(300)
KEY = Key.raw(bytes(range(32)))


def _valid_slot() -> tuple[u.Engine, bytes, bytes, list[int]]:
    engine = u.Engine("memdisk", files=[-1])
    vol = Volume.create_on(engine, 20_000, KEY)
    for b in (0, 5, 300, 19_999):
        vol.write_blocks(b, bytes([b % 251]) * BLOCK)
    vol.flush()
    live = vol.live_blocks()
    vol.close()
    return engine, engine.peek(0, 0), engine.peek(0, 1), live


ENGINE, SLOT0, SLOT1, LIVE = _valid_slot()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=0, max_size=BLOCK + 16))
def test_the_header_parser_takes_any_bytes(data: bytes) -> None:
    try:
        parse_header(data)
    except (DvsError, ValueError, OSError):
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    offset=st.integers(0, 255),
    patch=st.binary(min_size=1, max_size=64),
)
def test_header_mutations_of_a_real_slot(offset: int, patch: bytes) -> None:
    block = bytearray(SLOT0)
    block[offset : offset + len(patch)] = patch
    try:
        header = parse_header(bytes(block))
    except (DvsError, OSError):
        return
    # whatever parses is within the format's limits
    assert header.capacity_blocks <= 1 << 30 and header.levels <= 6
    assert header.kdf in (0, 1)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    slot0=st.one_of(st.just(None), st.binary(min_size=BLOCK, max_size=BLOCK)),
    slot1=st.one_of(st.just(None), st.binary(min_size=BLOCK, max_size=BLOCK)),
    node=st.one_of(
        st.just(None), st.tuples(st.sampled_from(LIVE), st.binary(min_size=BLOCK, max_size=BLOCK))
    ),
)
def test_opening_hostile_storage(
    slot0: bytes | None, slot1: bytes | None, node: tuple[int, bytes] | None
) -> None:
    originals = {0: SLOT0, 1: SLOT1}
    pokes = {0: slot0, 1: slot1}
    if node is not None:
        originals[node[0]] = ENGINE.peek(0, node[0])
        pokes[node[0]] = node[1]
    try:
        for page, data in pokes.items():
            if data is not None:
                ENGINE.poke(0, page, data)
        try:
            vol = Volume.open_on(ENGINE, KEY, readonly=True)
        except DvsError:
            return
        try:
            vol.verify()
            for b in (0, 5, 300, 19_999):
                assert vol.read_blocks(b, 1) == bytes([b % 251]) * BLOCK
        except IntegrityError:
            pass
        finally:
            vol.close(discard=True)
    finally:
        for page, data in originals.items():
            ENGINE.poke(0, page, data)
