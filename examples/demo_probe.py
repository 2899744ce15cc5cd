"""Demo section: what this machine offers, and a slim container to work on."""

from __future__ import annotations

from dvs import probe


def run() -> None:
    print(probe.format_table(probe.probe()))
