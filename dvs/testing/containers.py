"""Slim test containers: busybox containers under runc, crun and podman, cleaned up reliably.

The semantics these fixtures rely on:

* **OCI bundle** (``container_bundle``): a directory with ``config.json`` and the root file
  system. ``runc``/``crun run -d --bundle DIR ID`` creates the namespaces (mnt, uts, ipc, net,
  pid; plus user with ``userns=True``), pivots into the rootfs, starts ``process.args`` as the
  container's init and exits, leaving the container running.
* **Runtime state**: each runtime keeps one directory per container under its *state root*
  (runc: ``/run/runc/ID/state.json``; crun: ``/run/crun/ID/status``); ``RUNTIME state ID``
  prints JSON whose ``pid`` is the init's pid in the host pid namespace and ``status`` is
  ``running``/``stopped``. These fixtures use the default state roots (``state_root=None``), so
  the containers show in ``runc list``/``crun list`` as a user's would; ids are
  ``dvs-<owner pid>-<random>`` so leftovers of dead test processes can be recognised and
  removed. ``RUNTIME delete --force ID`` kills the container and removes its state and cgroups.
* **Reaping**: a detached init is orphaned when the runtime exits; a small subreaper monitor
  (``container_reaper``, conmon's role reduced) is its parent and reaps it the moment it dies,
  so after the context exits the pid is gone from /proc (PID 1 here reaps only every ~2 s).
* **Podman**: images come from ``podman import`` of the cached rootfs (no registry; imported
  once per rootfs build, tag ``localhost/dvs-busybox:<build>``). The container runs detached
  with ``--runtime runc|crun``, ``--network none`` (own, empty net namespace; podman then leaves
  the image's ``/etc/resolv.conf`` alone) and ``--no-hosts`` (keeps the image's ``/etc/hosts``);
  podman bind-mounts its own ``/etc/hostname`` holding the hostname (no trailing newline).
  conmon is the init's parent; ``--cgroups no-conmon`` leaves conmon in the caller's cgroups,
  because a conmon cgroup outlives the container until PID 1 reaps the exited conmon, which
  would delay undoing the hugetlb workaround by ~2 s.
  ``podman inspect`` gives ``.State.Pid``, the bundle (``.StaticDir``) and the rootfs
  (``.GraphDriver.Data.MergedDir``). With ``--runtime runc`` the container is also in
  ``runc list`` under podman's full container id (podman uses runc's default state root).
* **rlimits**: root lacks CAP_SYS_RESOURCE here, so no hard limit can exceed ours (NOFILE
  20000). Bundles default to NOFILE 1024; podman's defaults (nofile 1048576) would make the
  runtime's setrlimit fail, so podman gets ``--ulimit`` values at or below ours.
* **Hybrid cgroups**: crun refuses hybrid mode; ``container_cgroups`` applies and undoes the
  hugetlb workaround with a host-wide reference count. Every container start holds that
  module's lock, and any container started while the workaround is in place holds a
  reference until it is deleted.

Every context manager here removes what it started -- container, runtime state, bundle,
workaround reference -- also when the body raises or the container died on its own. Cleanup
failures are raised as ``ContainerCleanupError``, or attached as notes to the body's exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from dvs.errors import DvsError
from dvs.testing import cache, container_bundle, container_cgroups, container_rootfs
from dvs.testing.container_bundle import BundleError, BundleOptions, Mount
from dvs.testing.container_cgroups import CgroupWorkaroundError
from dvs.testing.container_rootfs import CONTAINER_HOSTNAME, RootfsBuildError

__all__ = [
    "CONTAINER_HOSTNAME",
    "CONTAINER_KINDS",
    "RUNTIMES",
    "BundleError",
    "CgroupWorkaroundError",
    "Container",
    "ContainerCleanupError",
    "ContainerError",
    "ContainerExecError",
    "ContainerStartError",
    "Mount",
    "OciContainer",
    "PodmanContainer",
    "RootfsBuildError",
    "Runtime",
    "cleanup_leftovers",
    "podman_image",
    "run_any",
    "run_container",
    "run_podman",
    "unavailable_reason",
]

Runtime = Literal["runc", "crun"]
RUNTIMES: Final[tuple[Runtime, ...]] = ("runc", "crun")
#: What ``run_any`` accepts: a bare OCI runtime, or podman driving one.
CONTAINER_KINDS: Final = ("runc", "crun", "podman-runc", "podman-crun")

ID_PREFIX: Final = "dvs-"
_LEFTOVER_ID = re.compile(r"^dvs-(?:probe-)?(\d+)-[0-9a-f]+$")
# Bundles and crun probe directories: dvs-bundle-<pid>-<random>, dvs-probe-<pid>-<random>.
_LEFTOVER_DIR = re.compile(r"^dvs-(?:bundle|probe)-(\d+)-")
REAPER_SCRIPT: Final = Path(__file__).with_name("container_reaper.py")
COMMAND_TIMEOUT: Final = 60.0
EXIT_TIMEOUT: Final = 15.0
PODMAN_IMAGE_REPOSITORY: Final = "localhost/dvs-busybox"
# podman's default nproc limit is above root's hard limit here; 32768 is plenty for tests.
PODMAN_NPROC_LIMIT: Final = 32768


class ContainerError(DvsError):
    """A test container could not be started, used or removed."""


class ContainerStartError(ContainerError):
    """The runtime failed to start the container (the message holds its output)."""


class ContainerExecError(ContainerError):
    """A command run in the container with ``exec(check=True)`` failed."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[bytes]) -> None:
        self.argv = list(argv)
        self.result = result
        output = (result.stderr or b"").decode(errors="replace").strip()
        super().__init__(
            f"{' '.join(self.argv)}: expected exit status 0, found {result.returncode}"
            + (f": {output}" if output else "")
        )


class ContainerCleanupError(ContainerError):
    """Some of a container's resources could not be removed (the message lists which)."""


# -- small helpers --------------------------------------------------------------------------


def _run(
    argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        list(argv),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def _text(result: subprocess.CompletedProcess[bytes]) -> str:
    return ((result.stderr or b"") + (result.stdout or b"")).decode(errors="replace").strip()


def _pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def new_container_id() -> str:
    """``dvs-<our pid>-<random>``: unique, and attributable to its owner for leftover cleanup."""
    return f"{ID_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:10]}"


def _owner_is_dead(container_id: str) -> bool:
    match = _LEFTOVER_ID.match(container_id)
    return match is not None and not _pid_exists(int(match.group(1)))


class _Cleanup:
    """Runs every cleanup step even if earlier ones fail, and reports the failures once."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.errors: list[str] = []

    def step(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # keep going: later steps free other resources
            self.errors.append(f"{what}: {exc}")

    def finish(self, body_error: BaseException | None) -> None:
        if not self.errors:
            return
        message = f"cleanup of {self.subject} incomplete: " + "; ".join(self.errors)
        if body_error is not None:
            body_error.add_note(message)  # never hide the body's own failure
            return
        raise ContainerCleanupError(message)


def unavailable_reason(kind: str) -> str | None:
    """Why containers of ``kind`` (see ``CONTAINER_KINDS``) cannot run here, or None."""
    if kind not in CONTAINER_KINDS:
        raise ValueError(f"expected one of {CONTAINER_KINDS}, found {kind!r}")
    if os.geteuid() != 0:
        return "containers need root"
    for tool in kind.split("-"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not container_rootfs.HOST_BUSYBOX.is_file():
        return f"no static busybox at {container_rootfs.HOST_BUSYBOX}"
    return None


# -- the container objects ------------------------------------------------------------------


@dataclass
class Container:
    """A running test container, as a test sees it from the host."""

    id: str  # the runtime's container id (podman: its full 64-hex id)
    runtime: str  # the OCI runtime that runs it: "runc" or "crun"
    pid: int  # its init process, in the host's pid namespace
    bundle: Path  # the OCI bundle directory (holds config.json)
    rootfs: Path  # the host directory that is the container's /
    hostname: str
    readonly: bool
    userns: bool

    def _exec_prefix(self) -> list[str]:
        raise NotImplementedError

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the container (its namespaces and root) and capture its output."""
        result = _run([*self._exec_prefix(), *argv], timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise ContainerExecError(argv, result)
        return result

    def is_alive(self) -> bool:
        """True while the init process exists and is not a zombie."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # gone, or going
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class OciContainer(Container):
    """A container run directly by runc or crun."""

    state_root: Path | None = None  # None: the runtime's default (/run/runc, /run/crun)

    def runtime_command(self) -> list[str]:
        """The runtime's command line prefix, with ``--root`` if a state root was chosen."""
        return _runtime_command(self.runtime, self.state_root)

    def _exec_prefix(self) -> list[str]:
        return [*self.runtime_command(), "exec", self.id]

    def state(self) -> dict[str, Any]:
        """``RUNTIME state ID`` as JSON (``pid``, ``status``, ``bundle``, ...)."""
        return _oci_state(self.runtime_command(), self.id)


@dataclass
class PodmanContainer(Container):
    """A container run by podman (via conmon and runc/crun)."""

    name: str = ""
    image: str = ""
    inspect_data: dict[str, Any] = field(default_factory=dict)

    def _exec_prefix(self) -> list[str]:
        return ["podman", "exec", self.name]


# -- runc / crun ----------------------------------------------------------------------------


def _runtime_command(runtime: str, state_root: Path | None) -> list[str]:
    return [runtime] if state_root is None else [runtime, "--root", str(state_root)]


def _oci_state(command: Sequence[str], container_id: str) -> dict[str, Any]:
    result = _run([*command, "state", container_id])
    if result.returncode != 0:
        raise ContainerError(f"{command[0]} state {container_id}: {_text(result)}")
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def _oci_container_exists(command: Sequence[str], container_id: str) -> bool:
    result = _run([*command, "list", "-q"])
    if result.returncode != 0:
        raise ContainerError(f"{command[0]} list: {_text(result)}")
    return container_id in result.stdout.decode().split()


def _start_with_reaper(
    command: Sequence[str], log: Path, timeout: float
) -> subprocess.Popen[bytes]:
    """Run ``command`` (a ``run -d``) under the reaper; return it once the runtime exited 0."""
    with open(log, "ab") as log_file:
        # A session of its own: a terminal's ^C must not reach the container's init, which
        # shares the reaper's process group. Cleanup is the fixture's job.
        reaper = subprocess.Popen(
            [sys.executable, str(REAPER_SCRIPT), str(log), "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
        )
    assert reaper.stdout is not None
    status_fd = reaper.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([status_fd], [], [], remaining)[0]:
            os.killpg(reaper.pid, signal.SIGKILL)
            reaper.wait(timeout=EXIT_TIMEOUT)
            reaper.stdout.close()
            raise ContainerStartError(f"{' '.join(command)}: no result within {timeout:.0f} s")
        chunk = os.read(status_fd, 64)
        if not chunk:
            break
        data += chunk
    reaper.stdout.close()
    if data.strip() != b"0":
        reaper.wait(timeout=EXIT_TIMEOUT)
        found = data.decode(errors="replace").strip() or "no status"
        raise ContainerStartError(f"{' '.join(command)}: expected exit status 0, found {found}")
    return reaper


@contextlib.contextmanager
def run_container(
    runtime: Runtime = "runc",
    *,
    readonly: bool = False,
    userns: bool = False,
    args: Sequence[str] | None = None,
    hostname: str = CONTAINER_HOSTNAME,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[Mount] = (),
    rlimits: Mapping[str, tuple[int, int]] | None = None,
    state_root: Path | None = None,
    start_timeout: float = 30.0,
    user: tuple[int, int] = (0, 0),
    capabilities: Sequence[str] | None = None,
) -> Iterator[OciContainer]:
    """Start a detached busybox container under ``runtime``; kill and delete it on exit.

    ``args`` default to the idle init (``/usr/bin/dvs-idle ID``). ``readonly`` makes the root
    read-only; ``userns`` maps container ids 0..65535 to host 100000.. (rootfs owned by 100000).
    ``rlimits`` map ``RLIMIT_*`` names to (soft, hard), default NOFILE 1024. With a
    ``state_root`` of your own the container is invisible to plain ``runc list`` and to
    ``cleanup_leftovers``. ``user`` is the process's (uid, gid); ``capabilities`` replace the
    default set in every capability set (see ``BundleOptions.capabilities``).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"expected a runtime in {RUNTIMES}, found {runtime!r}")
    _cleanup_leftovers_once(runtime)
    options = BundleOptions(
        args=None if args is None else tuple(args),
        hostname=hostname,
        readonly=readonly,
        userns=userns,
        env=dict(env or {}),
        mounts=tuple(mounts),
        rlimits=dict(rlimits if rlimits is not None else container_bundle.DEFAULT_RLIMITS),
        user=user,
        capabilities=None if capabilities is None else tuple(capabilities),
    )
    container_id = new_container_id()
    command = _runtime_command(runtime, state_root)
    bundle = container_bundle.make_bundle(options, container_id)
    cleanup = _Cleanup(f"{runtime} container {container_id}")
    ref: container_cgroups.WorkaroundRef | None = None
    reaper: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    body_error: BaseException | None = None
    try:
        with container_cgroups.start_guard(crun_needed=runtime == "crun") as ref:
            try:
                reaper = _start_with_reaper(
                    [*command, "run", "-d", "--bundle", str(bundle.path), container_id],
                    bundle.stdio_log,
                    start_timeout,
                )
            except ContainerStartError as exc:
                exc.add_note(f"container output and runtime log: {bundle.read_stdio_log()}")
                raise
        state = _oci_state(command, container_id)
        pid = int(state["pid"])
        if state.get("status") != "running":
            raise ContainerStartError(
                f"{container_id}: expected status running after start, found "
                f"{state.get('status')}: {bundle.read_stdio_log()}"
            )
        yield OciContainer(
            id=container_id,
            runtime=runtime,
            pid=pid,
            bundle=bundle.path,
            rootfs=bundle.rootfs,
            hostname=hostname,
            readonly=readonly,
            userns=userns,
            state_root=state_root,
        )
    except BaseException as exc:
        body_error = exc
        raise
    finally:
        _remove_oci_container(cleanup, command, container_id, reaper, pid)
        if ref is not None:
            cleanup.step("release the hugetlb workaround", ref.release)
        cleanup.step("remove the bundle", bundle.remove)
        cleanup.finish(body_error)


def _remove_oci_container(
    cleanup: _Cleanup,
    command: Sequence[str],
    container_id: str,
    reaper: subprocess.Popen[bytes] | None,
    pid: int | None,
) -> None:
    def delete() -> None:
        result = _run([*command, "delete", "--force", container_id])
        if result.returncode != 0 and _oci_container_exists(command, container_id):
            raise ContainerError(f"{command[0]} delete --force: {_text(result)}")

    def wait_reaped() -> None:
        if reaper is not None:
            try:
                reaper.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Something outlived the container (a process that escaped its pid namespace
                # would be one): end the reaper's session, then report it.
                os.killpg(reaper.pid, signal.SIGKILL)
                reaper.wait(timeout=EXIT_TIMEOUT)
                raise ContainerError(
                    f"reaper {reaper.pid} still had children {EXIT_TIMEOUT:.0f} s after delete"
                ) from None
        if pid is not None and not _wait_pid_gone(pid, EXIT_TIMEOUT):
            raise ContainerError(f"init pid {pid} still exists after delete")

    def check_gone() -> None:
        if _oci_container_exists(command, container_id):
            raise ContainerError(f"{command[0]} list still shows {container_id}")

    cleanup.step("delete the container", delete)
    cleanup.step("reap the init process", wait_reaped)
    cleanup.step("check the runtime state is gone", check_gone)


# -- podman ---------------------------------------------------------------------------------


def podman_image() -> str:
    """The cached busybox rootfs as a local podman image (imported once; no registry)."""
    rootfs = container_rootfs.busybox_rootfs()
    tag = f"{PODMAN_IMAGE_REPOSITORY}:{container_rootfs.rootfs_build_id(rootfs)}"
    if _run(["podman", "image", "exists", tag]).returncode == 0:
        return tag
    with cache.locked("podman-busybox-image"):
        if _run(["podman", "image", "exists", tag]).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(prefix="dvs-podman-import-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            packed = _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."])
            if packed.returncode != 0:
                raise ContainerError(f"tar of {rootfs}: {_text(packed)}")
            imported = _run(
                [
                    "podman",
                    "import",
                    "--change",
                    f'CMD ["{container_rootfs.IDLE_PROGRAM}"]',
                    str(tarball),
                    tag,
                ]
            )
            if imported.returncode != 0:
                raise ContainerError(f"podman import {tag}: {_text(imported)}")
    return tag


def _podman_ulimits() -> list[str]:
    def capped(limit: int, cap: int) -> int:
        return cap if limit == resource.RLIM_INFINITY else min(limit, cap)

    nofile = capped(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    nproc = capped(resource.getrlimit(resource.RLIMIT_NPROC)[1], PODMAN_NPROC_LIMIT)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def _podman_exists(name: str) -> bool:
    return _run(["podman", "container", "exists", name]).returncode == 0


@contextlib.contextmanager
def run_podman(
    runtime: Runtime = "runc",
    *,
    readonly: bool = False,
    userns: bool = False,
    args: Sequence[str] | None = None,
    hostname: str = CONTAINER_HOSTNAME,
    env: Mapping[str, str] | None = None,
    mounts: Sequence[Mount] = (),
    start_timeout: float = 60.0,
) -> Iterator[PodmanContainer]:
    """Start a detached podman container of the busybox image; ``podman rm -f`` it on exit.

    Same options as ``run_container``; ``readonly`` is ``--read-only`` (podman then mounts
    tmpfs on /tmp, /run and /var/tmp), ``userns`` is ``--uidmap/--gidmap 0:100000:65536``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"expected a runtime in {RUNTIMES}, found {runtime!r}")
    _cleanup_leftovers_once("podman")
    image = podman_image()
    name = new_container_id()
    argv = [
        "podman",
        "run",
        "--detach",
        "--name",
        name,
        "--runtime",
        runtime,
        "--pull",
        "never",
        "--cgroups",
        "no-conmon",
        "--network",
        "none",
        "--no-hosts",
        "--hostname",
        hostname,
        *_podman_ulimits(),
    ]
    if readonly:
        argv.append("--read-only")
    if userns:
        mapping = f"0:{container_rootfs.USERNS_ID_BASE}:{container_rootfs.USERNS_ID_COUNT}"
        argv += ["--uidmap", mapping, "--gidmap", mapping]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    for mount in mounts:
        argv += [
            "--mount",
            ",".join(
                [f"type={mount.type}", f"source={mount.source}", f"destination={mount.destination}"]
                + [o for o in mount.options if o != "rbind"]
            ),
        ]
    argv += [image, *(args if args is not None else [container_rootfs.IDLE_PROGRAM, name])]

    cleanup = _Cleanup(f"podman container {name}")
    ref: container_cgroups.WorkaroundRef | None = None
    pid: int | None = None
    body_error: BaseException | None = None
    try:
        with container_cgroups.start_guard(crun_needed=runtime == "crun") as ref:
            started = _run(argv, timeout=start_timeout)
            if started.returncode != 0:
                raise ContainerStartError(f"podman run: {_text(started)}")
        inspected = _run(["podman", "inspect", "--type", "container", name])
        if inspected.returncode != 0:
            raise ContainerStartError(f"podman inspect {name}: {_text(inspected)}")
        data: dict[str, Any] = json.loads(inspected.stdout)[0]
        pid = int(data["State"]["Pid"])
        if not data["State"].get("Running") or pid <= 0:
            logs = _run(["podman", "logs", name])
            raise ContainerStartError(
                f"{name}: expected a running container, found state "
                f"{data['State'].get('Status')}: {_text(logs)}"
            )
        yield PodmanContainer(
            id=data["Id"],
            runtime=runtime,
            pid=pid,
            bundle=Path(data["StaticDir"]),
            rootfs=Path(data["GraphDriver"]["Data"]["MergedDir"]),
            hostname=hostname,
            readonly=readonly,
            userns=userns,
            name=name,
            image=image,
            inspect_data=data,
        )
    except BaseException as exc:
        body_error = exc
        raise
    finally:

        def remove() -> None:
            result = _run(["podman", "rm", "--force", "--time", "0", name])
            if result.returncode != 0 and _podman_exists(name):
                raise ContainerError(f"podman rm -f: {_text(result)}")

        def wait_gone() -> None:
            # conmon, the init's parent, reaps it; podman rm returns once it is stopped.
            if pid is not None and not _wait_pid_gone(pid, EXIT_TIMEOUT):
                raise ContainerError(f"init pid {pid} still exists after podman rm")

        def check_gone() -> None:
            if _podman_exists(name):
                raise ContainerError(f"podman still lists {name}")

        cleanup.step("podman rm", remove)
        cleanup.step("wait for the init to be reaped", wait_gone)
        cleanup.step("check podman forgot it", check_gone)
        if ref is not None:
            cleanup.step("release the hugetlb workaround", ref.release)
        cleanup.finish(body_error)


@contextlib.contextmanager
def run_any(kind: str, **options: Any) -> Iterator[Container]:
    """``run_container`` or ``run_podman`` by kind (one of ``CONTAINER_KINDS``)."""
    if kind not in CONTAINER_KINDS:
        raise ValueError(f"expected one of {CONTAINER_KINDS}, found {kind!r}")
    if kind.startswith("podman-"):
        with run_podman(cast(Runtime, kind.removeprefix("podman-")), **options) as podman:
            yield podman
    else:
        with run_container(cast(Runtime, kind), **options) as container:
            yield container


# -- leftovers ------------------------------------------------------------------------------

_cleaned_up: set[str] = set()


def _cleanup_leftovers_once(engine: str) -> None:
    if engine not in _cleaned_up:
        cleanup_leftovers((engine,))
        _cleaned_up.add(engine)


def cleanup_leftovers(engines: Sequence[str] = ("runc", "crun", "podman")) -> list[str]:
    """Remove containers, bundles and an unused workaround left by dead test processes.

    Only ``dvs-<pid>-...`` names whose owner pid no longer exists are touched, so concurrent
    test runs are safe. Returns what was removed (for logs).
    """
    removed: list[str] = []
    for engine in engines:
        if shutil.which(engine) is None:
            continue
        if engine == "podman":
            listed = _run(["podman", "ps", "--all", "--format", "{{.Names}}"])
            for name in listed.stdout.decode().split():
                if _owner_is_dead(name):
                    _run(["podman", "rm", "--force", "--time", "0", name])
                    removed.append(f"podman container {name}")
        else:
            listed = _run([engine, "list", "-q"])
            for container_id in listed.stdout.decode().split():
                if _owner_is_dead(container_id):
                    _run([engine, "delete", "--force", container_id])
                    removed.append(f"{engine} container {container_id}")
    for parent in container_bundle.bundle_parent_dirs():
        for path in parent.glob("dvs-*-*"):
            match = _LEFTOVER_DIR.match(path.name)
            if match and not _pid_exists(int(match.group(1))) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"directory {path}")
    if (
        container_cgroups.workaround_status().applied
        and container_cgroups.release_unused_workaround()
    ):
        removed.append("the unused hugetlb workaround")
    return removed
