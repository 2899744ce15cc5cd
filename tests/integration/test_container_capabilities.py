"""A non-root container process's capabilities, carried over to the attached command.

The container runs its init as uid 1000 with CAP_NET_BIND_SERVICE in all five sets
(bounding, effective, permitted, inheritable, ambient): the runtime raises it in the ambient
set, which is how a non-root process keeps a capability across execve. The attached shell
(itself exec'd as uid 1000) must show the same ``Cap*`` lines in /proc/self/status, and the
capability must work: it binds a port below 1024 in the container's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from attach_helpers import dvs, require, text

from dvs.probe import ProbeReport
from dvs.testing.containers import OciContainer, run_container

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(180)]

CAP_NET_BIND_SERVICE = 10
CAP_SYS_PTRACE = 19
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
SHOW_CAPS = "id -u; grep ^Cap /proc/self/status"
BIND_PORT_80 = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); print('bound')"


@pytest.fixture(scope="module", params=["runc", "crun"])
def box(request: pytest.FixtureRequest, host: ProbeReport) -> Iterator[OciContainer]:
    runtime = request.param
    require(host, runtime)
    with run_container(
        runtime, user=(1000, 1000), capabilities=["CAP_NET_BIND_SERVICE"]
    ) as container:
        yield container


def cap_fields(lines: list[str]) -> dict[str, int]:
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in CAP_FIELDS:
            fields[key] = int(value.strip(), 16)
    assert set(fields) == set(CAP_FIELDS), lines
    return fields


def target_caps(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return cap_fields(f.read().splitlines())


def run_shell(*args: str) -> tuple[str, dict[str, int]]:
    result = dvs(*args, "--", "sh", "-c", SHOW_CAPS)
    assert result.returncode == 0, result.stderr
    uid, *lines = text(result).splitlines()
    return uid, cap_fields(lines)


def test_the_target_holds_the_capability_in_every_set(box: OciContainer) -> None:
    with open(f"/proc/{box.pid}/status") as f:
        uid = next(line for line in f if line.startswith("Uid:")).split()[1]
    assert uid == "1000"
    assert target_caps(box.pid) == dict.fromkeys(CAP_FIELDS, 1 << CAP_NET_BIND_SERVICE)


@pytest.mark.parametrize("mode", ["attach", "exec"])
def test_attached_shell_has_the_targets_capability_sets(box: OciContainer, mode: str) -> None:
    """attach runs the host's sh in the view, exec the container's busybox sh: both execve
    as uid 1000, and only the ambient set carries the capability over."""
    uid, caps = run_shell(mode, box.id)
    assert uid == "1000"
    assert caps == target_caps(box.pid)


def test_ptrace_widens_only_the_bounding_set(box: OciContainer) -> None:
    uid, caps = run_shell("attach", "--ptrace", box.id)
    target = target_caps(box.pid)
    assert uid == "1000"
    assert caps == {**target, "CapBnd": target["CapBnd"] | 1 << CAP_SYS_PTRACE}


def test_the_capability_works_in_the_attached_command(box: OciContainer) -> None:
    """uid 1000 may bind port 80 only through CAP_NET_BIND_SERVICE in its effective set."""
    result = dvs("attach", box.id, "--", "/usr/bin/python3", "-c", BIND_PORT_80)
    assert result.returncode == 0, result.stderr
    assert text(result).strip() == "bound"
    # without the ambient capability the same command is refused: the target's own kind of
    # process as uid 1000 without capabilities (exec of python3 by setpriv)
    denied = dvs(
        "attach", box.id, "--", "setpriv", "--inh-caps=-all", "--ambient-caps=-all",
        "/usr/bin/python3", "-c", BIND_PORT_80,
    )  # fmt: skip
    assert denied.returncode != 0
    assert b"Permission denied" in denied.stderr
