"""Mount option and id-map parsing of ``dvs fs mount -o`` (pure Python, no mount)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvs.errors import DvsError
from dvs.fs.server import MountOptions, parse_id_map
from dvs.fs.view import _ranges
from dvs.lowlevel import fuse as llfuse
from dvs.lowlevel.fuse import IdRange

ranges = st.lists(
    st.builds(
        lambda i, o, c: IdRange(i, o, c),
        st.integers(0, 1 << 31),
        st.integers(0, 1 << 31),
        st.integers(1, 1 << 20),
    ),
    min_size=1,
    max_size=5,
)


def render_map(rs: list[IdRange]) -> str:
    return "/".join(f"{r.inside}:{r.outside}:{r.count}" for r in rs)


@given(
    ro=st.booleans(),
    passthrough=st.booleans(),
    writeback=st.booleans(),
    workers=st.integers(0, 64),
    timeout=st.floats(0, 3600, allow_nan=False).map(lambda x: round(x, 3)),
    uid_map=ranges,
)
def test_options_round_trip(
    ro: bool,
    passthrough: bool,
    writeback: bool,
    workers: int,
    timeout: float,
    uid_map: list[IdRange],
) -> None:
    text = ",".join(
        [
            "ro" if ro else "rw",
            "passthrough" if passthrough else "nopassthrough",
            "writeback" if writeback else "nowriteback",
            f"workers={workers}",
            f"timeout={timeout}",
            f"uid_map={render_map(uid_map)}",
        ]
    )
    opts = MountOptions.parse(text)
    assert opts.read_only == ro
    assert opts.passthrough == passthrough and opts.writeback == writeback
    assert opts.workers == workers
    assert opts.entry_timeout == opts.attr_timeout == timeout
    assert list(opts.uid_map) == uid_map
    assert opts.gid_map == ()
    # later options override earlier ones, as with mount(8)
    assert MountOptions.parse("rw", opts).read_only is False


@given(st.text(max_size=30))
def test_garbage_options_are_rejected_with_dvs_errors(text: str) -> None:
    try:
        MountOptions.parse(text)
    except DvsError:
        pass


@pytest.mark.parametrize(
    "text", ["0:1", "a:b:c", "0:0:0", "1:2:3:4", f"{(1 << 32) - 1}:0:2", "-1:0:1"]
)
def test_bad_id_maps(text: str) -> None:
    with pytest.raises(DvsError):
        parse_id_map(text)


@given(ranges)
def test_view_accepts_every_map_spelling(rs: list[IdRange]) -> None:
    as_tuples = [(r.inside, r.outside, r.count) for r in rs]
    as_text = "\n".join(f"{r.inside} {r.outside} {r.count}" for r in rs)
    assert _ranges(rs) == _ranges(as_tuples) == _ranges(as_text) == tuple(rs)


def test_identity_map_means_no_translation() -> None:
    assert _ranges("0 0 4294967295\n") == ()
    assert _ranges(None) is None


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_transport_options(mode: str) -> None:
    opts = MountOptions.parse(f"uring={mode},enable_uring,ring_threads=3,ring_depth=2,uring_nopin")
    assert (opts.uring, opts.enable_uring, opts.ring_threads, opts.ring_depth) == (mode, True, 3, 2)
    assert not opts.uring_pin
    flags = opts.server_flags()
    assert bool(flags & llfuse.WANT_URING) == (mode != "off")
    assert flags & llfuse.URING_NO_PIN
    assert MountOptions().uring == "auto" and not MountOptions().enable_uring
    with pytest.raises(DvsError, match="uring"):
        MountOptions.parse("uring=maybe")
