"""Copying a process's seccomp filters with ptrace, and the attached command living under them.

The target here is a plain process that installs two classic-BPF filters of its own
(known instruction bytes), so the copy can be compared bit for bit and the reinstalled
filter's effect observed: the second filter makes getppid(2) fail with E2BIG.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from dvs.container import PIPE, AttachOptions, Session
from dvs.lowlevel.container import seccomp_copy

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
E2BIG = 7
NR_GETPPID = 110
AUDIT_ARCH_X86_64 = 0xC000003E


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


ALLOW_ALL = insn(0x06, 0, 0, SECCOMP_RET_ALLOW)  # BPF_RET|BPF_K
DENY_GETPPID = b"".join(
    [
        insn(0x20, 0, 0, 4),  # BPF_LD|BPF_W|BPF_ABS: arch
        insn(0x15, 1, 0, AUDIT_ARCH_X86_64),  # BPF_JMP|BPF_JEQ|BPF_K
        insn(0x06, 0, 0, SECCOMP_RET_ALLOW),
        insn(0x20, 0, 0, 0),  # nr
        insn(0x15, 0, 1, NR_GETPPID),
        insn(0x06, 0, 0, SECCOMP_RET_ERRNO | E2BIG),
        insn(0x06, 0, 0, SECCOMP_RET_ALLOW),
    ]
)

TARGET = textwrap.dedent(
    f"""
    import ctypes, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    for code in ({ALLOW_ALL!r}, {DENY_GETPPID!r}):
        prog = Prog(len(code) // 8, code)
        assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()
    print("ready", flush=True)
    while True:
        time.sleep(0.01)
    """
)


@pytest.fixture
def filtered() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    yield proc
    proc.kill()
    proc.wait()


def test_filters_are_copied_oldest_first_and_the_target_keeps_running(
    filtered: subprocess.Popen[bytes],
) -> None:
    filters = seccomp_copy(filtered.pid)
    assert [f.instructions for f in filters] == [ALLOW_ALL, DENY_GETPPID]
    # the ptrace stop was brief and the target was let go: it runs and takes signals
    time.sleep(0.05)
    with open(f"/proc/{filtered.pid}/status") as f:
        status = f.read()
    assert "TracerPid:\t0" in status
    assert filtered.poll() is None
    filtered.send_signal(signal.SIGTERM)
    assert filtered.wait(timeout=10) == -signal.SIGTERM


def test_attached_command_runs_under_the_targets_filters(
    filtered: subprocess.Popen[bytes],
) -> None:
    probe = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        "r = libc.syscall(110); print(r, ctypes.get_errno())"
    )
    with Session(filtered.pid, [sys.executable, "-c", probe], stdout=PIPE) as session:
        out, _ = session.communicate(timeout=60)
    assert out.split() == [b"-1", str(E2BIG).encode()]
    with open(f"/proc/{filtered.pid}/status") as f:
        assert "NoNewPrivs:\t1" in f.read()
    # --no-seccomp: same process context, without the filters
    options = AttachOptions(seccomp=False)
    with Session(
        filtered.pid, [sys.executable, "-c", probe], options=options, stdout=PIPE
    ) as session:
        out, _ = session.communicate(timeout=60)
    assert int(out.split()[0]) > 0


def test_a_target_under_ptrace_is_refused_with_a_hint(
    filtered: subprocess.Popen[bytes],
) -> None:
    from dvs.container import AttachFailed

    tracer = subprocess.Popen(
        ["strace", "-p", str(filtered.pid), "-o", "/dev/null"], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{filtered.pid}/status") as f:
                if "TracerPid:\t0" not in f.read():
                    break
            time.sleep(0.02)
        with pytest.raises(AttachFailed, match="--no-seccomp"):
            Session(filtered.pid, ["true"]).start()
    finally:
        tracer.terminate()
        tracer.wait()
