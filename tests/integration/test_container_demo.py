"""The container section of the demo runs and shows what it promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from attach_helpers import require

from dvs.probe import ProbeReport

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(120)]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def test_demo_container(capsys: pytest.CaptureFixture[str], host: ProbeReport) -> None:
    require(host, "runc")
    import demo_container

    demo_container.run()
    out = capsys.readouterr().out
    ps = out.split("# the host's procps")[1].split("$ dvs")[0]
    assert "\n      1 root     dvs-idle" in ps and " ps\n" in ps
    assert "bin  dev  etc" in out or "bin\tdev" in out or "bin dev" in out.replace("  ", " ")
    assert "dvs-container" in out and "nameserver 192.0.2.53" in out
    assert "/usr/bin/strace" in out
    assert out.rstrip().endswith("the host's /var/lib are as before: yes")
