"""The guardian tracer against real (non-KVM) processes: seizing every thread, syscall
injection, register restore of an interrupted syscall, signal re-delivery, the undo log, and
restoration when dvs dies.

Semantics relied on: the target is an ordinary multi-threaded Python process whose main
thread blocks in read(0) (a restartable syscall: interrupting it yields -ERESTARTSYS, which
must turn back into the same read after detach) and whose SIGUSR1 handler prints one line
per delivery. Python runs handlers in the main thread only, so the other threads block
SIGUSR1: the kernel hands a process-directed signal to any thread that does not block it and
is not in a ptrace-stop, and one taken by a sleeper thread would never wake the main thread.
/proc/PID/task/TID/status shows TracerPid and ``t (tracing stop)``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from hv_support import ProcessSnapshot, assert_restored, task_field, wait_gone, wait_untraced

from dvs.hypervisor.discovery import find_syscall_instruction
from dvs.lowlevel import kvm as llkvm
from dvs.lowlevel.ptrace import Guardian, GuardianError, UndoSpec

pytestmark = [pytest.mark.root]

TARGET = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    count = 0
    def on_usr1(signum, frame):
        global count
        count += 1
        os.write(1, b"usr1 %d\\n" % count)
    signal.signal(signal.SIGUSR1, on_usr1)
    def sleep_without_usr1(seconds):
        # Python runs handlers in the main thread only: keep SIGUSR1 off the other threads
        # (as QEMU does with its signals), so a delivery always reaches the main thread
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        time.sleep(seconds)
    for _ in range(int(sys.argv[1])):
        threading.Thread(target=sleep_without_usr1, args=(1e6,), daemon=True).start()
    if sys.argv[2] == "spawn":
        def spawner():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            while True:
                threading.Thread(target=time.sleep, args=(0.003,)).start()
                time.sleep(0.001)
        threading.Thread(target=spawner, daemon=True).start()
    os.write(1, b"ready\\n")
    while True:
        line = os.read(0, 100)
        if not line:
            break
        os.write(1, b"echo " + line)
    """
)


class Target:
    def __init__(self, threads: int = 3, spawn: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TARGET, str(threads), "spawn" if spawn else "quiet"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.pid = self.process.pid
        assert self.readline(10) == "ready"

    def readline(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.process.stdout.readline().decode().strip()

    def lines_within(self, timeout: float) -> list[str]:
        lines = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.readline(left)
            if not line:
                break
            lines.append(line)
        return lines

    def echo(self, text: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()
        return self.readline(10)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    try:
        yield t
    finally:
        t.close()


def attach(pid: int, **kwargs: object) -> Guardian:
    return Guardian(pid, find_syscall_instruction(pid), **kwargs)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_attach_stops_every_thread_and_detach_lets_them_run(target: Target) -> None:
    before = ProcessSnapshot.take(target.pid)
    guardian = attach(target.pid)
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{target.pid}/task"))
        assert guardian.status().n_threads == len(tids) == 4
        for tid in tids:
            assert int(task_field(target.pid, tid, "TracerPid")) == guardian.guardian_pid
            assert task_field(target.pid, tid, "State").startswith("t")
        assert guardian.injection_tid == target.pid
        assert guardian.scratch_address  # mapped inside the target
        assert ProcessSnapshot.take(target.pid).maps != before.maps
    finally:
        guardian.detach()
    wait_untraced(target.pid)
    assert_restored(target.pid, before)
    assert target.echo("still here") == "echo still here"


@pytest.mark.timeout(120)
def test_threads_born_during_attach_are_traced_from_birth() -> None:
    spawning = Target(threads=2, spawn=True)
    try:
        for _ in range(5):
            guardian = attach(spawning.pid)
            try:
                status = guardian.status()
                tids = sorted(int(t) for t in os.listdir(f"/proc/{spawning.pid}/task"))
                # every thread that exists now is ours and stopped: none can escape or spawn
                assert status.n_threads == len(tids)
                for tid in tids:
                    assert int(task_field(spawning.pid, tid, "TracerPid")) == (
                        guardian.guardian_pid
                    )
                    assert task_field(spawning.pid, tid, "State").startswith("t")
                guardian.run()
                time.sleep(0.05)  # threads come and go while traced
                status = guardian.status()
                assert status.threads_seen > len(tids)
                for tid in sorted(int(t) for t in os.listdir(f"/proc/{spawning.pid}/task")):
                    tracer = task_field(spawning.pid, tid, "TracerPid")
                    assert tracer in ("", str(guardian.guardian_pid)), tid
            finally:
                guardian.detach()
            wait_untraced(spawning.pid)
        assert spawning.echo("alive") == "echo alive"
    finally:
        spawning.close()


@pytest.mark.timeout(60)
def test_injected_syscalls_run_in_the_target(target: Target) -> None:
    with_guardian = attach(target.pid)
    try:
        assert with_guardian.syscall(llkvm.SYS_getpid).result == target.pid
        assert with_guardian.syscall(llkvm.SYS_gettid).result == with_guardian.injection_tid
        text = b"hello from inside\n"
        # write(1, scratch, len): fd 1 is the target's stdout pipe, read by this test
        written = with_guardian.syscall(
            llkvm.SYS_write, (1, 0, len(text)), scratch_args=(1,), data=text
        )
        assert written.result == len(text)
        assert target.readline(10) == "hello from inside"
        # bytes come back out of the scratch buffer
        echoed = with_guardian.syscall(llkvm.SYS_getpid, out_len=len(text))
        assert echoed.data == text
        bad = with_guardian.syscall(llkvm.SYS_close, (100000,))
        assert bad.failed and bad.errno == 9  # EBADF, from inside the target
        with pytest.raises(GuardianError):
            with_guardian.syscall(llkvm.SYS_write, (1, 1 << 40, 1), scratch_args=(1,))
    finally:
        with_guardian.detach()
    wait_untraced(target.pid)
    # the main thread was inside read(0) and must read again, with its own registers
    assert target.echo("after injection") == "echo after injection"


@pytest.mark.timeout(60)
def test_interrupted_read_resumes_while_still_attached(target: Target) -> None:
    """The main thread sat in read(0) (-ERESTARTSYS at our stop). Resumed with PTRACE_CONT
    after injections -- where the kernel no longer restarts anything -- it must still be
    reading, with its own registers."""
    guardian = attach(target.pid)
    try:
        for _ in range(5):
            guardian.syscall(llkvm.SYS_getpid)
        guardian.run()
        assert target.echo("while attached") == "echo while attached"
        guardian.syscall(llkvm.SYS_getpid)  # stops, injects, resumes again
        assert target.echo("again") == "echo again"
        assert int(task_field(target.pid, target.pid, "TracerPid")) == guardian.guardian_pid
    finally:
        guardian.detach()


@pytest.mark.timeout(60)
def test_interrupted_sleep_restarts_with_its_registers() -> None:
    """nanosleep interrupted by our stop returns -ERESTART_RESTARTBLOCK inside the kernel;
    after injections the thread must resume into restart_syscall, not see that code."""
    sleeper = subprocess.Popen(["sleep", "1.0"])
    try:
        time.sleep(0.2)
        started = time.monotonic()
        guardian = attach(sleeper.pid)
        try:
            for _ in range(20):
                assert guardian.syscall(llkvm.SYS_getpid).result == sleeper.pid
        finally:
            guardian.detach()
        assert sleeper.wait(timeout=10) == 0
        assert time.monotonic() - started >= 0.7  # slept its full second in total
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.timeout(60)
def test_signal_held_back_during_injection_is_delivered_once_after(target: Target) -> None:
    guardian = attach(target.pid)
    try:
        os.kill(target.pid, signal.SIGUSR1)
        for _ in range(10):
            guardian.syscall(llkvm.SYS_getpid)
        status = guardian.status()
        # the only thread that runs (ours, injecting) took the signal; it was kept for later
        assert status.n_deferred_signals == 1
        assert target.lines_within(0.3) == []  # not handled while held
    finally:
        guardian.detach()
    assert target.lines_within(2.0) == ["usr1 1"]  # delivered exactly once


@pytest.mark.timeout(60)
def test_signals_reach_a_running_traced_target(target: Target) -> None:
    guardian = attach(target.pid)
    try:
        guardian.run()
        for n in range(1, 4):
            os.kill(target.pid, signal.SIGUSR1)
            assert target.readline(5) == f"usr1 {n}"
        status = guardian.status()
        assert status.signals_delivered >= 3
        assert int(task_field(target.pid, target.pid, "TracerPid")) == guardian.guardian_pid
    finally:
        guardian.detach()
    assert target.echo("x") == "echo x"


@pytest.mark.timeout(60)
def test_undo_log_reverts_changes_on_request_and_on_eof(target: Target) -> None:
    before = ProcessSnapshot.take(target.pid)
    guardian = attach(target.pid)
    try:
        close = UndoSpec(llkvm.SYS_close, result_args=(0,))
        first = guardian.syscall(llkvm.SYS_eventfd2, (0, llkvm.EFD_CLOEXEC), undo=close)
        assert first.undo_id > 0
        assert os.readlink(f"/proc/{target.pid}/fd/{first.result}") == "anon_inode:[eventfd]"
        assert guardian.undo(first.undo_id) == 0
        assert not os.path.exists(f"/proc/{target.pid}/fd/{first.result}")
        second = guardian.syscall(llkvm.SYS_eventfd2, (0, llkvm.EFD_CLOEXEC), undo=close)
        size = 3 * 4096
        mapped = guardian.syscall(
            llkvm.SYS_mmap,
            (0, size, llkvm.PROT_READ, llkvm.MAP_PRIVATE | llkvm.MAP_ANONYMOUS, -1, 0),
            undo=UndoSpec(llkvm.SYS_munmap, args=(0, size), result_args=(0,)),
        )
        assert not mapped.failed
        assert os.path.exists(f"/proc/{target.pid}/fd/{second.result}")
        guardian_pid = guardian.guardian_pid
    finally:
        guardian.close()  # no DETACH request: the guardian sees EOF and cleans up itself
    wait_gone(guardian_pid)
    wait_untraced(target.pid)
    assert_restored(target.pid, before)
    assert target.echo("clean") == "echo clean"


HELPER = textwrap.dedent(
    """
    import sys, time
    from dvs.hypervisor.discovery import find_syscall_instruction
    from dvs.lowlevel import kvm as k
    from dvs.lowlevel.ptrace import Guardian, UndoSpec
    pid = int(sys.argv[1])
    g = Guardian(pid, find_syscall_instruction(pid))
    g.syscall(k.SYS_eventfd2, (0, k.EFD_CLOEXEC), undo=UndoSpec(k.SYS_close, result_args=(0,)))
    g.run()
    print(g.guardian_pid, flush=True)
    time.sleep(1000)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGKILL of dvs", "SIGTERM of the guardian"])
def test_target_restored_when_dvs_or_guardian_is_killed(target: Target, how: str) -> None:
    before = ProcessSnapshot.take(target.pid)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(target.pid)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert helper.stdout is not None
        guardian_pid = int(helper.stdout.readline())
        assert ProcessSnapshot.take(target.pid) != before  # eventfd + scratch mapping
        if how == "SIGKILL of dvs":
            helper.kill()
        else:
            os.kill(guardian_pid, signal.SIGTERM)
        wait_gone(guardian_pid)
        wait_untraced(target.pid)
        assert_restored(target.pid, before)
        assert target.echo("survived") == "echo survived"
    finally:
        helper.kill()
        helper.wait()
        if helper.stdout is not None:
            helper.stdout.close()


@pytest.mark.timeout(60)
def test_attach_refuses_an_address_without_a_syscall_instruction(target: Target) -> None:
    before = ProcessSnapshot.take(target.pid)
    instruction = find_syscall_instruction(target.pid)
    with pytest.raises(GuardianError, match="no syscall instruction"):
        Guardian(target.pid, instruction + 1)  # 05 xx: not a syscall
    wait_untraced(target.pid)
    assert_restored(target.pid, before)
    assert target.echo("fine") == "echo fine"


@pytest.mark.timeout(30)
def test_attach_to_a_missing_process_fails_cleanly() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    with pytest.raises(GuardianError):
        Guardian(process.pid, 0x1000)
