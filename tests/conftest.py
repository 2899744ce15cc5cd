"""Shared test set-up: the host probe, and skips that name the missing feature.

Tests that need a privilege or a device ask ``dvs.probe`` and skip with the probe's reason
only when the feature is truly absent; on the project's machines they all run.
"""

from __future__ import annotations

import os

import pytest

from dvs.probe import ProbeReport, probe


@pytest.fixture(scope="session")
def host() -> ProbeReport:
    return probe()


def _skip_reason(item: pytest.Item, report: ProbeReport) -> str | None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        return "needs root"
    if item.get_closest_marker("fuse") and not report.fuse.device:
        return f"needs FUSE: {report.fuse.error}"
    if item.get_closest_marker("kvm") and not report.kvm.device:
        return "needs /dev/kvm"
    if item.get_closest_marker("qemu") and "qemu-system-x86_64" not in report.tools:
        return "needs qemu-system-x86_64"
    if item.get_closest_marker("netns") and not report.tun:
        return "needs /dev/net/tun and network namespaces"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(
        item.get_closest_marker(m)
        for item in items
        for m in ("root", "fuse", "kvm", "qemu", "netns")
    ):
        return
    report = probe()
    for item in items:
        reason = _skip_reason(item, report)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
