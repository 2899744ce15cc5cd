"""``dvs container attach`` and ``dvs container exec``.

``attach [-t TYPES] [--tools PATH] [--backend mount|fuse] [--base-dir DIR] ID [-- CMD...]``
shows the tools (the host, a directory or an OCI bundle) at / and the container at the
base directory, and runs CMD (default: ``$SHELL -l``). ``exec ID [-- CMD...]`` runs CMD
(default /bin/sh) in the container's own root. The first word after ID starts the command
even without ``--``. Exit status: the command's, 128+N if signal N killed it, 1 when dvs
itself failed (the message says which step and what was tried).

Signals in pipe mode: when stdin is a terminal the command sits in our process group, so
^C and ^\\ from the terminal reach it directly and dvs ignores them; otherwise the command
leads its own session and dvs passes them on. SIGTERM and SIGHUP sent to dvs are passed on
to the command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from dvs.cli import Cli
from dvs.container.attach import DEFAULT_BASE_DIR, AttachOptions, Session
from dvs.container.resolve import TYPES
from dvs.container.views import BACKENDS


def register(cli: Cli) -> None:
    cli.group("container", "attach tools to running containers")
    attach = cli.command(
        "attach",
        "attach host (or tools-image) tools to a running container",
        _attach,
        group="container",
    )
    _common(attach)
    attach.add_argument(
        "--tools", metavar="PATH", help="tools root: a directory or an OCI bundle (default: /)"
    )
    attach.add_argument("--backend", choices=BACKENDS, default="mount", help="tools view")
    attach.add_argument(
        "--base-dir",
        default=os.environ.get("DVS_BASE_DIR", DEFAULT_BASE_DIR),
        metavar="DIR",
        help=f"where the container's root appears (default: {DEFAULT_BASE_DIR})",
    )
    attach.add_argument(
        "--no-idmap",
        action="store_true",
        help="do not id-map the tools for user-namespaced containers",
    )
    _command(attach, "command (default: $SHELL -l)")

    exec_cmd = cli.command(
        "exec", "run a command in a running container's own root", _exec, group="container"
    )
    _common(exec_cmd)
    _command(exec_cmd, "command (default: /bin/sh)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-t",
        "--type",
        dest="types",
        metavar="TYPES",
        help=f"comma-separated resolvers to try, in order ({', '.join(TYPES)})",
    )
    p.add_argument("--ptrace", action="store_true", help="allow ptrace (gdb, strace)")
    p.add_argument("--no-seccomp", action="store_true", help="do not inherit the seccomp filter")
    p.add_argument(
        "--no-lsm", action="store_true", help="do not take on the AppArmor/SELinux label"
    )
    tty = p.add_mutually_exclusive_group()
    tty.add_argument(
        "--tty", dest="tty", action="store_const", const=True, default=None, help="always use a PTY"
    )
    tty.add_argument(
        "--no-tty", dest="tty", action="store_const", const=False, help="never use a PTY"
    )
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable",
    )
    p.add_argument("id", metavar="ID", help="container name/id, pid, or command-line text")


def _command(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD", help=help)


def _options(args: argparse.Namespace) -> AttachOptions:
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"dvs: error: -e expects KEY=VALUE, got {item!r}")
        env[key] = value
    return AttachOptions(
        types=args.types,
        tools=getattr(args, "tools", None),
        backend=getattr(args, "backend", "mount"),
        base_dir=getattr(args, "base_dir", DEFAULT_BASE_DIR),
        ptrace=args.ptrace,
        seccomp=not args.no_seccomp,
        lsm=not args.no_lsm,
        idmap=not getattr(args, "no_idmap", False),
        env=env,
        tty=args.tty,
    )


def _argv(args: argparse.Namespace) -> list[str] | None:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return command or None


@contextlib.contextmanager
def _signals_for(session: Session) -> Iterator[None]:
    """Pipe mode: pass SIGTERM/SIGHUP on; ^C/^\\ from the terminal reach a command in our
    process group directly (so we ignore them), one in a session of its own through us."""

    def forward(sig: int, _frame: object) -> None:
        session.send_signal(sig)

    terminal_signal = forward if session.own_session else signal.SIG_IGN
    handled: dict[signal.Signals, Any] = {
        signal.SIGINT: terminal_signal,
        signal.SIGQUIT: terminal_signal,
        signal.SIGTERM: forward,
        signal.SIGHUP: forward,
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handled.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, mode: str) -> int:
    with Session(args.id, _argv(args), mode=mode, options=_options(args)) as session:
        for warning in session.warnings:
            print(f"dvs: warning: {warning}", file=sys.stderr)
        if session.tty:
            return session.interact()
        with _signals_for(session):
            return session.wait()


def _attach(args: argparse.Namespace) -> int:
    return _run(args, "attach")


def _exec(args: argparse.Namespace) -> int:
    return _run(args, "exec")
