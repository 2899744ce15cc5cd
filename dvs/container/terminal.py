"""The caller's side of an attached command's terminal and pipes.

PTY mode (stdin and stdout are terminals): our terminal goes to raw mode, so every key --
including ^C and ^Z -- reaches the command's PTY, whose line discipline turns them into
signals for the command's own foreground job (job control works inside the session). The
window size is copied to the PTY at start and on every SIGWINCH (the kernel then sends
SIGWINCH to the command's foreground process group); off the main thread, where Python
cannot install signal handlers, it is polled every 250 ms instead. When the command
itself is stopped from outside, we restore our terminal, stop ourselves (so the calling
shell shows the job as stopped) and send it SIGCONT when we are continued. After the
command exits, what is still buffered in the PTY is read until EIO (all slave ends
closed) before our terminal is restored.

Pipe mode needs nothing here: the command owns the caller's fds. ``communicate`` is the
subprocess-style helper for PIPE streams.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import termios
import threading
import time
import tty
from typing import TYPE_CHECKING, Any

from dvs.lowlevel import container as llc

if TYPE_CHECKING:
    from dvs.container.attach import Session

_CHUNK = 65536


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _copy_winsize(src: int, dst: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(dst, termios.TIOCSWINSZ, fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8))


def _winsize(fd: int) -> bytes:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return b""


def stop_self_and_resume(session: Session) -> None:
    """Mirror a stop of the command: give the terminal back, stop, resume it on SIGCONT."""
    saved = session._tty_saved
    if saved is not None:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    os.kill(os.getpid(), signal.SIGSTOP)
    if saved is not None:
        with contextlib.suppress(termios.error):
            tty.setraw(0, termios.TCSANOW)
    session.send_signal(signal.SIGCONT)


def _drain(master: int, out: int) -> None:
    flags = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            data = os.read(master, _CHUNK)
        except BlockingIOError:
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                return
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:  # every slave end is closed
                return
            raise
        if not data:
            return
        _write_all(out, data)


def run_pty_session(session: Session, master: int, report_fd: int) -> None:
    stdin_fd, stdout_fd = 0, 1
    raw = os.isatty(stdin_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    in_main = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if in_main:
        previous = signal.signal(signal.SIGWINCH, lambda _sig, _frame: _nonblocking_write(wake_w))
    last_size = _winsize(stdout_fd)
    try:
        if raw:
            session._tty_saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)  # keep type-ahead (TCSAFLUSH drops it)
        _copy_winsize(stdout_fd, master)
        stdin_open = True
        master_open = True
        poller = select.poll()
        poller.register(report_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        poller.register(master, select.POLLIN)
        poller.register(stdin_fd, select.POLLIN)
        while session.returncode is None:
            events = poller.poll(None if in_main else 250)
            if not in_main:
                size = _winsize(stdout_fd)
                if size != last_size:
                    last_size = size
                    _copy_winsize(stdout_fd, master)
            for fd, mask in events:
                if fd == master and master_open:
                    try:
                        data = os.read(master, _CHUNK)
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        data = b""
                    if data:
                        _write_all(stdout_fd, data)
                    else:  # no slave end left; the exit report follows
                        master_open = False
                        poller.unregister(master)
                elif fd == stdin_fd and stdin_open:
                    data = os.read(stdin_fd, _CHUNK) if mask & select.POLLIN else b""
                    if data:
                        _write_all(master, data)
                    else:
                        stdin_open = False
                        poller.unregister(stdin_fd)
                        # end of input: hand the PTY an end-of-file character
                        with contextlib.suppress(OSError):
                            os.write(master, b"\x04")
                elif fd == wake_r:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 512)
                    _copy_winsize(stdout_fd, master)
                elif fd == report_fd:
                    session._handle(llc.attach_recv(report_fd, 0))
        if master_open:
            _drain(master, stdout_fd)
    finally:
        if session._tty_saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, session._tty_saved)
            session._tty_saved = None
        if in_main:
            signal.signal(signal.SIGWINCH, previous if previous is not None else signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)


def _nonblocking_write(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"w")


def communicate(session: Session, data: bytes, timeout: float | None) -> tuple[bytes, bytes]:
    """Write ``data`` to the command's stdin pipe and collect stdout/stderr until EOF."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = memoryview(data)
    streams = {"out": session.stdout, "err": session.stderr}
    readers = {s.fileno(): name for name, s in streams.items() if s is not None}
    collected: dict[str, list[bytes]] = {"out": [], "err": []}
    stdin = session.stdin
    writer = stdin.fileno() if stdin is not None else None
    if stdin is not None and writer is not None:
        os.set_blocking(writer, False)
        if not pending:
            stdin.close()
            writer = None
    while readers or writer is not None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"the command did not finish its output within {timeout} s")
        wanted_w = [writer] if writer is not None else []
        rlist, wlist, _ = select.select(list(readers), wanted_w, [], remaining)
        for fd in rlist:
            chunk = os.read(fd, _CHUNK)
            if chunk:
                collected[readers[fd]].append(chunk)
            else:
                del readers[fd]
        if wlist and stdin is not None and writer is not None:
            try:
                n = os.write(writer, pending[:_CHUNK])
                pending = pending[n:]
            except BrokenPipeError:
                pending = memoryview(b"")
            if not pending:
                stdin.close()
                writer = None
    return b"".join(collected["out"]), b"".join(collected["err"])
