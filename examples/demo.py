"""The dvs demo: real containers, real guests, real I/O -- what a user would do.

Run it with ``scripts/demo.sh`` (which sets the machine up first). Each capability adds a
section module ``examples/demo_<name>.py`` with a ``run() -> None`` function; sections run
in the order below, and one that fails is reported without hiding the others.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

# the sections sit next to this file; dvs itself is used in place from the checkout
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

SECTIONS = ("probe", "container", "fs", "vm", "hypervisor", "virtio", "shield")


def main(argv: list[str]) -> int:
    wanted = argv or list(SECTIONS)
    # sections mix our prints with their commands' output: keep the order when piped to a file
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    failed = []
    for name in wanted:
        module_path = Path(__file__).with_name(f"demo_{name}.py")
        if not module_path.exists():
            continue
        print(f"\n=== {name} " + "=" * (70 - len(name)), flush=True)
        try:
            importlib.import_module(f"demo_{name}").run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\ndemo sections that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
