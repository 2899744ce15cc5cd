"""The policy half of attach, on recorded /proc and mountinfo text: ids through user
namespace maps, which cgroup files to join on hybrid and v2 hosts, which LSM label to take
on (this host has no LSM, so the decision logic is tested here on recorded labels), the
tools root of a directory or an OCI bundle, and the mounts an id-mapped tools tree needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvs.container import mountinfo
from dvs.container.context import (
    IdExtent,
    LsmPlan,
    active_lsms,
    cgroup_mounts,
    cgroup_procs_paths,
    host_active_lsms,
    map_into,
    map_out,
    parse_id_map,
    parse_status,
    plan_lsm,
)
from dvs.container.views import DEFAULT_PATH, submounts, tools_root
from dvs.errors import DvsError
from dvs.lowlevel.container import proc_stat_session

HYBRID_MOUNTINFO = r"""27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
43 27 254:0 /srv /srv/with\040space rw,relatime - ext4 /dev/vda rw
"""


def test_status_and_id_maps() -> None:
    status = parse_status("Name:\tsleep\nUid:\t100000\t100000\t100000\t100000\nGroups:\t100005 \n")
    assert status["Uid"].split()[1] == "100000" and status["Groups"] == "100005"
    extents = parse_id_map("         0     100000      65536\n     65536    1000000       1000\n")
    assert extents == [IdExtent(0, 100000, 65536), IdExtent(65536, 1000000, 1000)]
    assert map_into(100000, extents) == 0
    assert map_into(100033, extents) == 33
    assert map_into(1000999, extents) == 66535
    assert map_into(0, extents) == 65534  # host root is unmapped in there: the overflow id
    assert map_into(0, extents, overflow=42) == 42
    assert map_out(66000, extents) == 1000464
    assert map_out(70000, extents) is None


def test_cgroup_files_on_a_hybrid_host() -> None:
    v1, v2 = cgroup_mounts(HYBRID_MOUNTINFO)
    assert v2 == "/sys/fs/cgroup/unified"
    assert v1["/sys/fs/cgroup/systemd"] == frozenset({"rw", "name=systemd"})
    target = [
        "9:name=systemd:/web",
        "4:memory:/web",
        "2:cpu,cpuacct:/web",
        "1:cpu:/web",
        "0::/web",
    ]
    ours = ["9:name=systemd:/", "4:memory:/web", "2:cpu,cpuacct:/", "1:cpu:/", "0::/"]
    assert cgroup_procs_paths(target, ours, v1, v2) == [
        "/sys/fs/cgroup/systemd/web/cgroup.procs",
        # memory: we are in the target's memory cgroup already
        "/sys/fs/cgroup/cpu,cpuacct/web/cgroup.procs",
        "/sys/fs/cgroup/cpu/web/cgroup.procs",
        "/sys/fs/cgroup/unified/web/cgroup.procs",
    ]
    # a pure v2 host
    assert cgroup_procs_paths(["0::/system.slice/x.scope"], ["0::/"], {}, "/sys/fs/cgroup") == [
        "/sys/fs/cgroup/system.slice/x.scope/cgroup.procs"
    ]
    # no cgroupfs at all: nothing to join
    assert cgroup_procs_paths(["0::/x"], ["0::/"], {}, None) == []


def test_mountinfo_escapes() -> None:
    entries = mountinfo.parse(HYBRID_MOUNTINFO)
    assert entries[-1].mount_point == "/srv/with space"
    assert entries[-1].root == "/srv" and entries[-1].fstype == "ext4"
    assert mountinfo.unescape(r"a\134b\011c") == "a\\b\tc"
    assert mountinfo.unescape("plain\\9x") == "plain\\9x"


def test_submounts_of_the_tools_tree() -> None:
    text = (
        "1 0 8:1 / / rw - ext4 /dev/a rw\n"
        "2 1 0:5 / /proc rw - proc proc rw\n"
        "3 1 0:6 / /usr rw - ext4 /dev/b rw\n"
        "4 3 0:7 / /usr/local rw - tmpfs tmpfs rw\n"
        "5 1 0:8 / /dev rw - devtmpfs dev rw\n"
        "6 1 0:9 / /opt/tools rw - ext4 /dev/c rw\n"
        "7 6 0:10 / /opt/tools/cache rw - tmpfs tmpfs rw\n"
        "8 6 0:11 / /opt/tools/cache rw - tmpfs tmpfs rw\n"
    )
    entries = mountinfo.parse(text)
    found = [(rel, e.mount_id) for rel, e in submounts(entries, "/")]
    # parents before children; proc and dev are covered by the container's own
    assert found == [("usr", 3), ("usr/local", 4), ("opt/tools", 6), ("opt/tools/cache", 8)]
    assert [(rel, e.mount_id) for rel, e in submounts(entries, "/opt/tools")] == [("cache", 8)]


def test_tools_root_of_host_directory_and_bundle(tmp_path: Path) -> None:
    host = tools_root(None, host_path="/a:/b")
    assert (host.path, host.search_path, host.source) == ("/", "/a:/b", "host")
    assert tools_root(str(tmp_path)).path == str(tmp_path)
    assert tools_root(str(tmp_path)).search_path == DEFAULT_PATH
    (tmp_path / "fs").mkdir()
    config = {"root": {"path": "fs"}, "process": {"env": ["TERM=x", "PATH=/nix/bin:/bin"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    bundle = tools_root(str(tmp_path))
    assert bundle.path == str(tmp_path / "fs") and bundle.search_path == "/nix/bin:/bin"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DvsError, match=r"unreadable config\.json"):
        tools_root(str(tmp_path))
    with pytest.raises(DvsError, match="neither a directory nor an OCI bundle"):
        tools_root(str(tmp_path / "missing"))


# ---- LSM decisions ------------------------------------------------------------------------


def test_active_lsms_from_every_source() -> None:
    assert active_lsms("lockdown,capability,yama,apparmor,bpf", None, False) == ["apparmor"]
    assert active_lsms("capability,selinux", None, True) == ["selinux"]
    assert active_lsms("capability,landlock,yama", "Y", True) == []  # the list wins
    assert active_lsms(None, "Y\n", False) == ["apparmor"]
    assert active_lsms(None, "N\n", True) == ["selinux"]
    assert active_lsms(None, None, False) == []


def test_apparmor_plan() -> None:
    active = ["apparmor"]
    assert plan_lsm(
        active, {"apparmor": "docker-default (enforce)"}, {"apparmor": "unconfined"}
    ) == LsmPlan("apparmor", "apparmor/exec", "exec docker-default")
    assert plan_lsm(active, {"apparmor": "unconfined"}, {"apparmor": "unconfined"}) is None
    # already in the target's profile (dvs itself confined the same way): nothing to change
    assert plan_lsm(active, {"apparmor": "web (complain)"}, {"apparmor": "web (complain)"}) is None
    assert plan_lsm(active, {}, {}) is None


def test_selinux_plan() -> None:
    active = ["selinux"]
    target = {"selinux": "system_u:system_r:container_t:s0:c17,c503\0"}
    own = {"selinux": "unconfined_u:unconfined_r:unconfined_t:s0-s0:c0.c1023"}
    assert plan_lsm(active, target, own) == LsmPlan(
        "selinux", "exec", "system_u:system_r:container_t:s0:c17,c503"
    )
    assert plan_lsm(active, target, {"selinux": target["selinux"]}) is None


def test_no_lsm_means_no_label() -> None:
    assert plan_lsm([], {"apparmor": "docker-default (enforce)"}, {}) is None
    # this host runs without a label-carrying LSM (attr/current reads EINVAL)
    if not os.path.exists("/sys/kernel/security/lsm") and not os.path.isdir("/sys/fs/selinux"):
        assert host_active_lsms() in ([], ["apparmor"])


# ---- the keeper's /proc/PID/stat parser (C), against a reference --------------------------


def reference_session(stat: bytes) -> int:
    close = stat.rfind(b")")
    if close < 0:
        return -1
    fields = stat[close + 1 :].split(b" ")
    try:
        value = fields[4]
    except IndexError:
        return -1
    if not value.isdigit() or int(value) > 2**31 - 1:
        return -1
    return int(value)


@given(
    comm=st.binary(max_size=15),
    numbers=st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=6),
)
def test_session_parser_with_hostile_comm(comm: bytes, numbers: list[int]) -> None:
    stat = b"4242 (" + comm + b") S " + b" ".join(str(n).encode() for n in numbers) + b" 0 0\n"
    assert proc_stat_session(stat) == numbers[2] == reference_session(stat)


@given(st.binary(max_size=200))
def test_session_parser_never_misreads_garbage(data: bytes) -> None:
    value = proc_stat_session(data)
    assert value == -1 or value == reference_session(data)
