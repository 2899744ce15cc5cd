"""Attaching host tools to real slim containers, checked the way a user would check.

Every test starts (or shares) a real busybox container under runc, crun or podman, runs
``dvs container attach|exec`` (the CLI, or the Python API), and looks at what the command
saw and at what is left on the host and in the container afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_helpers import (
    Snapshot,
    dvs,
    pid_ns,
    require,
    settled_pids_in_ns,
    text,
    wait_until_clean,
)

from dvs.container import PIPE, AttachOptions, Session, attach, exec_in
from dvs.probe import ProbeReport
from dvs.testing.container_rootfs import CONTAINER_HOSTNAME, USERNS_ID_BASE
from dvs.testing.containers import OciContainer, run_container

pytestmark = [pytest.mark.containers, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def box(host: ProbeReport) -> Iterator[OciContainer]:
    """One idle runc container shared by the read-only checks of this module."""
    require(host, "runc")
    with run_container("runc") as container:
        yield container


def container_file(box: OciContainer, path: str) -> str:
    return (box.rootfs / path).read_text()


def status_of(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


# ---- what the attached command sees ------------------------------------------------------


def inner_pids(box: OciContainer) -> dict[int, str]:
    """The container's processes at rest, by their pid inside its namespace (NSpid)."""
    found = {}
    for pid in settled_pids_in_ns(pid_ns(box.pid)):
        with open(f"/proc/{pid}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()[-1]
        found[int(nspid)] = Path(f"/proc/{pid}/comm").read_text().strip()
    return found


def test_ps_shows_only_the_containers_processes(box: OciContainer) -> None:
    result = dvs("attach", box.id, "--", "ps", "-e", "-o", "pid=,comm=")
    assert result.returncode == 0, result.stderr
    rows = {
        int(pid): comm for pid, comm in (line.split(None, 1) for line in text(result).splitlines())
    }
    ps_pids = [pid for pid, comm in rows.items() if comm == "ps"]
    assert len(ps_pids) == 1  # ps itself, in the container's pid namespace
    del rows[ps_pids[0]]
    # every other process ps saw is one of the container's (the idle init may have been
    # between fork and exec of its sleep then, so compare pids, not names)
    inside = inner_pids(box)
    assert set(rows) == set(inside)
    assert rows[1] == inside[1] == Path(f"/proc/{box.pid}/comm").read_text().strip()


def test_base_dir_is_the_containers_root(box: OciContainer) -> None:
    result = dvs("attach", box.id, "--", "ls", "-A", "/var/lib/cntr")
    assert result.returncode == 0, result.stderr
    assert sorted(text(result).split()) == sorted(os.listdir(box.rootfs))
    # the tools side is the host: the host's python is at /usr/bin
    result = dvs("attach", box.id, "--", "sh", "-c", "command -v python3; cat /etc/os-release")
    assert "/python3" in text(result) and "Debian" in text(result)


def test_resolv_conf_hostname_and_etc_files_are_the_containers(box: OciContainer) -> None:
    script = "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; hostname; cat /etc/hostname"
    result = dvs("attach", box.id, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    resolv, hosts, names = text(result).split("---\n")
    assert resolv == container_file(box, "etc/resolv.conf")
    assert hosts == container_file(box, "etc/hosts")
    assert names.split() == [CONTAINER_HOSTNAME, CONTAINER_HOSTNAME]
    # the container's /etc/passwd: user names resolve as the container knows them
    result = dvs("attach", box.id, "--", "cat", "/etc/passwd")
    assert text(result) == container_file(box, "etc/passwd")


def test_process_context_is_the_targets(box: OciContainer) -> None:
    script = (
        "cat /proc/self/cgroup; echo ---; "
        "for n in mnt uts ipc net pid cgroup user time; do readlink /proc/self/ns/$n; done; "
        "echo ---; grep -E '^(Uid|Gid|CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    result = dvs("attach", box.id, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    cgroups, namespaces, status = text(result).split("---\n")
    with open(f"/proc/{box.pid}/cgroup") as f:
        assert cgroups == f.read()  # v1 controllers and the cgroup2 line (hybrid host)
    ns_links = namespaces.split()
    for kind, link in zip(
        ["mnt", "uts", "ipc", "net", "pid", "cgroup", "user", "time"], ns_links, strict=True
    ):
        target_link = os.readlink(f"/proc/{box.pid}/ns/{kind}")
        if kind == "mnt":
            assert link != target_link  # a private copy: nothing mounted in the container's
        else:
            assert link == target_link, kind
    fields = dict(line.split(":\t") for line in status.splitlines())
    target = status_of(box.pid)
    assert fields["Uid"] == target["Uid"] and fields["Gid"] == target["Gid"]
    assert fields["CapBnd"] == target["CapEff"]  # bounding set = the target's effective set
    assert fields["NoNewPrivs"] == target["NoNewPrivs"]

    # --ptrace adds CAP_SYS_PTRACE (19) to the bounding set, nothing else
    result = dvs("attach", "--ptrace", box.id, "--", "grep", "CapBnd", "/proc/self/status")
    with_ptrace = int(text(result).split()[1], 16)
    assert with_ptrace == int(target["CapEff"], 16) | (1 << 19)


def test_environment_is_the_targets_with_the_tools_path(box: OciContainer) -> None:
    with open(f"/proc/{box.pid}/environ", "rb") as f:
        target_env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if e)
    result = dvs("attach", "-e", "EXTRA=1", box.id, "--", "env")
    env = dict(line.split("=", 1) for line in text(result).splitlines())
    assert env["PATH"] == os.environ["PATH"]
    assert env["EXTRA"] == "1"
    for key, value in target_env.items():
        if key != b"PATH":
            assert env[key.decode()] == value.decode()


def test_binary_data_piped_through_cat_arrives_unchanged(box: OciContainer) -> None:
    data = os.urandom(3 << 20) + bytes(range(256)) * 64
    result = dvs("attach", box.id, "--", "cat", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    # the same through the Python API with pipes
    with Session(box.id, ["cat"], stdin=PIPE, stdout=PIPE) as session:
        out, _ = session.communicate(data, timeout=60)
    assert out == data and session.returncode == 0


@pytest.mark.parametrize(
    ("script", "status", "sig"),
    [("exit 7", 7, None), ("kill -TERM $$", 128 + 15, 15), ("kill -KILL $$", 128 + 9, 9)],
)
def test_exit_codes_and_signals_propagate(
    box: OciContainer, script: str, status: int, sig: int | None
) -> None:
    assert dvs("attach", box.id, "--", "sh", "-c", script).returncode == status
    assert dvs("exec", box.id, "--", "sh", "-c", script).returncode == status
    with Session(box.id, ["sh", "-c", script]) as session:
        assert session.wait(timeout=30) == status
        assert session.signal == sig
    assert attach(box.id, ["sh", "-c", script]) == status


def test_exec_runs_in_the_containers_own_root(box: OciContainer) -> None:
    result = dvs("exec", box.id, "--", "sh", "-c", "ls -A /; echo ---; echo $PATH; ps -o pid,comm")
    assert result.returncode == 0, result.stderr
    listing, path, ps = (
        text(result).split("---\n")[0],
        *text(result).split("---\n")[1].split("\n", 1),
    )
    assert sorted(listing.split()) == sorted(os.listdir(box.rootfs))
    with open(f"/proc/{box.pid}/environ", "rb") as f:
        target_path = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if e).get(b"PATH")
    assert path.encode() == target_path
    assert "python3" not in ps  # busybox ps: the container's own tools
    assert exec_in(box.id, ["test", "-e", "/var/lib/cntr"]) == 1


def test_pid_and_command_line_resolvers_reach_the_same_container(box: OciContainer) -> None:
    for how in (
        [str(box.pid)],
        ["-t", "pid", str(box.pid)],
        ["-t", "command", f"dvs-idle {box.id}"],
    ):
        result = dvs("attach", *how, "--", "hostname")
        assert result.returncode == 0, (how, result.stderr)
        assert text(result).strip() == CONTAINER_HOSTNAME


# ---- containers of other kinds ---------------------------------------------------------------


def test_read_only_root() -> None:
    with run_container("runc", readonly=True) as box:
        before = Snapshot.take(box.pid)
        result = dvs(
            "attach",
            box.id,
            "--",
            "sh",
            "-c",
            "ls /var/lib/cntr/etc/hostname && touch /var/lib/cntr/x; echo rc=$?",
        )
        assert result.returncode == 0, result.stderr
        assert "rc=1" in text(result) and b"Read-only file system" in result.stderr
        assert not (box.rootfs / "x").exists()
        # a base directory that exists nowhere is spliced in, never created on disk
        deep = "/dvs-test-nowhere/a/b"
        result = dvs("attach", "--base-dir", deep, box.id, "--", "cat", f"{deep}/etc/hostname")
        assert text(result).strip() == CONTAINER_HOSTNAME, result.stderr
        assert not os.path.lexists("/dvs-test-nowhere")
        after = wait_until_clean(before, box.pid)
        assert after == before


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_user_namespaced_container_ownership_both_ways(runtime: str, host: ProbeReport) -> None:
    require(host, runtime)
    with (
        run_container(runtime, userns=True) as box,
        tempfile.TemporaryDirectory(dir="/var/tmp") as tools_tmp,
    ):
        assert status_of(box.pid)["Uid"].split()[0] == str(USERNS_ID_BASE)
        os.chmod(tools_tmp, 0o777)
        script = (
            f"id -u; stat -c '%u %g' /usr/bin/env /var/lib/cntr/bin/busybox; "
            f"touch /var/lib/cntr/tmp/made-in-container {tools_tmp}/made-on-tools-side; "
            f"stat -c '%u' /var/lib/cntr/tmp/made-in-container {tools_tmp}/made-on-tools-side; "
            "ps -e -o pid= | wc -l"
        )
        inside = settled_pids_in_ns(pid_ns(box.pid))
        result = dvs("attach", box.id, "--", "sh", "-c", script)
        assert result.returncode == 0, result.stderr
        lines = text(result).split()
        # the shell is the container's root; host tools (owned by host root) and the
        # container's files both appear owned by root inside
        assert lines[:5] == ["0", "0", "0", "0", "0"]
        assert lines[5:7] == ["0", "0"]
        # on the host: the container's file belongs to the container's root (100000),
        # the file written on the tools side to host root (id-mapped mount)
        assert os.stat(box.rootfs / "tmp/made-in-container").st_uid == USERNS_ID_BASE
        assert os.stat(f"{tools_tmp}/made-on-tools-side").st_uid == 0
        # only the container's pid namespace: its processes, plus sh, ps and wc
        assert int(lines[7]) == len(inside) + 3


def test_crun_and_podman_containers(host: ProbeReport) -> None:
    require(host, "crun", "podman")
    from dvs.testing.containers import run_podman

    with run_container("crun") as crun_box:
        result = dvs("attach", crun_box.id, "--", "hostname")
        assert text(result).strip() == CONTAINER_HOSTNAME, result.stderr
    with run_podman("runc") as pod:
        for name in (pod.name, pod.id, pod.id[:12]):
            result = dvs("attach", "-t", "podman", name, "--", "ps", "-e", "-o", "pid=")
            assert result.returncode == 0, (name, result.stderr)
            assert text(result).split()[0] == "1"


def test_podman_seccomp_filter_is_inherited_unless_disabled(host: ProbeReport) -> None:
    """podman's default profile refuses io_uring_setup with ENOSYS; so must the shell."""
    require(host, "podman")
    from dvs.testing.containers import run_podman

    probe = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        "params = ctypes.create_string_buffer(120); "
        "fd = libc.syscall(425, 4, params); "
        "print('ok' if fd >= 0 else os.strerror(ctypes.get_errno()))"
    )
    with run_podman("runc") as pod:
        target = status_of(pod.pid)
        assert target["Seccomp"] == "2"
        result = dvs(
            "attach",
            pod.name,
            "--",
            "sh",
            "-c",
            f'grep Seccomp /proc/self/status; python3 -c "{probe}"',
        )
        assert result.returncode == 0, result.stderr
        assert f"Seccomp_filters:\t{target['Seccomp_filters']}" in text(result)
        assert text(result).strip().endswith("Function not implemented")
        result = dvs("attach", "--no-seccomp", pod.name, "--", "python3", "-c", probe)
        assert text(result).strip() == "ok", result.stderr


def test_tools_from_an_oci_bundle() -> None:
    """A "fat" tools image: the tools side is another bundle's root, not the host."""
    with run_container("runc") as target, run_container("runc", hostname="tools") as tools:
        marker = tools.rootfs / "tools-marker"
        marker.write_text("from the tools image\n")
        result = dvs(
            "attach",
            "--tools",
            str(tools.bundle),
            target.id,
            "--",
            "sh",
            "-c",
            "cat /tools-marker; hostname; ls /var/lib/cntr/tools-marker",
        )
        assert text(result).splitlines()[:2] == ["from the tools image", CONTAINER_HOSTNAME]
        assert result.returncode != 0  # the target has no such file
        # a plain directory works the same
        result = dvs(
            "attach", "--tools", str(tools.rootfs), target.id, "--", "cat", "/tools-marker"
        )
        assert text(result) == "from the tools image\n", result.stderr


# ---- terminals ----------------------------------------------------------------------------


def test_pty_session_in_the_containers_devpts(box: OciContainer) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        os.environ.update(SHELL="/bin/sh", TERM="xterm-dvs")
        os.execv(sys.executable, [sys.executable, "-m", "dvs", "container", "attach", box.id])
    out = bytearray()

    def read_until(needle: bytes, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    out.extend(os.read(fd, 4096))
                except OSError:
                    return

    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        # markers are computed by the shell, so the echoed command line never matches
        os.write(fd, b"tty; stty size; echo TERM=$TERM; echo mark$((0+1))\n")
        read_until(b"mark1\r\n")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 99, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        os.write(fd, b"sleep 60\n")
        time.sleep(0.5)
        os.write(fd, b"\x03")  # ^C reaches the container's foreground job only
        os.write(fd, b"stty size; echo mark$((1+1)); exit 5\n")
        read_until(b"mark2\r\n")
        deadline = time.monotonic() + 20
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            read_until(b"never", timeout=0.1)
        status = waited[1]
    finally:
        if os.path.exists(f"/proc/{pid}"):  # not reaped yet: the session hung
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    output = out.decode(errors="replace")
    assert "/dev/pts/0" in output  # the container's devpts: the tty exists inside
    assert "33 111" in output and "44 99" in output
    assert "TERM=xterm-dvs" in output
    assert os.waitstatus_to_exitcode(status) == 5


# ---- the Python API ------------------------------------------------------------------------


def test_session_api(box: OciContainer) -> None:
    options = AttachOptions(types=["runc"], env={"GREETING": "hi"})
    with Session(
        box.id,
        ["sh", "-c", "read x; echo $GREETING $x; ps -o pid= | head -1"],
        options=options,
        stdin=PIPE,
        stdout=PIPE,
    ) as session:
        assert session.target is not None and session.target.engine == "runc"
        assert session.pid is not None and os.path.exists(f"/proc/{session.pid}")
        out, _ = session.communicate(b"there\n", timeout=30)
    assert out.split() == [b"hi", b"there", b"1"]
    assert session.returncode == 0
    # closing a running session kills the command and frees everything
    before = Snapshot.take(box.pid)
    session = Session(box.id, ["sleep", "600"], stdout=subprocess.DEVNULL).start()
    command = session.pid
    assert command is not None
    session.close()
    assert session.returncode == 128 + 9
    assert wait_until_clean(before, box.pid, gone=[command]) == before


def test_idle_tools_dir_without_proc_is_spliced(box: OciContainer, tmp_path: Path) -> None:
    """A tools directory that lacks /proc, /etc and /var still gets the overlays."""
    (tmp_path / "bin").mkdir()
    os.symlink("/bin/busybox", tmp_path / "bin" / "sh")
    import shutil

    shutil.copy("/bin/busybox", tmp_path / "bin" / "busybox")
    result = dvs(
        "attach",
        "--tools",
        str(tmp_path),
        box.id,
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox cat /etc/hostname; /bin/busybox ls /proc/1/",
    )
    assert result.returncode == 0, result.stderr
    assert text(result).splitlines()[0] == CONTAINER_HOSTNAME
    assert sorted(os.listdir(tmp_path)) == ["bin"]  # nothing created in the tools dir


def test_stopping_the_command_stops_dvs_and_continuing_resumes_both(box: OciContainer) -> None:
    """Job control of a PTY session: a stop of the command from outside is mirrored."""
    import pty
    import select
    import time

    from attach_helpers import children_of

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - execs at once
        os.environ["SHELL"] = "/bin/sh"
        os.execv(sys.executable, [sys.executable, "-m", "dvs", "container", "attach", box.id])
    out = bytearray()

    def read_until(needle: bytes, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out.extend(os.read(fd, 4096))
                except OSError:
                    return

    try:
        os.write(fd, b"echo ready$((1+1))\n")
        read_until(b"ready2")
        (keeper,) = children_of(pid)
        (command,) = children_of(keeper)
        os.kill(command, signal.SIGSTOP)
        deadline = time.monotonic() + 20
        stopped = False
        while time.monotonic() < deadline and not stopped:
            waited, status = os.waitpid(pid, os.WUNTRACED | os.WNOHANG)
            stopped = waited == pid and os.WIFSTOPPED(status)
            time.sleep(0.02)
        assert stopped, "dvs did not stop with its command"
        os.kill(pid, signal.SIGCONT)
        os.write(fd, b"echo alive$((2+2)); exit 6\n")
        read_until(b"alive4")
        deadline = time.monotonic() + 20
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            read_until(b"never", timeout=0.1)
        assert os.waitstatus_to_exitcode(waited[1]) == 6, out
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_non_root_target_gets_its_ids_groups_and_no_capabilities() -> None:
    """A process running as nobody with a supplementary group: the command is the same."""
    target = subprocess.Popen(
        ["sleep", "300"], user=65534, group=65534, extra_groups=[100], cwd="/"
    )
    try:
        script = "id -u; id -g; id -G; grep -E '^Cap(Eff|Bnd):' /proc/self/status"
        result = dvs("attach", "-t", "pid", str(target.pid), "--", "sh", "-c", script)
        assert result.returncode == 0, result.stderr
        lines = text(result).splitlines()
        assert lines[:2] == ["65534", "65534"]
        assert sorted(lines[2].split()) == ["100", "65534"]
        assert lines[3].split()[1] == "0000000000000000"  # CapEff
        assert lines[4].split()[1] == status_of(target.pid)["CapEff"]  # bounding = its CapEff
    finally:
        target.kill()
        target.wait()


@pytest.mark.fuse
def test_fuse_backend_when_cntrfs_provides_it() -> None:
    """``--backend fuse``: the same layout with the tools served by CntrFS (dvs.fs)."""
    try:
        from dvs.fs import FuseToolsView  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pytest.skip("dvs.fs (CntrFS) is not on this branch yet; the seam is tested for errors")
    del FuseToolsView
    with (
        run_container("runc", userns=True) as box,
        tempfile.TemporaryDirectory(dir="/var/tmp") as tools_tmp,
    ):
        os.chmod(tools_tmp, 0o777)
        script = (
            "grep ' / / ' /proc/self/mountinfo; stat -c %u /usr/bin/env; "
            f"touch {tools_tmp}/made-through-fuse; cat /etc/hostname; ps -e -o pid= | wc -l"
        )
        result = dvs("attach", "--backend", "fuse", box.id, "--", "sh", "-c", script)
        assert result.returncode == 0, result.stderr
        lines = text(result).splitlines()
        assert " - fuse." in lines[0]  # the tools side is the FUSE mount
        assert lines[1] == "0"  # host root's files appear as the container's root
        assert os.stat(f"{tools_tmp}/made-through-fuse").st_uid == 0
        assert lines[2] == CONTAINER_HOSTNAME


def test_exec_in_a_user_namespaced_read_only_container(host: ProbeReport) -> None:
    require(host, "crun")
    with run_container("crun", userns=True, readonly=True) as box:
        result = dvs("exec", box.id, "--", "sh", "-c", "id -u; stat -c %u /bin/busybox; touch /x")
        lines = text(result).splitlines()
        assert lines[:2] == ["0", "0"]
        assert result.returncode == 1 and b"Read-only file system" in result.stderr


def test_base_dir_must_be_absolute(box: OciContainer) -> None:
    for bad in ("relative/dir", "/", "/.."):
        result = dvs("attach", "--base-dir", bad, box.id, "--", "true")
        assert result.returncode == 1
        assert b"base directory must be an absolute path" in result.stderr, bad


def test_hostile_container_files_and_dangling_tools_links(tmp_path: Path) -> None:
    """A FIFO where the container should have /etc/hosts is not mounted over the tools'
    (it would hang every resolver); a tools-side /etc/resolv.conf that dangles (a host
    with systemd-resolved down) still gets the container's file."""
    import shutil

    with run_container("runc") as box:
        (box.rootfs / "etc/hosts").unlink()
        os.mkfifo(box.rootfs / "etc/hosts")
        (tmp_path / "bin").mkdir()
        (tmp_path / "etc").mkdir()
        shutil.copy("/bin/busybox", tmp_path / "bin" / "busybox")
        (tmp_path / "etc" / "hosts").write_text("127.0.0.1 tools-side\n")
        os.symlink("/run/nowhere/resolv.conf", tmp_path / "etc" / "resolv.conf")
        result = dvs(
            "attach",
            "--tools",
            str(tmp_path),
            box.id,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox cat /etc/hosts; /bin/busybox cat /etc/resolv.conf",
        )
        assert result.returncode == 0, result.stderr
        assert text(result).startswith("127.0.0.1 tools-side\n")
        assert text(result).endswith(container_file(box, "etc/resolv.conf"))
        assert b"/etc/hosts: Invalid argument" in result.stderr  # reported as a warning
        assert os.path.islink(tmp_path / "etc" / "resolv.conf")  # the tools dir untouched
