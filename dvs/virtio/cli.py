"""``dvs vm serve-blk FILE SOCKET``: serve a disk image to a VM over vhost-user.

The command runs in the foreground until SIGINT/SIGTERM, then prints what it served. Start
QEMU (or any vhost-user front-end) with guest RAM shared and the socket as a chardev::

    dvs vm serve-blk disk.img /run/disk.sock &
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \\
        -numa node,memdev=mem -chardev socket,id=disk,path=/run/disk.sock \\
        -device vhost-user-blk-pci,chardev=disk

``--sealed`` serves a sealed volume of ``dvs.shield`` (made with ``dvs shield format``)
instead of a plain file: the guest sees plaintext, the file holds authenticated ciphertext,
and a tampered block is an I/O error in the guest. Its key comes the way ``dvs shield`` takes
it (``--key-file``, ``--passphrase-file`` or the ``DVS_SHIELD_PASSPHRASE`` environment
variable; never the command line). Builds without ``dvs.shield`` refuse ``--sealed`` clearly.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import threading

from dvs.cli import Cli
from dvs.errors import DvsError
from dvs.shield.cli import add_key_args


class SealedVolumeUnavailable(DvsError):
    """``--sealed`` was asked for, but this build has no shield volume to serve."""


def _have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _serve_blk(args: argparse.Namespace) -> int:
    from dvs.virtio.server import BlkServer

    key: dict[str, object] = {}
    if args.sealed:
        if not _have_module("dvs.shield.volume"):
            raise SealedVolumeUnavailable(
                "--sealed needs the shielded volume (dvs.shield.volume), which this build of "
                "dvs does not have; serve a plain image without --sealed"
            )
        from dvs.shield.cli import read_key  # the one place dvs reads volume keys

        key = read_key(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with BlkServer(
        args.file,
        args.socket,
        read_only=args.read_only,
        device_id=args.id,
        num_queues=args.queues,
        engine=args.engine,
        sealed=args.sealed,
        key=key.get("key"),  # type: ignore[arg-type]
        passphrase=key.get("passphrase"),  # type: ignore[arg-type]
    ) as server:
        mode = "read-only" if args.read_only else "read-write"
        if args.sealed:
            mode += ", sealed volume"
        print(
            f"dvs: serving {args.file} ({mode}, {server.engine}) as vhost-user-blk on "
            f"{args.socket}",
            flush=True,
        )
        stop.wait()
        stats = server.stats()
    blk = stats.blk
    print(
        f"dvs: served {stats.connections} connection(s), {blk.requests} requests "
        f"({blk.bytes_read} bytes read, {blk.bytes_written} written, {blk.errors} errors)"
    )
    if stats.vhost.queue_rule:
        print(f"dvs: the guest broke a virtqueue rule: {stats.vhost.queue_rule}", file=sys.stderr)
    for error in stats.protocol_errors:
        print(f"dvs: a front-end broke the vhost-user protocol: {error}", file=sys.stderr)
    return 0


def register(cli: Cli) -> None:
    sub = cli.command(
        "serve-blk",
        "serve a disk image to a VM as a vhost-user-blk device",
        _serve_blk,
        group="vm",
    )
    sub.add_argument("file", help="the disk image or block device to serve")
    sub.add_argument("socket", help="the unix socket path QEMU connects to")
    sub.add_argument("--read-only", action="store_true", help="refuse guest writes")
    sub.add_argument(
        "--sealed", action="store_true", help="FILE is a sealed volume (dvs shield format)"
    )
    sub.add_argument("--id", default="dvs", help="the disk's serial (virtio GET_ID), max 20 bytes")
    sub.add_argument("--queues", type=int, default=1, help="request queues (1-16)")
    sub.add_argument(
        "--engine",
        choices=["io_uring", "sync"],
        help="how disk I/O is done (default: io_uring where the kernel allows it)",
    )
    add_key_args(sub, "key of a --sealed volume (never on the command line)")
