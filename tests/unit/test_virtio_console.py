"""virtio-console port 0 between the mock driver's queues and real pipes and a real pty:
output reaches the host end, input reaches posted receive buffers, a full host end throttles
the guest instead of losing bytes, and buffers of the wrong direction stop the queue."""

from __future__ import annotations

import os
import termios
import tty
from collections.abc import Iterator

import pytest

from dvs.lowlevel.guestmem import GuestMemory
from dvs.lowlevel.virtio import ConsoleDevice, VirtQueue, VirtqueueBroken
from dvs.testing.remote_memory import forked_guest_memory
from dvs.virtio.reference import MockDriver, Rule

pytestmark = pytest.mark.timeout(60)


class Guest:
    """Mock driver with port 0's receiveq and transmitq in one guest memory."""

    def __init__(self, device: ConsoleDevice, mem: GuestMemory | None = None) -> None:
        self.mem = mem if mem is not None else GuestMemory.local(8 << 20)
        self.rx_driver = MockDriver(self.mem, size=64, base=0x1000, span=2 << 20)
        self.tx_driver = MockDriver(self.mem, size=64, base=0x300000, span=2 << 20)
        self.rx = VirtQueue(self.mem, **self.rx_driver.layout, max_segs=device.max_segs)
        self.tx = VirtQueue(self.mem, **self.tx_driver.layout, max_segs=device.max_segs)


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int, int]]:
    """(host writes input here, device reads; device writes output, host reads here)."""
    in_r, in_w = _nonblocking_pipe()
    out_r, out_w = _nonblocking_pipe()
    yield in_w, in_r, out_w, out_r
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)


def test_output_and_input_over_pipes(pipes: tuple[int, int, int, int]) -> None:
    in_w, in_r, out_w, out_r = pipes
    device = ConsoleDevice(in_r, out_w, cols=132, rows=43)
    assert device.config_space()[:4] == (132).to_bytes(2, "little") + (43).to_bytes(2, "little")
    guest = Guest(device)

    sent = [guest.tx_driver.add([b"hello, "]), guest.tx_driver.add([b"host", b"\n"], indirect=True)]
    result = device.transmit(guest.tx)
    assert result.completed == 2 and result.notify
    assert os.read(out_r, 100) == b"hello, host\n"
    assert [u.id for u in guest.tx_driver.reap()] == [s.head for s in sent]

    posted = [guest.rx_driver.add([], [8]) for _ in range(3)]
    assert device.receive(guest.rx).blocked  # nothing typed yet: buffers stay posted
    os.write(in_w, b"typed input!")
    result = device.receive(guest.rx)
    assert result.completed >= 1 and result.blocked
    used = guest.rx_driver.reap()
    got = b"".join(
        guest.rx_driver.read_writable(s)[: u.length] for s, u in zip(posted, used, strict=False)
    )
    assert got == b"typed input!"
    stats = device.stats()
    assert (stats.tx_bytes, stats.rx_bytes) == (12, 12)


def test_a_full_host_end_throttles_the_guest_without_losing_bytes(
    pipes: tuple[int, int, int, int],
) -> None:
    _, in_r, out_w, out_r = pipes
    device = ConsoleDevice(in_r, out_w)
    guest = Guest(device)
    chunk = os.urandom(32 << 10)
    for _ in range(4):  # 128 KiB: more than a pipe holds (64 KiB)
        guest.tx_driver.add([chunk])
    received = b""
    for _ in range(100):
        result = device.transmit(guest.tx)
        received += os.read(out_r, 1 << 20) if result.blocked or result.completed else b""
        if len(received) == 4 * len(chunk):
            break
    while len(received) < 4 * len(chunk):
        device.transmit(guest.tx)
        received += os.read(out_r, 1 << 20)
    assert received == chunk * 4
    assert len(guest.tx_driver.reap()) == 4


def test_output_to_a_closed_reader_is_dropped_not_retried() -> None:
    in_r, in_w = _nonblocking_pipe()
    out_r, out_w = _nonblocking_pipe()
    os.close(out_r)  # nobody will ever read the output
    try:
        device = ConsoleDevice(in_r, out_w)
        guest = Guest(device)
        guest.tx_driver.add([b"nobody reads this"])
        assert device.transmit(guest.tx).completed == 1  # EPIPE: dropped, the chain returned
        stats = device.stats()
        assert stats.out_closed and stats.tx_dropped == 17
    finally:
        for fd in (in_r, in_w, out_w):
            os.close(fd)


def test_no_input_is_read_while_the_guest_posts_no_buffer(pipes: tuple[int, int, int, int]) -> None:
    in_w, in_r, out_w, _ = pipes
    device = ConsoleDevice(in_r, out_w)
    guest = Guest(device)
    os.write(in_w, b"waiting")
    result = device.receive(guest.rx)
    assert result.completed == 0 and not result.blocked
    assert os.read(in_r, 100) == b"waiting"  # still in the pipe


def test_a_pty_behaves_like_a_terminal_line() -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        os.set_blocking(master, False)
        device = ConsoleDevice(master, master)
        guest = Guest(device)
        guest.tx_driver.add([b"login: "])
        device.transmit(guest.tx)
        assert os.read(slave, 100) == b"login: "
        guest.rx_driver.add([], [64])
        os.write(slave, b"root\n")
        termios.tcdrain(slave)
        device.receive(guest.rx)
        (used,) = guest.rx_driver.reap()
        assert used.length == 5
        os.close(slave)
        slave = -1
        guest.rx_driver.add([], [64])
        device.receive(guest.rx)  # the terminal hung up: EIO, reported as end of input
        assert device.stats().in_eof
        guest.tx_driver.add([b"after hang-up"])
        assert device.transmit(guest.tx).completed == 1  # the guest is never stuck on it
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize(
    ("queue_name", "readable", "writable", "rule"),
    [("rx", [b"x"], [4], Rule.CONSOLE_RX_READABLE), ("tx", [b"x"], [4], Rule.CONSOLE_TX_WRITABLE)],
)
def test_buffers_of_the_wrong_direction_stop_the_queue(
    pipes: tuple[int, int, int, int],
    queue_name: str,
    readable: list[bytes],
    writable: list[int],
    rule: Rule,
) -> None:
    in_w, in_r, out_w, _ = pipes
    os.write(in_w, b"input")
    device = ConsoleDevice(in_r, out_w)
    guest = Guest(device)
    driver = guest.rx_driver if queue_name == "rx" else guest.tx_driver
    queue = guest.rx if queue_name == "rx" else guest.tx
    driver.add(readable, writable)
    run = device.receive if queue_name == "rx" else device.transmit
    with pytest.raises(VirtqueueBroken) as info:
        run(queue)
    assert info.value.rule_id == rule and queue.needs_reset
    with pytest.raises(VirtqueueBroken):
        run(queue)


def test_console_over_another_process_memory(pipes: tuple[int, int, int, int]) -> None:
    in_w, in_r, out_w, out_r = pipes
    device = ConsoleDevice(in_r, out_w)
    with forked_guest_memory(8 << 20) as remote:
        guest = Guest(device, remote)
        guest.tx_driver.add([b"remote ", b"output"])
        device.transmit(guest.tx)
        assert os.read(out_r, 100) == b"remote output"
        sub = guest.rx_driver.add([], [16])
        os.write(in_w, b"remote input")
        device.receive(guest.rx)
        (used,) = guest.rx_driver.reap()
        assert guest.rx_driver.read_writable(sub)[: used.length] == b"remote input"


def test_blocking_fds_are_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="non-blocking"):
            ConsoleDevice(r, w)
    finally:
        os.close(r)
        os.close(w)
