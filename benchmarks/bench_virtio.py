"""Block I/O inside a guest on three disks over one backing file, measured in the same run.

One Debian 6.1 guest under QEMU-TCG (the kit's LinuxGuest, 1 vCPU, RAM in a shared memfd)
gets three virtio disks backed by the *same* host file:
  dvs   the dvs vhost-user-blk back-end (``dvs.virtio.server.BlkServer``; C device model,
        1 queue, the shared io_uring ring as its engine -- or ``--dvs-engine sync``:
        preadv/pwritev on the serving thread);
  qsd   qemu-storage-daemon's vhost-user-blk export (``--blockdev file`` + ``--export
        vhost-user-blk``, its default aio=threads, 1 queue);
  qemu  QEMU's own virtio-blk-pci on the file (``-drive cache=writeback``, aio=threads).
Inside the guest a small static tool (csrc/guest/tools/blkbench.c; fio is not in the guest)
does O_DIRECT I/O on each raw device: sequential 1 MiB reads and writes, and 4 KiB random
reads at queue depth 1 and 16 (threads) and random writes at depth 1. The host side is
buffered (the file stays in the host page cache, warmed before measuring) for all three,
and file locking is off so the three can share the file (they never run at once). No test
flushes: qemu-storage-daemon's export shows the guest a write-through cache (no FLUSH), dvs
and QEMU a write-back one, so a final FLUSH would measure durability policy, not data path. Each
test runs on the three disks back to back, in an order rotating per round, ``--rounds``
times; per disk the median is printed, and the ratios dvs/qsd and dvs/qemu are the medians of
the per-round ratios (each from measurements seconds apart, so load from elsewhere on this
shared machine hits both sides of a ratio alike).

    python3 benchmarks/bench_virtio.py [--rounds 7] [--seconds 3] [--seq-mib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dvs.testing import cache  # noqa: E402
from dvs.testing.guest import LinuxGuest  # noqa: E402
from dvs.virtio.server import BlkServer  # noqa: E402

TOOL_SOURCE = REPO / "csrc" / "guest" / "tools" / "blkbench.c"
DISKS = ("dvs", "qsd", "qemu")


def build_tool() -> Path:
    digest = hashlib.sha256(TOOL_SOURCE.read_bytes()).hexdigest()[:12]

    def build(out: Path) -> None:
        subprocess.run(
            ["gcc", "-static", "-O2", "-pthread", "-o", str(out / "blkbench"), str(TOOL_SOURCE)],
            check=True,
        )

    return cache.artefact(f"blkbench-{digest}", build) / "blkbench"


def tools_image(tool: Path, work: Path) -> Path:
    tree = work / "tools"
    tree.mkdir()
    shutil.copy2(tool, tree / "blkbench")
    image = work / "tools.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "16M"], check=True)
    return image


def start_qsd(backing: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=disk,filename={backing},locking=off",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk,writable=on,num-queues=1,"
            f"addr.type=unix,addr.path={sock}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    for _ in range(200):
        if sock.exists():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon failed: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("qemu-storage-daemon did not create its socket")


def qemu_args(dvs_sock: Path, qsd_sock: Path, backing: Path, tools: Path) -> list[str]:
    return [
        "-chardev", f"socket,id=dvs,path={dvs_sock}",
        "-device", "vhost-user-blk-pci,chardev=dvs,num-queues=1",
        "-chardev", f"socket,id=qsd,path={qsd_sock}",
        "-device", "vhost-user-blk-pci,chardev=qsd,num-queues=1",
        "-drive", f"file={backing},format=raw,if=none,id=qemu,cache=writeback,file.locking=off",
        "-device", "virtio-blk-pci,drive=qemu,serial=qemu-blk,num-queues=1",
        "-drive", f"file={tools},format=raw,if=none,id=tools,readonly=on",
        "-device", "virtio-blk-pci,drive=tools,serial=tools",
    ]  # fmt: skip


def find_disks(guest: LinuxGuest) -> dict[str, str]:
    out = guest.check("for d in /sys/block/vd*; do echo $(basename $d)=$(cat $d/serial); done")
    serials = dict(line.split("=", 1) for line in out.split())
    named = {"dvs-bench": "dvs", "qemu-blk": "qemu", "tools": "tools"}
    disks = {named[s]: f"/dev/{d}" for d, s in serials.items() if s in named}
    rest = [f"/dev/{d}" for d, s in serials.items() if s not in named]
    if len(rest) != 1 or len(disks) != 3:
        raise RuntimeError(f"unexpected disks in the guest: {serials}")
    disks["qsd"] = rest[0]
    return disks


TESTS = {
    # name: (command template, metric)
    "seq read 1 MiB": ("seqread {dev} 1048576 {seq}", "mb_per_s"),
    "seq write 1 MiB": ("seqwrite {dev} 1048576 {seq}", "mb_per_s"),
    "rand read 4 KiB QD1": ("randread {dev} 4096 {secs} 1 {span}", "iops"),
    "rand read 4 KiB QD16": ("randread {dev} 4096 {secs} 16 {span}", "iops"),
    "rand write 4 KiB QD1": ("randwrite {dev} 4096 {secs} 1 {span}", "iops"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=3, help="duration of random tests")
    parser.add_argument("--seq-mib", type=int, default=64, help="bytes per sequential test")
    parser.add_argument("--disk-mib", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--dvs-engine", choices=["io_uring", "sync"], default="io_uring", help="dvs's block engine"
    )
    parser.add_argument("--dvs-poll-us", type=int, default=0, help="dvs's queue poll window")
    parser.add_argument("--only", help="run only the tests whose name contains this")
    args = parser.parse_args()

    tool = build_tool()
    tests = {t: v for t, v in TESTS.items() if not args.only or args.only in t}
    results: dict[str, dict[str, list[float]]] = {t: {d: [] for d in DISKS} for t in tests}
    with tempfile.TemporaryDirectory(prefix="dvs-bench-virtio-") as tmp:
        work = Path(tmp)
        backing = work / "disk.img"
        with open(backing, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.disk_mib):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # no dirty pages left for the first FLUSH to pay for
        tools = tools_image(tool, work)
        dvs_sock, qsd_sock = work / "dvs.sock", work / "qsd.sock"
        qsd = start_qsd(backing, qsd_sock)
        try:
            with BlkServer(
                backing,
                dvs_sock,
                device_id="dvs-bench",
                engine=args.dvs_engine,
                poll_us=args.dvs_poll_us,
            ) as server:
                with LinuxGuest(
                    memfd_ram=True,
                    memory_mib=512,
                    qemu_args=qemu_args(dvs_sock, qsd_sock, backing, tools),
                    boot_timeout=300,
                ) as guest:
                    disks = find_disks(guest)
                    guest.check(f"mkdir -p /tools && mount -o ro -t ext4 {disks['tools']} /tools")
                    subprocess.run(["cat", str(backing)], stdout=subprocess.DEVNULL, check=True)
                    print(f"guest disks: {disks}; QEMU pid {guest.pid}", flush=True)
                    # Tests one after the other; within a test the three disks run
                    # back to back, in rotating order, `rounds` times: a burst of load from
                    # elsewhere on the machine then hits all three alike.
                    for test, (template, metric) in tests.items():
                        for rnd in range(args.rounds):
                            order = DISKS[rnd % 3 :] + DISKS[: rnd % 3]
                            for disk in order:
                                cmd = "/tools/blkbench " + template.format(
                                    dev=disks[disk], seq=args.seq_mib, secs=args.seconds,
                                    span=args.disk_mib - 16,
                                )  # fmt: skip
                                out = guest.check(cmd, timeout=600)
                                value = float(json.loads(out.strip().splitlines()[-1])[metric])
                                results[test][disk].append(value)
                                unit = "MB/s" if metric == "mb_per_s" else "IOPS"
                                line = f"round {rnd + 1} {test:22} {disk:5} {value:10.1f} {unit}"
                                print(line, flush=True)
                stats = server.stats()
        finally:
            qsd.terminate()
            qsd.wait(timeout=30)
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} vCPUs, Linux {platform.release()}; "
          f"guest: Debian 6.1 under QEMU-TCG, 1 vCPU, 512 MiB memfd RAM; "
          f"{args.rounds} rounds, median")  # fmt: skip
    print("ratios: median over rounds of dvs/baseline measured back to back in the same round")
    print(f"{'test':28}{'dvs':>10}{'qsd':>10}{'qemu':>10}{'dvs/qsd':>10}{'dvs/qemu':>10}")
    summary = {}
    for test, (_, metric) in tests.items():
        med = {d: statistics.median(results[test][d]) for d in DISKS}
        r = results[test]
        vs_qsd = statistics.median(a / b for a, b in zip(r["dvs"], r["qsd"], strict=True))
        vs_qemu = statistics.median(a / b for a, b in zip(r["dvs"], r["qemu"], strict=True))
        summary[test] = {**med, "dvs/qsd": vs_qsd, "dvs/qemu": vs_qemu}
        unit = "MB/s" if metric == "mb_per_s" else "IOPS"
        label = f"{test} ({unit})"
        print(
            f"{label:28}{med['dvs']:10.1f}{med['qsd']:10.1f}{med['qemu']:10.1f}"
            f"{vs_qsd:10.2f}{vs_qemu:10.2f}"
        )
    print(f"dvs engine: {args.dvs_engine}, poll window {args.dvs_poll_us} us; server: "
          f"{stats.blk.requests} requests ({stats.vhost.polled} found by polling), "
          f"{stats.vhost.kicks} kicks, "
          f"{stats.vhost.calls} interrupts, errors {stats.blk.errors}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"raw": results, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
