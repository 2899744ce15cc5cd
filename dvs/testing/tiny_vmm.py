"""A tiny KVM hypervisor of our own (csrc/testing/tiny_vmm.c), for tests and benchmarks that
must not depend on QEMU: one vCPU running a 16-bit loop that reads an MMIO window, counts its
iterations in RAM, and can be diverted by a RIP rewrite.

Semantics relied on (see the C file's header for the guest memory map):

- Built with the host's gcc once per source version and cached (``dvs.testing.cache``).
- Started through dvs's spawn helper with PR_SET_PDEATHSIG=SIGKILL, so it dies with the test
  process; ``close()`` kills and reaps it and removes its work directory.
- Its stdout goes to a file; ``READY`` carries its RAM's host address, which the fixture reads
  through ``/proc/PID/mem`` -- an oracle independent of dvs's own code paths.
- Every guest loop iteration makes one MMIO read of GPA 0x20000 (the VMM answers 0x5A5A5A5A
  unless dvs traps it) and, with ``read_slot``, one read of GPA 0x30000 (MMIO until a memory
  slot is added there).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from dvs.errors import DvsError
from dvs.testing.cache import artefact

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "testing" / "tiny_vmm.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")

WINDOW_GPA = 0x2_0000
SLOT_GPA = 0x3_0000
VMM_ANSWER = 0x5A5A_5A5A
LAST_WINDOW_VALUE = 0x500
LAST_SLOT_VALUE = 0x508
ITERATIONS = 0x510
READ_SLOT_FLAG = 0x518
DIVERT_MARK = 0x520
DIVERT_COUNT = 0x524
DIVERT_MARK_VALUE = 0x600D_F00D
CODE_GPA = 0x1000
LOOP_GPA = 0x100E
LOOP_END_GPA = 0x1031
DIVERT_GPA = 0x1100
RAM_SIZE = 0x1_0000


class TinyVmmError(DvsError):
    """The tiny VMM could not be built, started, or it stopped."""


def build_tiny_vmm() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(CFLAGS).encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        result = subprocess.run(
            ["gcc", *CFLAGS, "-o", str(out / "tiny_vmm"), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise TinyVmmError(f"building the tiny VMM failed:\n{result.stderr}")

    if shutil.which("gcc") is None:
        raise TinyVmmError("building the tiny VMM needs gcc")
    return artefact(f"tiny-vmm-{digest}", build) / "tiny_vmm"


class TinyVmm:
    """A running tiny VMM; use as a context manager."""

    def __init__(self, *, read_slot: bool = False, start_timeout: float = 20.0) -> None:
        self.read_slot = read_slot
        self.start_timeout = start_timeout
        self.workdir: Path | None = None
        self.ram_address = 0
        self._process: Any = None  # dvs.lowlevel.sys.Spawned
        self._mem_fd = -1

    def __enter__(self) -> TinyVmm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise TinyVmmError("the tiny VMM is not running")
        pid: int = self._process.pid
        return pid

    @property
    def output_path(self) -> Path:
        if self.workdir is None:
            raise TinyVmmError("the tiny VMM has not been started")
        return self.workdir / "stdout"

    def start(self) -> None:
        from dvs.lowlevel import sys as llsys

        binary = build_tiny_vmm()
        self.workdir = Path(tempfile.mkdtemp(prefix="dvs-tiny-vmm-"))
        out_fd = os.open(self.output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        argv = [str(binary)] + (["--read-slot"] if self.read_slot else [])
        try:
            self._process = llsys.spawn(
                argv, stdio=(null_fd, out_fd, out_fd), pdeath_signal=signal.SIGKILL
            )
        finally:
            os.close(out_fd)
            os.close(null_fd)
        match = self.wait_for(r"TINY-VMM READY pid=\d+ ram=(0x[0-9a-f]+)", self.start_timeout)
        self.ram_address = int(match.group(1), 16)
        self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1
        process, self._process = self._process, None
        if process is not None:
            try:
                process.kill(signal.SIGKILL)
                process.wait(timeout=30)
            finally:
                process.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def running(self) -> bool:
        import select

        if self._process is None:
            return False
        ready, _, _ = select.select([self._process.pidfd], [], [], 0)
        return not ready

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = compiled.search(self.output())
            if match:
                return match
            if not self.running():
                raise TinyVmmError(f"the tiny VMM exited: {self.output()[-800:]!r}")
            if time.monotonic() > deadline:
                raise TinyVmmError(f"no {pattern!r} in {timeout} s: {self.output()[-800:]!r}")
            time.sleep(0.01)

    # -- guest RAM through /proc/PID/mem --

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or gpa + size > RAM_SIZE:
            raise ValueError(f"{gpa:#x}+{size} outside the tiny VMM's RAM")
        return os.pread(self._mem_fd, size, self.ram_address + gpa)

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0 or gpa + len(data) > RAM_SIZE:
            raise ValueError(f"{gpa:#x}+{len(data)} outside the tiny VMM's RAM")
        os.pwrite(self._mem_fd, data, self.ram_address + gpa)

    def u32(self, gpa: int) -> int:
        value: int = struct.unpack("<I", self.read(gpa, 4))[0]
        return value

    def iterations(self) -> int:
        return self.u32(ITERATIONS)

    def wait_iterations(self, more: int, timeout: float = 10.0) -> int:
        """Wait until the guest loop ran ``more`` further times; return the new count."""
        start = self.iterations()
        deadline = time.monotonic() + timeout
        while (now := self.iterations()) - start < more:
            if not self.running():
                raise TinyVmmError(f"the tiny VMM exited: {self.output()[-800:]!r}")
            if time.monotonic() > deadline:
                raise TinyVmmError(f"the guest loop ran {now - start}/{more} times in {timeout} s")
            time.sleep(0.002)
        return now
