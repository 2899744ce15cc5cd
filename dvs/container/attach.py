"""Attach tools to a running container, or run a command in its own root: the policy.

``attach`` shows the tools side (the host, a directory or an OCI bundle) at ``/`` and the
container's root at ``/var/lib/cntr``, with the container's /proc, /dev, /sys and
/etc/{passwd,group,hosts,hostname,resolv.conf,localtime} mounted over the tools view --
CNTR 1.x's layout, built with the kernel's mount API instead of a FUSE file system (see
``views`` for the seam where a FUSE backend plugs in). ``exec`` runs a command inside the
container's own root with the container's PATH, like ``docker exec`` but for any engine.

In both, the command gets the target's complete process context: its cgroups (v2 and v1),
all of its namespaces (the command is forked *inside* the pid namespace), its uid, gid
and supplementary groups as its user namespace sees them, its effective capabilities as
the bounding set (+CAP_SYS_PTRACE when asked), its permitted, effective, inheritable and
ambient sets cut to that bounding set (so a non-root command keeps the target's ambient
capabilities across its execve), its no_new_privs bit and seccomp filters
(copied with ptrace), its AppArmor/SELinux label, and its environment (PATH from the
tools side for ``attach``). Python decides all of that here from /proc (``context``); the
fork, the namespace changes, the mounts, the id and capability changes and the exec are
one C call (``dvs.lowlevel.container``), because Python must not run between fork and exec.

Lifetime: everything made for a session lives in a private mount namespace that belongs
to the session's processes -- the keeper (the command's parent) and the command. Nothing
is mounted in the host's or the container's namespace and nothing is written to either
file system, so when the processes are gone nothing is left. The keeper dies with dvs
until the command runs (PR_SET_PDEATHSIG); after that it notices dvs's end of the report
socket closing -- on ``close()``, or when dvs is killed, even by SIGKILL -- and kills the
command and whatever is left in its session before it exits; the command dies with the
keeper (PR_SET_PDEATHSIG again).

Overlays follow the tools side's symlinks: on a host whose /etc/localtime links to
/usr/share/zoneinfo/Etc/UTC, the container's localtime appears at both paths in the view.
A path missing on the tools side (a slim tools image without /etc/hosts, a host without
/var/lib/cntr) is spliced in on a tmpfs, never created on disk (see attach.c).

Terminal: a PTY (allocated on the container's own devpts) only when stdin and stdout are
both terminals and the caller did not redirect them; otherwise the command gets the
caller's file descriptors as they are -- no copying, so pipes stay binary-safe.
Sessions: with a PTY the command leads the PTY's session; without one it leads a session
of its own unless its stdin is a terminal (then it stays in the caller's foreground
process group, so ^C/^Z from that terminal reach it and job control works). When the
command ends or the session is closed, whatever is left in the command's session --
background jobs, daemons it started -- is killed (``kill_session``); only processes that
left the session themselves (setsid) survive, as they would an ssh logout.
Exit status: the command's, or 128+N when signal N killed it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from dvs.container import context as ctxmod
from dvs.container import terminal
from dvs.container.context import CAP_SYS_PTRACE, TargetContext, read_context
from dvs.container.errors import AttachFailed
from dvs.container.resolve import Env, Target, resolve
from dvs.container.views import DEFAULT_PATH, ToolsView, open_view, tools_root
from dvs.errors import DvsError, NotPermitted, TargetGone
from dvs.lowlevel import container as llc
from dvs.lowlevel import sys as llsys

DEFAULT_BASE_DIR = "/var/lib/cntr"
#: container paths mounted over the tools view (relative to both roots)
OVERLAYS: tuple[str, ...] = (
    "proc",
    "dev",
    "sys",
    "etc/passwd",
    "etc/group",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/localtime",
)
log = logging.getLogger("dvs.container")
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
#: capabilities dvs itself needs (SYS_ADMIN: mounts, setns; SYS_PTRACE: /proc of others,
#: seccomp copy; SYS_CHROOT; SETUID/SETGID; SETPCAP: bounding set; DAC_OVERRIDE: /proc)
REQUIRED_CAPS = (21, 19, 18, 7, 6, 8, 1)
_CLD_EXITED = 1

StdSpec = int | IO[Any] | None


@dataclass
class AttachOptions:
    """How to attach; the CLI flags map one to one."""

    types: Sequence[str] | str | None = None  # resolvers to try (default: all but command)
    tools: str | None = None  # directory or OCI bundle; None: the host
    backend: str = "mount"
    base_dir: str = DEFAULT_BASE_DIR
    ptrace: bool = False  # add CAP_SYS_PTRACE to the bounding set
    seccomp: bool = True  # inherit the target's seccomp filters
    lsm: bool = True  # take on the target's AppArmor/SELinux label
    idmap: bool = True  # id-map the tools view for user-namespaced targets
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment
    tty: bool | None = None  # None: a PTY iff stdin and stdout are terminals
    kill_session: bool = True  # at the end, kill what is left in the command's session
    start_timeout: float = 30.0


def require_privileges() -> None:
    """NotPermitted unless we run as root (or hold every capability attach needs)."""
    if os.geteuid() == 0:
        return
    with open("/proc/self/status") as f:
        status = ctxmod.parse_status(f.read())
    eff = int(status.get("CapEff", "0"), 16)
    missing = [cap for cap in REQUIRED_CAPS if not eff & (1 << cap)]
    if missing:
        raise NotPermitted(
            f"container attach needs root (this process runs as uid {os.geteuid()} "
            "without CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_CHROOT, CAP_SETUID/SETGID and "
            "CAP_SETPCAP); nothing was done to the target"
        )


def _default_shell(root: str) -> str:
    shell = os.environ.get("SHELL", "")
    if shell.startswith("/") and os.path.exists(os.path.join(root, shell.lstrip("/"))):
        return shell
    return "/bin/sh"


def _build_env(
    entries: Sequence[bytes],
    path: bytes | None,
    tty: bool,
    extra: Mapping[str, str],
) -> list[bytes]:
    env: dict[bytes, bytes] = {}
    for key, value in ctxmod.iter_env(entries):
        env[key] = value
    if path is not None:
        env[b"PATH"] = path
    if tty and "TERM" in os.environ:
        env[b"TERM"] = os.environ["TERM"].encode()
    for name, text in extra.items():
        env[name.encode()] = text.encode()
    return [k + b"=" + v for k, v in env.items()]


def _winsize(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols
    except OSError:
        return 0, 0


class Session:
    """One attached command. Use as a context manager, or call start()/wait()/close().

    ``command`` defaults to the user's login shell (attach) or /bin/sh (exec). ``stdin``,
    ``stdout`` and ``stderr`` take None (inherit), PIPE, DEVNULL, an fd or a file object;
    with PIPE the matching attribute is a binary file object. ``mode`` is "attach" or "exec".
    """

    def __init__(
        self,
        target: str | int | Target,
        command: Sequence[str] | None = None,
        *,
        mode: str = "attach",
        options: AttachOptions | None = None,
        stdin: StdSpec = None,
        stdout: StdSpec = None,
        stderr: StdSpec = None,
        env: Env | None = None,
    ) -> None:
        if mode not in ("attach", "exec"):
            raise ValueError(f"mode must be 'attach' or 'exec', not {mode!r}")
        self.mode = mode
        self.options = options or AttachOptions()
        self.command = list(command) if command else None
        self._target_spec = target
        self._std = (stdin, stdout, stderr)
        self._resolve_env = env
        self.target: Target | None = None
        self.context: TargetContext | None = None
        self.view: ToolsView | None = None
        self.warnings: list[str] = []
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self.pid: int | None = None  # the command's host pid
        self.returncode: int | None = None  # exit status, or 128+signal
        self.signal: int | None = None  # the signal that killed it
        self.tty = False
        self.own_session = False  # the command leads a session (PTY, or no tty on stdin)
        self.master_fd: int | None = None
        self._cmd_pidfd = -1
        self._sock: socket.socket | None = None
        self._keeper_pid = -1
        self._keeper_pidfd = -1
        self._owns_target = not isinstance(target, Target)
        self._lock = threading.Lock()
        self._tty_saved: list[Any] | None = None  # our terminal's mode while it is raw

    # -- starting -----------------------------------------------------------------------
    def start(self) -> Session:
        require_privileges()
        options = self.options
        spec = self._target_spec
        if isinstance(spec, Target):
            self.target = spec
        else:
            types = ["pid"] if isinstance(spec, int) else options.types
            self.target = resolve(str(spec), types, self._resolve_env)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        assert self.target is not None
        options = self.options
        base_dir = os.path.normpath(options.base_dir)
        if not base_dir.startswith("/") or base_dir == "/":
            raise DvsError(f"the base directory must be an absolute path below /, not {base_dir!r}")
        ctx = self.context = read_context(self.target)
        attach_mode = self.mode == "attach"

        # what the command runs with
        if attach_mode:
            tools = tools_root(options.tools)
            root_dir = tools.path
            search_path: bytes | None = tools.search_path.encode()
            argv = self.command or [_default_shell(root_dir), "-l"]
            cwd = base_dir
        else:
            tools = None
            search_path = ctx.env_value(b"PATH") or DEFAULT_PATH.encode()
            argv = self.command or ["/bin/sh"]
            cwd = ctx.cwd
        stdin, stdout, stderr = self._std
        want_tty = options.tty
        if want_tty is None:
            want_tty = stdin is None and stdout is None and os.isatty(0) and os.isatty(1)
        self.tty = bool(want_tty)
        envp = _build_env(ctx.environ, search_path if attach_mode else None, self.tty, options.env)

        filters: list[llc.SeccompFilter] = []
        if options.seccomp and ctx.seccomp_mode == 2:
            try:
                filters = llc.seccomp_copy(self.target.pid)
            except OSError as exc:
                if not self.target.alive():
                    raise TargetGone(f"{self.target} exited during attach") from None
                raise AttachFailed(
                    "copying the target's seccomp filters",
                    exc.errno or errno.EIO,
                    "is it being traced (gdb, strace)? --no-seccomp attaches without them",
                ) from None
        elif options.seccomp and ctx.seccomp_mode == 1:
            self.warnings.append(
                "the target is in seccomp strict mode, which no command can start in; "
                "attaching without it"
            )
        lsm = (
            ctxmod.plan_lsm(ctxmod.host_active_lsms(), ctx.labels, ctxmod.own_labels())
            if options.lsm
            else None
        )

        fds_for_child: list[int] = []
        try:
            cgroup_fds = self._open_cgroups(ctx, fds_for_child)
            tools_fd = -1
            if attach_mode:
                assert tools is not None
                self.view = open_view(options.backend, tools.path, idmap=options.idmap)
                tools_fd = self.view.make_mount_fd(ctx)
                fds_for_child.append(tools_fd)
                self.warnings.extend(getattr(self.view, "warnings", []))
            stdio = self._open_stdio(stdin, stdout, stderr, fds_for_child)
            # without a terminal on stdin nobody does job control for the command: give it
            # a session of its own, so what it leaves running is found by session id
            self.own_session = self.tty or not os.isatty(stdio[0] if stdio[0] >= 0 else 0)
            rows = cols = 0
            fallback_slave = -1
            if self.tty:
                rows, cols = _winsize(1)
                master, fallback_slave = os.openpty()
                self.master_fd = master
                fds_for_child.append(fallback_slave)
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._sock = parent_sock
            fds_for_child.append(child_sock.detach())
            host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fds_for_child.append(host_proc)

            request = llc.AttachRequest(
                mode=llc.MODE_ATTACH if attach_mode else llc.MODE_EXEC,
                report_fd=fds_for_child[-2],
                host_proc_fd=host_proc,
                mnt_ns_fd=ctx.ns_fds["mnt"],
                root_fd=ctx.root_fd,
                argv=[os.fsencode(a) for a in argv],
                envp=envp,
                search_path=search_path,
                cgroup_fds=cgroup_fds,
                namespaces=ctx.namespaces_to_join(),
                tools_fd=tools_fd,
                base_dir=base_dir if attach_mode else None,
                overlays=OVERLAYS if attach_mode else (),
                cwd=cwd,
                set_ids=True,
                uid=ctx.uid,
                gid=ctx.gid,
                groups=ctx.groups,
                cap_keep=ctx.cap_effective | ((1 << CAP_SYS_PTRACE) if options.ptrace else 0),
                cap_last=ctx.cap_last,
                cap_sets=ctx.cap_sets,
                no_new_privs=ctx.no_new_privs,
                filters=filters,
                lsm_attr=lsm.attr if lsm else None,
                lsm_value=lsm.value if lsm else None,
                use_pty=self.tty,
                rows=rows,
                cols=cols,
                fallback_pty_slave=fallback_slave,
                stdio=stdio,
                new_session=self.own_session and not self.tty,
                kill_session=options.kill_session,
            )
            if not self.target.alive():
                raise TargetGone(f"{self.target} exited before dvs could attach")
            self._keeper_pid, self._keeper_pidfd = llc.attach_start(request)
        finally:
            for fd in fds_for_child:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wait_started()

    def _open_cgroups(self, ctx: TargetContext, keep: list[int]) -> list[int]:
        with open("/proc/self/mountinfo") as f:
            v1, v2 = ctxmod.cgroup_mounts(f.read())
        paths = ctxmod.cgroup_procs_paths(ctx.cgroup_lines, ctxmod.own_cgroup_lines(), v1, v2)
        fds = []
        for path in paths:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.warnings.append(f"cannot join cgroup {path}: {exc.strerror}")
                continue
            keep.append(fd)
            fds.append(fd)
        return fds

    def _open_stdio(
        self,
        stdin: StdSpec,
        stdout: StdSpec,
        stderr: StdSpec,
        for_child: list[int],
    ) -> tuple[int, int, int]:
        result = []
        for index, spec in enumerate((stdin, stdout, stderr)):
            if spec is None:
                result.append(-1)
            elif spec == PIPE:
                r, w = os.pipe()
                child, parent = (r, w) if index == 0 else (w, r)
                for_child.append(child)
                f = os.fdopen(parent, "wb" if index == 0 else "rb", buffering=0)
                setattr(self, ("stdin", "stdout", "stderr")[index], f)
                result.append(child)
            elif spec == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                for_child.append(fd)
                result.append(fd)
            elif isinstance(spec, int):
                result.append(spec)
            else:
                result.append(spec.fileno())
        return result[0], result[1], result[2]

    def _report(self, timeout: float | None) -> llc.AttachMessage | None:
        assert self._sock is not None
        return llc.attach_recv(self._sock.fileno(), timeout)

    def _wait_started(self) -> None:
        deadline = time.monotonic() + self.options.start_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self._report(max(remaining, 0.0))
            except TimeoutError:
                raise AttachFailed(
                    "waiting for the command to start",
                    errno.ETIMEDOUT,
                    f"no answer within {self.options.start_timeout:g} s",
                ) from None
            if msg is None:
                self._raise_gone_or(
                    AttachFailed(
                        "starting the attach helper",
                        errno.EPIPE,
                        "the helper exited without a report",
                    )
                )
            elif msg.kind == llc.MSG_WARN:
                self._note_warning(msg)
            elif msg.kind == llc.MSG_PTY:
                if msg.fd >= 0:
                    if self.master_fd is not None:
                        os.close(self.master_fd)
                    self.master_fd = msg.fd
            elif msg.kind == llc.MSG_FAIL:
                self._raise_gone_or(self._failure(msg))
            elif msg.kind == llc.MSG_STARTED:
                self.pid = int(msg.value)
                self._cmd_pidfd = msg.fd
                return

    def _raise_gone_or(self, error: DvsError) -> None:
        assert self.target is not None
        if not self.target.alive():
            raise TargetGone(f"{self.target} exited during attach") from None
        raise error

    def _describe(self, msg: llc.AttachMessage) -> str:
        step = llc.STEP_NAMES.get(msg.step, f"step {msg.step}")
        if msg.step in (llc.STEP_OVERLAY, llc.STEP_OVERLAY_SOURCE) and msg.index < len(OVERLAYS):
            step += f" /{OVERLAYS[msg.index]}"
        elif msg.step == llc.STEP_SETNS and self.context is not None:
            joined = [
                n
                for n in ctxmod.NS_ORDER
                if n in self.context.ns_fds and n not in self.context.ns_shared
            ]
            if msg.index < len(joined):
                step += f" ({joined[msg.index]})"
        return step

    def _failure(self, msg: llc.AttachMessage) -> AttachFailed:
        step = self._describe(msg)
        detail = ""
        if msg.step == llc.STEP_EXEC and self.command:
            detail = f"{self.command[0]!r}"
            if msg.err == errno.ENOENT:
                detail += " not found" + (
                    " in the tools' PATH" if self.mode == "attach" else " in the container's PATH"
                )
        elif msg.step == llc.STEP_SECCOMP:
            detail = "the target's filter refuses a step of the set-up; try --no-seccomp"
        elif msg.step == llc.STEP_BASE_DIR:
            detail = f"base directory {self.options.base_dir}"
        return AttachFailed(step, msg.err, detail)

    def _note_warning(self, msg: llc.AttachMessage) -> None:
        if msg.step == llc.STEP_OVERLAY_SOURCE:
            return  # the container simply lacks that file (e.g. no /etc/localtime)
        self.warnings.append(f"{self._describe(msg)}: {os.strerror(msg.err)}")

    # -- running ------------------------------------------------------------------------
    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command (through its pidfd: never to a recycled pid)."""
        if self._cmd_pidfd >= 0 and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                llsys.pidfd_send_signal(self._cmd_pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None and self._sock is not None:
            self._pump(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command; return its exit status (128+N if signal N killed it)."""
        if self.returncode is not None:
            return self.returncode
        if self.tty and self.master_fd is not None:
            return self.interact()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self._status()) is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._pump(remaining) and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the command is still running after {timeout} s")
        return status

    def _status(self) -> int | None:
        return self.returncode

    def _pump(self, timeout: float | None) -> bool:
        """Handle one report; False on timeout."""
        try:
            msg = self._report(timeout)
        except TimeoutError:
            return False
        self._handle(msg)
        return True

    def _handle(self, msg: llc.AttachMessage | None) -> None:
        if msg is None:
            # the keeper vanished without a report: the command cannot outlive it
            self._finish(128 + signal.SIGKILL, signal.SIGKILL)
        elif msg.kind == llc.MSG_EXITED:
            if msg.index == _CLD_EXITED:
                self._finish(int(msg.value), None)
            else:
                self._finish(128 + int(msg.value), int(msg.value))
        elif msg.kind == llc.MSG_WARN:
            self._note_warning(msg)
        elif msg.kind == llc.MSG_STOPPED and self.tty:
            terminal.stop_self_and_resume(self)

    def _finish(self, status: int, sig: int | None) -> None:
        self.returncode = status
        self.signal = sig
        self._reap_keeper()

    def interact(self) -> int:
        """Connect our terminal to the command's PTY until it exits (raw mode, SIGWINCH)."""
        assert self.master_fd is not None and self._sock is not None
        terminal.run_pty_session(self, self.master_fd, self._sock.fileno())
        assert self.returncode is not None
        return self.returncode

    def communicate(self, data: bytes = b"", timeout: float | None = None) -> tuple[bytes, bytes]:
        """Feed ``data`` to stdin (PIPE), read stdout/stderr (PIPE) to EOF, wait."""
        out, err = terminal.communicate(self, data, timeout)
        self.wait(timeout)
        return out, err

    # -- ending -------------------------------------------------------------------------
    def _reap_keeper(self, timeout: float = 10.0) -> None:
        if self._keeper_pidfd < 0:
            return
        ready, _, _ = select.select([self._keeper_pidfd], [], [], timeout)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                llsys.pidfd_send_signal(self._keeper_pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self._keeper_pidfd, os.WEXITED)
        os.close(self._keeper_pidfd)
        self._keeper_pidfd = -1

    def close(self) -> None:
        """End the session: the command (if still running) is killed, everything freed."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # the keeper kills the command and exits
                self._sock = None
            self._reap_keeper()
            if self.returncode is None and self.pid is not None:
                self.returncode, self.signal = 128 + signal.SIGKILL, signal.SIGKILL
            for f in (self.stdin, self.stdout, self.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            if self.master_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.master_fd)
                self.master_fd = None
            if self._cmd_pidfd >= 0:
                os.close(self._cmd_pidfd)
                self._cmd_pidfd = -1
            if self.view is not None:
                self.view.close()
                self.view = None
            if self.context is not None:
                self.context.close()
                self.context = None
            if self.target is not None and self._owns_target:
                self.target.close()

    def __enter__(self) -> Session:
        if self._sock is None and self.returncode is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    target: str | int | Target,
    command: Sequence[str] | None = None,
    *,
    options: AttachOptions | None = None,
    stdin: StdSpec = None,
    stdout: StdSpec = None,
    stderr: StdSpec = None,
    **option_values: Any,
) -> int:
    """Attach the tools to ``target``, run ``command`` (default: login shell), return its
    exit status. Keyword arguments not named above set ``AttachOptions`` fields."""
    opts = options or AttachOptions(**option_values)
    with Session(target, command, options=opts, stdin=stdin, stdout=stdout, stderr=stderr) as s:
        for warning in s.warnings:
            log.warning("%s", warning)
        return s.wait()


def exec_in(
    target: str | int | Target,
    command: Sequence[str] | None = None,
    *,
    options: AttachOptions | None = None,
    stdin: StdSpec = None,
    stdout: StdSpec = None,
    stderr: StdSpec = None,
    **option_values: Any,
) -> int:
    """Run ``command`` (default /bin/sh) in ``target``'s own root; return its exit status."""
    opts = options or AttachOptions(**option_values)
    with Session(
        target, command, mode="exec", options=opts, stdin=stdin, stdout=stdout, stderr=stderr
    ) as s:
        for warning in s.warnings:
            log.warning("%s", warning)
        return s.wait()
