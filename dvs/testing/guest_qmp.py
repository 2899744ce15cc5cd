"""A small synchronous QMP client for the QEMU guests the tests start.

QMP (the QEMU Machine Protocol) is newline-delimited JSON over a socket. On connect QEMU sends
a greeting ``{"QMP": {...}}`` and accepts nothing but ``qmp_capabilities`` until that has been
executed (capabilities negotiation). Then each ``{"execute": NAME, "arguments": {...}, "id": X}``
gets exactly one reply carrying the same ``id``: ``{"return": VALUE}`` or
``{"error": {"class": ..., "desc": ...}}``. Asynchronous events (``{"event": ...}``, e.g.
``RESUME`` or ``DEVICE_DELETED``) may arrive between a command and its reply at any time; this
client skips them, because the tests poll state with ``query-*`` commands instead.
``human-monitor-command`` runs an HMP command line (``info mtree -f``, ``gva2gpa``, ...) and
returns its text output.

A QEMU chardev server accepts one client at a time, so keep one client per QMP socket.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dvs.errors import DvsError


class QmpError(DvsError):
    """QEMU answered a QMP command with an error, or the QMP connection broke."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        self.error_class = error_class
        super().__init__(message)


class QmpClient:
    """One negotiated QMP connection; commands are executed one at a time."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = _connect_when_listening(path, timeout)
        self._sock.settimeout(timeout)
        self._reader = self._sock.makefile("rb")
        self._next_id = 0
        try:
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QmpError(f"expected a QMP greeting on {path}, got {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; raise ``QmpError`` on an error reply."""
        self._next_id += 1
        request_id = f"dvs-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"cannot send {command!r} to QMP at {self.path}: {exc}") from exc
        while True:
            reply = self._read_message()
            if "event" in reply or reply.get("id") != request_id:
                continue
            if "error" in reply:
                error = reply["error"]
                raise QmpError(
                    f"QMP {command!r} failed: {error.get('class')}: {error.get('desc')}",
                    error_class=error.get("class"),
                )
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor (HMP) command line and return what it printed."""
        output = self.execute("human-monitor-command", {"command-line": command_line})
        return str(output)

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._sock.close()

    def _read_message(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except OSError as exc:  # includes the socket timeout
            raise QmpError(f"no answer from QMP at {self.path}: {exc}") from exc
        if not line:
            raise QmpError(f"QMP connection {self.path} closed by QEMU")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"QMP sent a line that is not JSON: {line!r}") from exc
        if not isinstance(message, dict):
            raise QmpError(f"QMP sent a JSON value that is not an object: {line!r}")
        return message


def _connect_when_listening(path: Path, timeout: float) -> socket.socket:
    """Connect to a unix socket that QEMU may not have created yet."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise QmpError(f"QMP socket {path} did not accept within {timeout:.0f} s") from exc
            time.sleep(0.05)
        except BaseException:
            sock.close()
            raise
