"""A dvs process to be killed: attaches to a KVM hypervisor again and again and uses every
mechanism in a random order, printing one line per step, until it is killed.

Usage: python3 kvm_exerciser.py PID SEED. test_kvm_kill sends it SIGKILL or SIGINT at random
moments; whatever step it is in, the hypervisor must end up running and unchanged.
"""

from __future__ import annotations

import random
import sys

from dvs.hypervisor import KvmSession


def main() -> int:
    pid, seed = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    step = 0

    def say(what: str) -> None:
        nonlocal step
        step += 1
        print(f"step {step} {what}", flush=True)

    while True:
        say("attaching")
        with KvmSession(pid, run=rng.random() < 0.5) as session:
            say("attached")
            slots = []
            for _ in range(rng.randint(2, 8)):
                op = rng.choice(
                    ["regs", "sregs", "cpuid", "translate", "memory", "memory", "ioeventfd",
                     "irqfd", "trap", "mode", "remove"]
                )  # fmt: skip
                say(op)
                if op == "regs":
                    session.get_regs()
                elif op == "sregs":
                    session.get_sregs()
                elif op == "cpuid":
                    session.get_cpuid()
                elif op == "translate":
                    session.translate(0x10_0000)
                elif op == "memory":
                    gpa = 0x1_0000_0000 + len(slots) * 0x10_0000
                    slot = session.add_memory(gpa, 0x4000)
                    slot.write(0, b"dvs" * 100)
                    slots.append(slot)
                elif op == "ioeventfd":
                    session.add_ioeventfd(0xD000_0000 + rng.randrange(16) * 8, 4)
                elif op == "irqfd":
                    session.add_irqfd(rng.choice([22, 23]), resample=rng.random() < 0.5)
                elif op == "trap":
                    trap = session.trap_mmio(0xC000_0000, 0x1000)
                    if rng.random() < 0.5:
                        trap.stop()
                elif op == "mode":
                    if session.status().running:
                        session.hold()
                    else:
                        session.run()
                elif op == "remove" and slots:
                    slots.pop(rng.randrange(len(slots))).remove()
            say("detaching")
        say("detached")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
