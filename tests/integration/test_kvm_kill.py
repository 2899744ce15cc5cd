"""Killing dvs at random points while it acts inside QEMU -enable-kvm: whatever dvs was doing
(attaching, injecting, holding every thread, trapping MMIO, detaching), the guest keeps
running and QEMU's fd table and memory map come back exactly as they were.

Semantics relied on: SIGKILL gives dvs no chance to clean up; its guardian child notices the
control socket's EOF, undoes every change in QEMU (newest first), restores the injection
thread's registers and detaches. SIGINT raises KeyboardInterrupt in dvs, whose context
managers detach in order. The exerciser (kvm_exerciser.py) prints each step, so the test
reports which steps were cut.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hv_support import ProcessSnapshot, assert_restored, wait_untraced

from dvs.testing.kvm_guest import Command, MinimalGuest

pytestmark = [pytest.mark.kvm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]

EXERCISER = Path(__file__).with_name("kvm_exerciser.py")
KILLS = 20
SEED = 7


@pytest.mark.timeout(600)
def test_killing_dvs_at_random_points_leaves_qemu_running_and_unchanged() -> None:
    rng = random.Random(SEED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cut_at: collections.Counter[str] = collections.Counter()
    with MinimalGuest(accel="kvm") as guest:
        before = ProcessSnapshot.take(guest.pid)
        for kill in range(KILLS):
            how = signal.SIGINT if kill % 4 == 3 else signal.SIGKILL
            exerciser = subprocess.Popen(
                [sys.executable, str(EXERCISER), str(guest.pid), str(rng.randrange(1 << 30))],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            first = ""
            try:
                assert exerciser.stdout is not None
                if kill % 4 == 0:
                    time.sleep(rng.uniform(0.0, 0.5))  # during Python start-up or attach
                else:
                    first = exerciser.stdout.readline()  # "step 1 attaching"
                    assert first.startswith("step"), first
                    time.sleep(rng.uniform(0.0, 0.6))
                exerciser.send_signal(how)
                output, _ = exerciser.communicate(timeout=60)
                output = first + output
            finally:
                exerciser.kill()
                exerciser.wait()
                if exerciser.stdout is not None:
                    exerciser.stdout.close()
            steps = [ln.split(" ", 2)[2] for ln in output.splitlines() if ln.startswith("step")]
            cut_at[f"{how.name}:{steps[-1] if steps else 'start-up'}"] += 1
            wait_untraced(guest.pid, timeout=30)
            assert_restored(guest.pid, before)
            assert guest.fault() is None
            assert guest.mailbox(Command.PING, timeout=10) > 0  # the guest runs
        print("killed during:", dict(sorted(cut_at.items())))
        assert sum(n for k, n in cut_at.items() if not k.endswith("start-up")) >= KILLS * 3 // 4
