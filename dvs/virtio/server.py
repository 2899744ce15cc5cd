"""``BlkServer``: serve a file (or block device) to a VM as a vhost-user-blk disk.

How the pieces fit: QEMU (the vhost-user *front-end*) is started with guest RAM in a
shareable memfd (``-object memory-backend-memfd,share=on``) and
``-chardev socket,path=SOCKET -device vhost-user-blk-pci,chardev=...``. It connects to our
listening unix socket, negotiates features, hands us the memfd regions of guest RAM and one
kick/call eventfd pair per queue. From then on the guest's virtio_blk driver talks to our C
device model directly through shared memory; QEMU is not on the data path. The C loop
(``dvs_vu_serve``) runs on a thread of its own with the GIL released. A front-end that
breaks the vhost-user protocol is disconnected and the server waits for the next one (QEMU
reconnects with ``reconnect=N`` on its chardev); a guest that breaks a virtqueue rule gets
that queue stopped (``stats().vhost.queue_rule``), which QEMU reports as a vring error.

Policy decisions made here: the backing file is opened ``O_CLOEXEC`` and ``O_RDONLY`` for
read-only disks; the capacity is the file size rounded down to 512 bytes; the socket path
is created fresh (a stale socket file from a previous run is removed, anything else there
is refused) and removed again on ``close()``.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from dvs.errors import DvsError
from dvs.lowlevel.virtio import (
    BlkDevice,
    BlkEngine,
    BlkStats,
    VhostUserBlk,
    VhostUserProtocolError,
    VhostUserStats,
)


def default_engine() -> BlkEngine:
    """``io_uring`` when the probe could set up a ring with read/write/fsync, else ``sync``."""
    from dvs.probe import probe

    return "io_uring" if probe().io_uring.supports("READ", "WRITE", "FSYNC") else "sync"


class ServerError(DvsError):
    """The block server could not start (socket path taken, image unusable...)."""


@dataclass(frozen=True)
class ServerStats:
    blk: BlkStats
    vhost: VhostUserStats
    connections: int
    protocol_errors: tuple[str, ...]


class BlkServer:
    """A vhost-user-blk back-end for ``image`` listening on ``socket_path``.

    Use as a context manager (or ``start()``/``close()``)::

        with BlkServer("disk.img", "/run/disk.sock") as server:
            ...  # start QEMU with -chardev socket,path=/run/disk.sock

    With ``sealed=True`` the image is a sealed volume of ``dvs.shield`` (opened with ``key``
    or ``passphrase``): the guest sees its plaintext, the file holds only authenticated
    ciphertext, a guest FLUSH is a durable atomic commit, and a tampered block reaches the
    guest as an I/O error.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        device_id: str = "dvs",
        num_queues: int = 1,
        engine: BlkEngine | None = None,
        depth: int = 0,
        poll_us: int = 0,
        sealed: bool = False,
        key: bytes | None = None,
        passphrase: str | None = None,
    ) -> None:
        """``engine``: how disk I/O is done (``BlkDevice``); default ``io_uring`` where
        the probe finds a usable ring, else ``sync``. A sealed volume does its own I/O."""
        self.image = Path(image)
        self.socket_path = Path(socket_path)
        self.read_only = read_only
        self.device_id = device_id.encode()
        self.num_queues = num_queues
        self.sealed = sealed
        self.engine: BlkEngine = "sync" if sealed else (engine or default_engine())
        self.depth = depth
        self.poll_us = poll_us
        self._key = key
        self._passphrase = passphrase
        self._fd = -1
        self._stop_fd = -1
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._device: BlkDevice | None = None
        self._backend: VhostUserBlk | None = None
        self._volume: Any = None
        self._ready = threading.Event()
        self._connections = 0
        self._protocol_errors: list[str] = []
        self._failure: BaseException | None = None
        self._last_stats: ServerStats | None = None

    # --- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> BlkServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, timeout: float = 120.0) -> None:
        """Open the storage and listen; returns once front-ends can connect. The storage is
        opened on the serving thread, which every engine bound to one thread needs (the
        io_uring ring, a sealed volume's engine)."""
        try:
            self._listen()
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
            self._thread = threading.Thread(
                target=self._run, name=f"dvs-vhost-user-blk {self.socket_path}", daemon=True
            )
            self._thread.start()
            if not self._ready.wait(timeout):
                raise ServerError(f"the storage of {self.image} did not open within {timeout} s")
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
        except BaseException:
            self.close()
            raise

    def _open_storage(self) -> None:
        if self.sealed:
            from dvs.shield.volume import Volume

            try:
                self._volume = Volume.open(
                    self.image,
                    key=self._key,
                    passphrase=self._passphrase,
                    readonly=self.read_only,
                )
            except OSError as exc:
                raise ServerError(f"cannot open the sealed volume {self.image}: {exc}") from exc
            self._device = BlkDevice.on_sealed_volume(
                self._volume._live(),  # the volume's C handle, served from this thread
                read_only=self.read_only,
                device_id=self.device_id,
                num_queues=self.num_queues,
            )
        else:
            flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
            try:
                self._fd = os.open(self.image, flags)
            except OSError as exc:
                raise ServerError(f"cannot open the disk image {self.image}: {exc}") from exc
            self._device = BlkDevice(
                self._fd,
                read_only=self.read_only,
                device_id=self.device_id,
                num_queues=self.num_queues,
                engine=self.engine,
                depth=self.depth,
            )
        if self._device.capacity_sectors == 0:
            raise ServerError(f"{self.image} is smaller than one 512-byte sector")
        self._backend = VhostUserBlk(self._device, poll_us=self.poll_us)

    def _close_storage(self) -> None:
        self._backend = None
        if self._device is not None:
            self._device.close()
        if self._volume is not None:
            volume, self._volume = self._volume, None
            volume.close()  # commits what the guest wrote since its last flush
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _listen(self) -> None:
        try:
            mode = self.socket_path.lstat().st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise ServerError(f"{self.socket_path} exists and is not a socket")
            self.socket_path.unlink()  # a stale socket of an earlier server
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(1)
        except OSError as exc:
            listener.close()
            raise ServerError(f"cannot listen on {self.socket_path}: {exc}") from exc
        self._listener = listener

    def _run(self) -> None:
        """The serving thread: open the storage, serve front-ends, close the storage."""
        try:
            self._open_storage()
        except BaseException as exc:
            self._failure = exc
            self._close_storage()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve()
        except BaseException as exc:  # reported by close(); the thread must not die silently
            self._failure = exc
        finally:
            try:
                self._close_storage()
            except BaseException as exc:
                self._failure = self._failure or exc

    def _serve(self) -> None:
        """Accept front-ends one at a time until stopped."""
        assert self._listener is not None and self._backend is not None
        while True:
            ready, _, _ = select.select([self._listener.fileno(), self._stop_fd], [], [])
            if self._stop_fd in ready:
                return
            connection, _ = self._listener.accept()
            self._connections += 1
            with connection:
                try:
                    if self._backend.serve(connection.fileno(), self._stop_fd):
                        return
                except VhostUserProtocolError as exc:
                    self._protocol_errors.append(exc.rule)

    def wait_connected(self, timeout: float) -> bool:
        """True once a front-end has connected (for tests and the CLI's status line)."""
        deadline = threading.Event()
        waited = 0.0
        while waited < timeout:
            if self._connections:
                return True
            deadline.wait(0.05)
            waited += 0.05
        return bool(self._connections)

    def stats(self) -> ServerStats:
        """Counters so far (also after ``close()``: the last values)."""
        if self._device is None or self._backend is None:
            if self._last_stats is not None:
                return self._last_stats
            raise ServerError("the server is not running")
        self._last_stats = ServerStats(
            self._device.stats(),
            self._backend.stats(),
            self._connections,
            tuple(self._protocol_errors),
        )
        return self._last_stats

    def close(self) -> None:
        """Stop serving (the guest's disk goes away), release the socket and the storage."""
        if self._thread is not None:
            if self._device is not None and self._backend is not None:
                self.stats()  # keep the final counters readable after close
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                raise ServerError("the vhost-user server thread did not stop within 60 s")
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise ServerError(f"the vhost-user server failed: {failure}") from failure
