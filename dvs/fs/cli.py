"""``dvs fs mount`` / ``dvs fs umount``: CntrFS on any directory, like a FUSE mount helper.

``mount`` runs as a daemon by default: it returns once the filesystem is mounted and
initialised (or fails with the reason), and the daemon ends by itself when the filesystem
is unmounted -- the kernel then fails the server's device reads with ENODEV. With
``--foreground`` the command stays attached until it is unmounted or interrupted (SIGINT or
SIGTERM unmount lazily and abort the connection). ``umount`` is umount(2); ``--lazy``
detaches a busy mount, which keeps serving open files until they are closed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import replace
from types import FrameType

from dvs.cli import Cli
from dvs.errors import DvsError
from dvs.fs.server import CntrFs, MountOptions, read_id_map
from dvs.lowlevel import sys as llsys


def register(cli: Cli) -> None:
    cli.group("fs", "CntrFS: serve a directory through the FUSE proxy filesystem")
    mount = cli.command(
        "mount",
        "mount SOURCE at MOUNTPOINT through CntrFS (a daemon unless --foreground)",
        _mount,
        group="fs",
    )
    mount.add_argument("source", help="directory to serve")
    mount.add_argument("mountpoint", help="existing directory to mount on")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="comma-separated: ro, nosuid, nodev, noexec, nopassthrough, nowriteback, "
        "timeout=S, entry_timeout=S, attr_timeout=S, workers=N, max_pages=N, fd_budget=N, "
        "uid_map=IN:OUT:COUNT[/...], gid_map=..., debug, "
        "uring=auto|on|off (FUSE over io_uring), enable_uring (set the host's fuse "
        "enable_uring knob to Y around this mount's INIT), ring_threads=N, ring_depth=N, "
        "uring_nopin",
    )
    mount.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    mount.add_argument(
        "--no-passthrough",
        action="store_true",
        help="serve reads and writes in the daemon (benchmark baseline, fallback)",
    )
    mount.add_argument(
        "--maps-of",
        type=int,
        metavar="PID",
        help="translate ids through this process's uid_map/gid_map (a container's init)",
    )
    mount.add_argument("-v", "--verbose", action="store_true", help="log negotiation results")
    umount = cli.command("umount", "unmount a CntrFS (or any) mount", _umount, group="fs")
    umount.add_argument("mountpoint")
    umount.add_argument("-l", "--lazy", action="store_true", help="detach a busy mount")


def _options(args: argparse.Namespace) -> MountOptions:
    opts = MountOptions()
    for text in args.options:
        opts = MountOptions.parse(text, opts)
    if args.no_passthrough:
        opts = MountOptions.parse("nopassthrough", opts)
    if args.maps_of:
        opts = replace(
            opts,
            uid_map=read_id_map(args.maps_of, "uid"),
            gid_map=read_id_map(args.maps_of, "gid"),
        )
    return opts


def _stop_on_sigterm() -> None:
    """Make SIGTERM end the server like ^C does (installed before the mount is announced,
    so a SIGTERM right after the announcement still unmounts cleanly)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _serve(fs: CntrFs) -> None:
    """Block until the filesystem is unmounted; SIGINT/SIGTERM stop it."""
    try:
        while not fs.wait_unmounted(0.5):
            fs.log_lines()
    except KeyboardInterrupt:
        pass
    finally:
        fs.close()


def _mount(args: argparse.Namespace) -> int:
    opts = _options(args)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="dvs fs: %(message)s",
    )
    for path, what in ((args.source, "source"), (args.mountpoint, "mount point")):
        if not os.path.isdir(path):
            raise DvsError(f"the {what} {path!r} is not a directory")
    if args.foreground:
        _stop_on_sigterm()
        fs = CntrFs(args.source, opts)
        try:
            fs.mount(args.mountpoint)
        except BaseException:
            fs.close()
            raise
        print(f"dvs fs: {fs.source} mounted at {fs.mountpoint}; Ctrl-C unmounts", flush=True)
        _serve(fs)
        return 0
    return _daemonize(args, opts)


def _daemonize(args: argparse.Namespace, opts: MountOptions) -> int:
    """Fork before any server thread exists; report the mount result through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as status:
            message = status.read().decode(errors="replace")
        os.waitpid(pid, 0)  # the intermediate child exits once the daemon is forked
        if message.startswith("ok"):
            return 0
        raise DvsError(message.strip() or "the CntrFS daemon died before mounting")
    os.close(read_end)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _stop_on_sigterm()
        fs = CntrFs(args.source, opts)
        fs.mount(args.mountpoint)
        os.write(write_end, b"ok\n")
        os.close(write_end)
    except BaseException as exc:  # report any failure to the waiting parent
        try:
            os.write(write_end, f"{exc}\n".encode())
        finally:
            os._exit(1)
    _serve(fs)
    os._exit(0)


def _umount(args: argparse.Namespace) -> int:
    try:
        llsys.umount2(args.mountpoint, llsys.MNT_DETACH if args.lazy else 0)
    except OSError as exc:
        raise DvsError(f"umount {args.mountpoint}: {exc.strerror}") from exc
    return 0
