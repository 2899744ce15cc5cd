"""Atheris harness: the C virtqueue walker against the Python reference on hostile guests.

Run it directly (``python3 tests/fuzz/fuzz_virtio.py [libFuzzer flags] [corpus]``) or via
``benchmarks/fuzz_virtio.py``. Each input is a guest, in the same format as the native
harness csrc/fuzz/fuzz_virtqueue.c: [0] log2 queue size (mod 8), [1] bit 0 INDIRECT_DESC,
bit 1 EVENT_IDX, bits 4-5 the device's segment limit, [2] 0xF? shifts the rings by ? bytes,
then guest RAM from gpa 0 in two 32 KiB regions. Both implementations walk the same bytes;
any difference in what they pop, which rule they report (with which offending value), what
they write to the used ring or whether they notify is a finding, and so is a crash.

Coverage: atheris instruments the Python reference (and the wrappers), whose checks mirror
the C walker's one for one, so new reference paths are new walker paths. The native
harness adds coverage of the C code itself plus AddressSanitizer/UBSan.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from dvs.virtio import reference

from dvs.lowlevel import ffi
from dvs.lowlevel.guestmem import GuestMemory, Region
from dvs.lowlevel.virtio import VirtQueue, VirtqueueBroken

HALF = 0x8000
SEG_LIMITS = (1, 3, 16, 1024)

_buffers = [ffi.new("uint8_t[]", HALF) for _ in range(4)]  # two memories x two regions


def _memory(pair: int) -> GuestMemory:
    low, high = _buffers[2 * pair], _buffers[2 * pair + 1]
    return GuestMemory(
        [
            Region(0, HALF, int(ffi.cast("uintptr_t", low))),
            Region(HALF, HALF, int(ffi.cast("uintptr_t", high))),
        ]
    )


MEMORIES = (_memory(0), _memory(1))


def decode(data: bytes) -> tuple[bytes, dict[str, int], int] | None:
    """Guest RAM image, queue layout and device segment limit of one input (see above)."""
    if len(data) < 3:
        return None
    size = 1 << (data[0] % 8)
    mode = data[1]
    shift = data[2] & 0x0F if data[2] & 0xF0 == 0xF0 else 0
    features = 1 << reference.VIRTIO_F_VERSION_1
    if mode & 1:
        features |= 1 << reference.VIRTIO_F_INDIRECT_DESC
    if mode & 2:
        features |= 1 << reference.VIRTIO_F_EVENT_IDX
    desc = 0x40 + shift
    avail = desc + 16 * size + shift
    used = ((avail + 6 + 2 * size + 3) & ~3) + shift
    layout = {"size": size, "desc": desc, "avail": avail, "used": used, "features": features}
    image = data[3 : 3 + 2 * HALF].ljust(2 * HALF, b"\0")
    return image, layout, SEG_LIMITS[(mode >> 4) & 3]


def observe(model: Any, mem: GuestMemory, layout: dict[str, int], max_segs: int) -> list[Any]:
    """Everything one implementation does with the guest in ``mem``."""
    out: list[Any] = []
    try:
        queue = model(mem, **layout, max_segs=max_segs)
    except (VirtqueueBroken, reference.QueueBroken) as exc:
        return [("set-up", exc.rule_id, exc.detail)]
    chains = []
    try:
        while len(chains) < 256 and (chain := queue.pop()) is not None:
            chains.append(chain)
            out.append((chain.head, tuple((s.gpa, s.length, s.writable) for s in chain.segments)))
    except (VirtqueueBroken, reference.QueueBroken) as exc:
        out.append(("broken", exc.rule_id, exc.detail))
    half = len(chains) // 2
    for batch in (chains[half:], chains[:half]):
        if batch:
            queue.push([(c.head, len(c.segments)) for c in batch])
            out.append(("notify", queue.should_notify()))
    try:
        out.append(("kicks", queue.enable_kicks()))
    except (VirtqueueBroken, reference.QueueBroken) as exc:
        out.append(("kicks", exc.rule_id))
    used_end = layout["used"] + 6 + 8 * layout["size"]
    if mem.contains(layout["used"], used_end - layout["used"]):
        out.append(mem.read(layout["used"], used_end - layout["used"]))
    return out


def seed_inputs() -> list[bytes]:
    """Well-formed guests (made by the mock driver) to start a corpus from."""
    seeds = []
    for log2_size, mode in ((2, 0b110011), (4, 0b110001), (4, 0b100010), (5, 0b010011)):
        size = 1 << log2_size
        mem = GuestMemory.local(2 * HALF)
        features = 1 << reference.VIRTIO_F_VERSION_1
        features |= (mode & 1) << reference.VIRTIO_F_INDIRECT_DESC
        features |= (mode >> 1 & 1) << reference.VIRTIO_F_EVENT_IDX
        driver = reference.MockDriver(mem, size=size, base=0x40, span=2 * HALF - 0x40,
                                      features=features)  # fmt: skip
        for i in range(min(size, 6)):
            indirect = bool(mode & 1) and (i % 2 == 1 or size < 8)
            if not indirect and driver.free_descriptors() < 3:
                break
            driver.add([reference.blk_header(i % 2, i)], [512, 1], indirect=indirect)
        driver.set_used_event(1)
        image = mem.read(0, 2 * HALF).rstrip(b"\0")
        seeds.append(bytes([log2_size, mode, 0]) + image)
    return seeds


def test_one_input(data: bytes) -> None:
    case = decode(data)
    if case is None:
        return
    image, layout, max_segs = case
    for mem in MEMORIES:
        mem.write(0, image)
    c_side = observe(VirtQueue, MEMORIES[0], layout, max_segs)
    py_side = observe(reference.ReferenceQueue, MEMORIES[1], layout, max_segs)
    if c_side != py_side:
        raise AssertionError(f"C and reference differ:\nC:  {c_side}\nPy: {py_side}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
