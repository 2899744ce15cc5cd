"""cffi builder for dvs._native (API mode, out of line).

The C core is plain .c/.h files under csrc/ so compilers, sanitizers and fuzzers see
ordinary C. What Python may call is declared between ``/* cffi:begin */`` and
``/* cffi:end */`` in the headers; this builder concatenates those blocks into the cdef,
turning ``#define NAME value`` into ``#define NAME ...`` (cffi asks the compiler for the
value) and expanding ``/* cffi:constants A B ... */`` lists the same way. Every .c file
outside csrc/guest (code that runs inside guests), csrc/fuzz (harnesses) and csrc/testing
(stand-alone programs the test fixtures build, e.g. a tiny VMM) is compiled in.
Libraries come from pkg-config: liburing, libcrypto, sqlite3.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent
EXCLUDED_DIRS = {"guest", "fuzz", "testing"}
PKG_CONFIG_PACKAGES = ["liburing", "libcrypto", "sqlite3"]

_BLOCK = re.compile(r"/\* cffi:begin \*/(.*?)/\* cffi:end \*/", re.S)
_CONSTANTS = re.compile(r"/\* cffi:constants(.*?)\*/", re.S)
_DEFINE = re.compile(r"^\s*#define\s+(\w+)\s+.*$", re.M)
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


def _included(path: Path) -> bool:
    return not (EXCLUDED_DIRS & set(path.relative_to(CSRC).parts[:-1]))


def api_headers() -> list[Path]:
    return [h for h in sorted(CSRC.rglob("*.h")) if _included(h) and "cffi:begin" in h.read_text()]


def sources() -> list[Path]:
    return [c for c in sorted(CSRC.rglob("*.c")) if _included(c)]


def cdef_text() -> str:
    parts = []
    for header in api_headers():
        for block in _BLOCK.findall(header.read_text()):
            block = _CONSTANTS.sub(
                lambda m: "".join(f"#define {n} ...\n" for n in m.group(1).split()), block
            )
            block = _COMMENT.sub("", block)
            block = _DEFINE.sub(lambda m: f"#define {m.group(1)} ...", block)
            parts.append(f"/* {header.relative_to(CSRC)} */\n{block}")
    return "\n".join(parts)


def _pkg_config(flag: str) -> list[str]:
    out = subprocess.run(
        ["pkg-config", flag, *PKG_CONFIG_PACKAGES], check=True, capture_output=True, text=True
    )
    return shlex.split(out.stdout)


def make_builder() -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    preamble = '#include "api.h"\n' + "".join(
        f'#include "{h.relative_to(CSRC)}"\n' for h in api_headers()
    )
    cflags = _pkg_config("--cflags")
    libs = _pkg_config("--libs")
    ffi.set_source(
        "dvs._native",
        preamble,
        sources=[str(s.relative_to(CSRC.parent)) for s in sources()],
        include_dirs=[str(CSRC)],
        extra_compile_args=[
            *cflags,
            "-O2",
            "-g",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-fno-strict-aliasing",
        ],
        libraries=[lib[2:] for lib in libs if lib.startswith("-l")],
        library_dirs=[lib[2:] for lib in libs if lib.startswith("-L")],
        extra_link_args=["-lpthread"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
