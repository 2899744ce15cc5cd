"""Every request runs with its caller's ids and groups (translated through the target's id
maps), so the backing filesystem decides permissions, ownership and privileges as it would
for the caller -- never with the server's root powers.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from dvs.lowlevel import sys as llsys
from dvs.testing.fs import cntrfs_mount, world_tempdir

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(120)]

PY = "/usr/bin/python3"  # readable by every user (our interpreter may live below /root)


def as_user(
    code: str, *args: str, uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", code, *args],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        timeout=30,
    )


def in_container_userns(code: str, *args: str) -> tuple[int, str]:
    """Run as root of a user namespace mapped like the container (0 -> 100000, 65536)."""
    read_end, write_end = os.pipe()
    child = llsys.spawn(
        [PY, "-c", code, *args],
        clone_flags=llsys.CLONE_NEWUSER,
        uid_map="0 100000 65536",
        gid_map="0 100000 65536",
        uid=0,  # inside: host 100000, root of the namespace with its capabilities
        gid=0,
        stdio=(-1, write_end, write_end),
    )
    os.close(write_end)
    with os.fdopen(read_end) as out:
        text = out.read()
    status = child.wait(timeout=30)
    child.close()
    return status, text


CREATE = "import os, sys; open(sys.argv[1], 'w').write('x'); os.mkdir(sys.argv[1] + '.d')"


def test_files_belong_to_their_creator() -> None:
    with cntrfs_mount() as m:
        m.source.chmod(0o777)
        result = as_user(CREATE, str(m.mountpoint / "mine"))
        assert result.returncode == 0, result.stderr
        for name in ("mine", "mine.d"):
            st = (m.source / name).stat()
            assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert stat.S_IMODE((m.source / "mine").stat().st_mode) == 0o644  # umask 022


@pytest.mark.parametrize("groups,allowed", [((1001,), True), ((), False)])
def test_supplementary_groups_are_the_callers(groups: tuple[int, ...], allowed: bool) -> None:
    with world_tempdir("dvs-native-") as native, cntrfs_mount() as m:
        outcomes = []
        for root in (native, m.mountpoint):
            team = root / "team"
            team.mkdir()
            os.chown(team, 0, 1001)
            team.chmod(0o770)
            result = as_user(CREATE, str(team / "f"), groups=groups)
            outcomes.append(result.returncode == 0)
        assert outcomes == [allowed, allowed]
        if allowed:
            assert (m.source / "team" / "f").stat().st_gid == 1000


PRIVILEGED = """
import os, sys, errno
out = []
for attempt in (
    lambda: os.setxattr(sys.argv[1], "trusted.x", b"1"),
    # a valid vfs_cap_data v2 granting CAP_SYS_ADMIN (needs CAP_SETFCAP to set)
    lambda: os.setxattr(sys.argv[1], "security.capability",
                        (0x02000000).to_bytes(4, "little") + (1 << 21).to_bytes(4, "little")
                        + bytes(12)),
    lambda: os.mknod(sys.argv[1] + ".dev", 0o600 | 0o020000, os.makedev(1, 3)),
    lambda: os.chown(sys.argv[1], 0, 0),
    lambda: os.chmod(sys.argv[1], 0o4755),
    lambda: os.utime(sys.argv[2], (1, 1)),
    lambda: open(sys.argv[2], "a"),
):
    try:
        attempt()
        out.append("ok")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
print(" ".join(out))
"""


def test_unprivileged_callers_get_no_server_privileges() -> None:
    """CAP_SYS_ADMIN (trusted.*), CAP_SETFCAP, CAP_MKNOD, CAP_CHOWN, CAP_FOWNER: the server
    has them all, a caller without them must not get them through it."""
    with world_tempdir("dvs-native-") as native, cntrfs_mount() as m:
        results = []
        for root in (native, m.mountpoint):
            root.chmod(0o777)
            mine = root / "mine"
            mine.write_text("")
            os.chown(mine, 1000, 1000)
            roots = root / "roots"
            roots.write_text("")
            roots.chmod(0o644)
            result = as_user(PRIVILEGED, str(mine), str(roots))
            assert result.returncode == 0, result.stderr
            results.append(result.stdout.split())
        assert results[0] == results[1]
        assert results[1] == ["EPERM", "EPERM", "EPERM", "EPERM", "ok", "EPERM", "EACCES"]
        # and the suid bit set by the owner stayed (chmod by the owner is allowed)
        assert (m.source / "mine").stat().st_mode & stat.S_ISUID


IDMAP = "uid_map=0:100000:65536,gid_map=0:100000:65536"


def test_id_maps_translate_both_ways() -> None:
    """A user-namespaced container (root = host 100000): the tools' root-owned files appear
    owned by the container's root, and its files land as the tools' ids."""
    with cntrfs_mount(IDMAP) as m:
        m.source.chmod(0o777)
        (m.source / "tool").write_text("#!/bin/sh\n")
        (m.source / "users").write_text("")
        os.chown(m.source / "users", 1000, 1000)
        (m.source / "alien").write_text("")
        os.chown(m.source / "alien", 70000, 70000)
        assert (m.mountpoint / "tool").stat().st_uid == 100000
        assert (m.mountpoint / "users").stat().st_uid == 101000
        assert (m.mountpoint / "alien").stat().st_uid == 65534  # not in the map: overflow
        # the container's root creates: the file lands as the tools' root
        assert (
            as_user(CREATE, str(m.mountpoint / "by_root"), uid=100000, gid=100000).returncode == 0
        )
        assert (m.source / "by_root").stat().st_uid == 0
        assert (m.source / "by_root").stat().st_gid == 0
        assert (
            as_user(CREATE, str(m.mountpoint / "by_user"), uid=101000, gid=101000).returncode == 0
        )
        assert (m.source / "by_user").stat().st_uid == 1000
        # chown through the mount speaks kernel ids, stored as backing ids; the host's
        # root is not in the container's map, so the container's root does it
        chown = "import os, sys; os.chown(sys.argv[1], 5, 6)"  # ids inside the namespace
        status, text = in_container_userns(chown, str(m.mountpoint / "by_user"))
        assert status == 0, text
        st = (m.source / "by_user").stat()
        assert (st.st_uid, st.st_gid) == (5, 6)
        # the container's root may read a root-only tools file; its other users may not
        secret = m.source / "secret"
        secret.write_text("root only")
        secret.chmod(0o600)
        read = "import sys; print(open(sys.argv[1]).read())"
        assert as_user(read, str(m.mountpoint / "secret"), uid=100000, gid=100000).returncode == 0
        assert as_user(read, str(m.mountpoint / "secret"), uid=101000, gid=101000).returncode != 0


def test_posix_acl_ids_are_translated() -> None:
    import struct

    # ids in an ACL are the setter's: 1000 inside the namespace is kernel id 101000
    entries_in = [(1, 6, -1), (2, 4, 1000), (4, 4, -1), (0x10, 4, -1), (0x20, 0, -1)]
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident & 0xFFFFFFFF) for tag, perm, ident in entries_in
    )
    with cntrfs_mount(IDMAP) as m:
        (m.source / "f").write_text("")
        os.chown(m.source / "f", 0, 0)  # the container's root owns it
        setter = (
            "import os, sys; "
            "os.setxattr(sys.argv[1], 'system.posix_acl_access', bytes.fromhex(sys.argv[2]))"
        )
        status, text = in_container_userns(setter, str(m.mountpoint / "f"), acl.hex())
        assert status == 0, text
        stored = os.getxattr(m.source / "f", "system.posix_acl_access")
        entries = [struct.unpack_from("<HHI", stored, 4 + 8 * i) for i in range(5)]
        assert (2, 4, 1000) in entries  # kernel id 101000 is backing id 1000
        # read from the host (init namespace) the same entry names kernel id 101000
        seen = os.getxattr(m.mountpoint / "f", "system.posix_acl_access")
        assert (2, 4, 101000) in [struct.unpack_from("<HHI", seen, 4 + 8 * i) for i in range(5)]
