"""From a container name to a pinned process: resolvers for every engine, tried in order.

A container is attached through one of its processes (normally its init). Engines know
which one: runc and crun keep a state directory per container (``state.json`` /
``status`` with the init's pid *and its start time*), podman, docker, containerd's ``ctr``,
CRI-O's ``crictl``, LXC, LXD/incus and systemd's ``machinectl`` answer on their command
line, and Kubernetes names a container id that also appears in the cgroup path of every
process of that container (``/proc/PID/cgroup``), whatever runtime created it.

Semantics relied on:
- A pid is only a number: it may be reused as soon as its process is reaped. The resolver
  therefore opens a **pidfd** (``pidfd_open``, Linux 5.3) the moment it has a pid, and then
  checks that the process behind the pidfd started no later than the moment the question
  was asked (``/proc/PID/stat`` field 22, clock ticks since boot, against CLOCK_BOOTTIME);
  engines that record the init's start time (runc, crun) are checked against it exactly.
  From then on signals and waits go through the pidfd, which can never name another process.
- Resolvers are tried in order and each failure is kept, so "not found" lists what every
  engine said (a missing CLI, a daemon that is not running, no such container). A name
  that matches several *different* targets within one engine is an error, not a guess.
- Engine CLIs run with a timeout; clients of absent daemons (docker without dockerd,
  kubectl without a cluster) fail fast and their message is part of the report.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dvs.container.errors import AmbiguousTarget, UnknownType
from dvs.errors import TargetGone, TargetNotFound
from dvs.lowlevel import sys as llsys

#: every resolver, in the order they are tried
TYPES: tuple[str, ...] = (
    "pid",
    "runc",
    "crun",
    "podman",
    "docker",
    "containerd",
    "crio",
    "kubernetes",
    "lxc",
    "lxd",
    "incus",
    "nspawn",
    "command",
)
#: tried when the caller does not choose (a command-line substring matches too easily)
DEFAULT_TYPES: tuple[str, ...] = tuple(t for t in TYPES if t != "command")
ALIASES: Mapping[str, str] = {
    "process_id": "pid",
    "process-id": "pid",
    "cri-o": "crio",
    "k8s": "kubernetes",
    "kubectl": "kubernetes",
    "systemd-nspawn": "nspawn",
    "machinectl": "nspawn",
    "cmdline": "command",
}

CLI_TIMEOUT = 10.0
_CONTAINERD_NAMESPACES = ("k8s.io", "moby", "default")
_HEX_ID = re.compile(r"^[0-9a-f]{12,64}$")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- what a resolver returns --------------------------------------------------------------


class Miss(Exception):
    """This resolver does not know the name; the message says what it tried."""


@dataclass(frozen=True)
class Found:
    pid: int
    detail: str  # where the pid came from, e.g. "/run/runc/web/state.json"
    start_ticks: int | None = None  # the process's start time if the engine records it


@dataclass
class Target:
    """A process to attach to, pinned by ``pidfd`` (owned: ``close()`` it)."""

    pid: int
    pidfd: int
    engine: str
    name: str
    detail: str = ""
    tried: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """True while the process runs (a zombie counts as gone for attaching)."""
        if self.pidfd < 0:
            return False
        try:
            llsys.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        state = _proc_state(self.pid)
        return state not in (None, "Z", "X")

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return f"{self.engine} {self.name!r} (pid {self.pid})"


# ---- running engine CLIs ------------------------------------------------------------------


@dataclass
class Env:
    """Where resolvers look: the PATH for engine CLIs and the /proc to scan."""

    path: str | None = None  # None: os.environ["PATH"]
    proc: str = "/proc"
    run_user: str = "/run/user"  # users' runtime directories (rootless engines)
    timeout: float = CLI_TIMEOUT

    def which(self, program: str) -> str | None:
        return shutil.which(program, path=self.path)

    def run(
        self,
        argv: Sequence[str],
        *,
        as_user: pwd.struct_passwd | None = None,
    ) -> str:
        """Run an engine CLI; return stdout, or raise Miss with its error message."""
        exe = self.which(argv[0])
        if exe is None:
            raise Miss(f"{argv[0]!r} not found on PATH")
        env = dict(os.environ)
        if self.path is not None:
            env["PATH"] = self.path
        kwargs: dict[str, Any] = {}
        if as_user is not None:
            env.update(
                HOME=as_user.pw_dir,
                USER=as_user.pw_name,
                LOGNAME=as_user.pw_name,
                XDG_RUNTIME_DIR=f"{self.run_user}/{as_user.pw_uid}",
            )
            kwargs = {"user": as_user.pw_uid, "group": as_user.pw_gid, "extra_groups": []}
        try:
            result: subprocess.CompletedProcess[bytes] = subprocess.run(
                [exe, *argv[1:]],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                env=env,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise Miss(f"`{' '.join(argv)}` did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise Miss(f"`{argv[0]}` could not run: {exc}") from None
        if result.returncode != 0:
            raise Miss(f"`{' '.join(argv)}`: {_first_line(result.stderr or result.stdout)}")
        return result.stdout.decode(errors="replace")


def _first_line(output: bytes) -> str:
    for line in output.decode(errors="replace").splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return "failed without a message"


# ---- parsers of engine output (pure; tested against recorded output) ----------------------


def parse_runc_state(text: str) -> tuple[int, int | None]:
    """runc's ``state.json``: the init's pid and start time (clock ticks since boot)."""
    state = json.loads(text)
    pid = int(state["init_process_pid"])
    start = state.get("init_process_start")
    return pid, int(start) if start not in (None, "") else None


def parse_crun_status(text: str) -> tuple[int, int | None]:
    """crun's ``status`` file: ``pid`` and ``process-start-time``."""
    status = json.loads(text)
    start = status.get("process-start-time")
    return int(status["pid"]), int(start) if start not in (None, "") else None


def parse_oci_state(text: str) -> int:
    """``runc|crun state ID`` (OCI runtime state): the pid, if the container runs."""
    state = json.loads(text)
    if state.get("status") != "running":
        raise Miss(f"container is {state.get('status', 'in an unknown state')}, not running")
    pid = int(state.get("pid") or 0)
    if pid <= 0:
        raise Miss("the runtime reports no pid")
    return pid


def parse_running_pid(text: str) -> int:
    """The ``{{.State.Running}};{{.State.Pid}}`` answer of podman/docker inspect."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise Miss(f"expected one container, the engine listed {len(lines)}")
    running, _, pid = lines[0].strip().partition(";")
    if running != "true":
        raise Miss("container exists but is not running")
    if not pid.isdigit() or int(pid) <= 0:
        raise Miss(f"unexpected pid {pid!r}")
    return int(pid)


def parse_ctr_tasks(text: str, task_id: str) -> int | None:
    """``ctr task ls`` table (TASK PID STATUS): the pid of ``task_id`` if it runs."""
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == task_id:
            if cols[2].upper() != "RUNNING":
                raise Miss(f"task {task_id} is {cols[2].lower()}, not running")
            return int(cols[1])
    return None


def parse_crictl_inspect(text: str) -> int:
    """``crictl inspect -o json ID``: ``info.pid`` of a running container."""
    data = json.loads(text)
    state = str(data.get("status", {}).get("state", ""))
    if state and state != "CONTAINER_RUNNING":
        raise Miss(f"container is {state.removeprefix('CONTAINER_').lower()}, not running")
    pid = int(data.get("info", {}).get("pid") or 0)
    if pid <= 0:
        raise Miss("crictl reports no pid")
    return pid


def parse_pid_line(text: str) -> int:
    """A bare number (``lxc-info -pH``, ``machinectl show --value -p Leader``)."""
    value = text.strip()
    if not value.isdigit() or int(value) <= 0:
        raise Miss(f"no pid in {value[:80]!r} (not running?)")
    return int(value)


def parse_info_pid(text: str) -> int:
    """``lxc info`` (LXD) / ``incus info``: ``PID: n`` (LXD 3/4: ``Pid: n``, 1.x ``Init: n``)."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip().lower() in ("pid", "init"):  # "Init:" before LXD 2.0
            value = value.strip()
            if value.isdigit() and int(value) > 0:
                return int(value)
            raise Miss(f"PID is {value!r} (not running?)")
    raise Miss("no PID line in the output (not running?)")


def parse_kubectl_container_id(text: str, container: str | None) -> str:
    """``kubectl get pod -o json``: the runtime's id of ``container`` (default: the first)."""
    pod = json.loads(text)
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if container is not None:
        statuses = [s for s in statuses if s.get("name") == container]
        if not statuses:
            raise Miss(f"the pod has no container named {container!r}")
    running = [s for s in statuses if "running" in (s.get("state") or {})]
    if not running:
        raise Miss("the pod has no running container")
    full = str(running[0].get("containerID", ""))
    _, sep, cid = full.partition("://")  # containerd://, cri-o://, docker://
    if not sep or not cid:
        raise Miss(f"unexpected container id {full!r}")
    return cid


def cgroup_line_matches(line: str, container_id: str) -> bool:
    """Does one ``/proc/PID/cgroup`` line place the process in ``container_id``'s cgroup?

    Runtimes name the leaf after the id: ``<id>``, ``<id>.scope``, or
    ``<prefix>-<id>.scope`` (cri-containerd-, crio-, docker-, libpod-); conmon's own
    ``libpod-conmon-<id>.scope`` is not the container.
    """
    path = line.split(":", 2)[-1]
    for part in path.split("/"):
        if "conmon" in part:
            continue
        stem = part.removesuffix(".scope")
        if stem == container_id or stem.endswith(f"-{container_id}"):
            return True
    return False


# ---- /proc helpers ------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int, proc: str = "/proc") -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 on (after "(comm)"), or None."""
    data = _read(f"{proc}/{pid}/stat")
    if data is None:
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def _proc_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    fields = _stat_fields(pid, proc)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _ppid(pid: int, proc: str) -> int:
    fields = _stat_fields(pid, proc)
    return int(fields[1]) if fields else 0


def _pids(proc: str) -> Iterable[int]:
    for name in os.listdir(proc):
        if name.isdigit():
            yield int(name)


def _ns_key(pid: int, proc: str) -> tuple[str, str] | None:
    try:
        return (os.readlink(f"{proc}/{pid}/ns/mnt"), os.readlink(f"{proc}/{pid}/ns/pid"))
    except OSError:
        return None


def _our_ancestors(proc: str) -> set[int]:
    """Ourselves and every ancestor: their command lines hold the name we look for."""
    seen = set()
    pid = os.getpid()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        pid = _ppid(pid, proc)
    return seen


def _topmost(members: Sequence[int], proc: str) -> int:
    """Of processes sharing namespaces, the one whose parent is not among them (the
    container's init), oldest first, lowest pid on a tie (start times tick at 10 ms)."""
    member_set = set(members)
    tops = [p for p in members if _ppid(p, proc) not in member_set] or list(members)
    return min(tops, key=lambda p: (start_ticks(p, proc) or 0, p))


def _pick_init(pids: Sequence[int], proc: str, what: str, name: str) -> int:
    """From processes that all matched, the one that is the container's init.

    They must share one mount and pid namespace (else the name is ambiguous); among them
    the topmost process is the init.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for pid in pids:
        key = _ns_key(pid, proc)
        if key is not None:
            groups.setdefault(key, []).append(pid)
    if not groups:
        raise Miss(f"no live process {what}")
    if len(groups) > 1:
        candidates = []
        for members in groups.values():
            first = _topmost(members, proc)
            cmd = (_read(f"{proc}/{first}/cmdline") or b"").replace(b"\0", b" ").strip()
            candidates.append(f"pid {first}: {cmd.decode(errors='replace')[:100]}")
        raise AmbiguousTarget(name, candidates)
    return _topmost(next(iter(groups.values())), proc)


def pids_in_cgroup_of(container_id: str, proc: str = "/proc") -> list[int]:
    """Processes whose cgroup path names ``container_id``."""
    found = []
    for pid in _pids(proc):
        data = _read(f"{proc}/{pid}/cgroup")
        if data and any(
            cgroup_line_matches(line, container_id) for line in data.decode().splitlines()
        ):
            found.append(pid)
    return found


# ---- the resolvers --------------------------------------------------------------------------


def _resolve_pid(name: str, env: Env) -> Found:
    if not name.isdigit():
        raise Miss("not a process id")
    pid = int(name)
    if pid <= 0 or not os.path.isdir(f"{env.proc}/{pid}"):
        raise Miss(f"no process {pid}")
    return Found(pid, f"process {pid}")


def _state_hits(
    pattern_roots: Sequence[str], name: str, filename: str, parse: Callable[[str], Any]
) -> list[tuple[str, Any]]:
    hits = []
    for pattern in pattern_roots:
        for root in sorted(glob.glob(pattern)):
            path = os.path.join(root, name, filename)
            data = _read(path)
            if data is None:
                continue
            try:
                hits.append((path, parse(data.decode())))
            except (ValueError, KeyError, TypeError) as exc:
                raise Miss(f"unreadable state {path}: {exc}") from None
    return hits


def _runtime_resolver(
    runtime: str, roots: Sequence[str], filename: str, parse: Callable[[str], Any]
) -> Callable[[str, Env], Found]:
    def resolve(name: str, env: Env) -> Found:
        if "/" in name or name in (".", ".."):
            raise Miss("not a container id")
        roots_now = [*roots]
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            roots_now.append(os.path.join(xdg, runtime))
        hits = _state_hits(roots_now, name, filename, parse)
        distinct = {pid for _, (pid, _) in hits}
        if len(distinct) > 1:
            raise AmbiguousTarget(name, [f"{path}: pid {pid}" for path, (pid, _) in hits])
        if hits:
            path, (pid, start) = hits[0]
            return Found(pid, path, start)
        # not in any state root we know: ask the runtime (its default root may differ)
        if env.which(runtime) is None:
            raise Miss(f"no state in {', '.join(roots_now)}; {runtime!r} not found on PATH")
        try:
            return Found(parse_oci_state(env.run([runtime, "state", name])), f"{runtime} state")
        except Miss as exc:
            raise Miss(f"no state in {', '.join(roots_now)}; {exc}") from None

    return resolve


_resolve_runc = _runtime_resolver(
    "runc",
    [
        "/run/runc",
        "/run/docker/runtime-runc/moby",
        "/run/containerd/runc/*",
        "/run/user/*/runc",
    ],
    "state.json",
    parse_runc_state,
)
_resolve_crun = _runtime_resolver(
    "crun", ["/run/crun", "/run/user/*/crun"], "status", parse_crun_status
)


def _rootless_podman_users(run_user: str) -> list[pwd.struct_passwd]:
    """Users with a rootless podman runtime directory (root can ask as each of them)."""
    if os.geteuid() != 0:
        return []
    users = []
    for run_dir in sorted(glob.glob(f"{run_user}/*")):
        uid = os.path.basename(run_dir)
        if not uid.isdigit() or uid == "0":
            continue
        if not (os.path.isdir(f"{run_dir}/libpod") or os.path.isdir(f"{run_dir}/containers")):
            continue
        with contextlib.suppress(KeyError):
            users.append(pwd.getpwuid(int(uid)))
    return users


_INSPECT_FORMAT = "{{.State.Running}};{{.State.Pid}}"


def _resolve_podman(name: str, env: Env) -> Found:
    argv = ["podman", "inspect", "--type", "container", "--format", _INSPECT_FORMAT, name]
    hits: list[tuple[str, int]] = []
    errors = []
    try:
        hits.append(("podman (root)", parse_running_pid(env.run(argv))))
    except Miss as exc:
        errors.append(str(exc))
        if env.which("podman") is None:
            raise
    for user in _rootless_podman_users(env.run_user):
        try:
            pid = parse_running_pid(env.run(argv, as_user=user))
            hits.append((f"podman (rootless, user {user.pw_name})", pid))
        except Miss as exc:
            errors.append(f"as {user.pw_name}: {exc}")
    if len({pid for _, pid in hits}) > 1:
        raise AmbiguousTarget(name, [f"{where}: pid {pid}" for where, pid in hits])
    if hits:
        return Found(hits[0][1], hits[0][0])
    raise Miss("; ".join(errors))


def _resolve_docker(name: str, env: Env) -> Found:
    if env.which("docker-pid"):
        return Found(parse_pid_line(env.run(["docker-pid", name])), "docker-pid")
    argv = ["docker", "inspect", "--type", "container", "--format", _INSPECT_FORMAT, name]
    return Found(parse_running_pid(env.run(argv)), "docker inspect")


def _resolve_containerd(name: str, env: Env) -> Found:
    if "/" in name:
        raise Miss("not a container id")
    # the shim's state directory needs no daemon round trip
    hits = []
    for ns_dir in sorted(glob.glob("/run/containerd/io.containerd.runtime.v2.task/*")):
        data = _read(os.path.join(ns_dir, name, "init.pid"))
        if data is not None and data.strip().isdigit():
            hits.append((os.path.basename(ns_dir), int(data.strip())))
    if len({pid for _, pid in hits}) > 1:
        raise AmbiguousTarget(name, [f"containerd namespace {ns}: pid {pid}" for ns, pid in hits])
    if hits:
        return Found(hits[0][1], f"containerd namespace {hits[0][0]}")
    if env.which("ctr") is None:
        raise Miss("no task state under /run/containerd; 'ctr' not found on PATH")
    errors = []
    for namespace in _CONTAINERD_NAMESPACES:
        try:
            pid = parse_ctr_tasks(env.run(["ctr", "-n", namespace, "task", "ls"]), name)
        except Miss as exc:
            errors.append(f"namespace {namespace}: {exc}")
            continue
        if pid is not None:
            hits.append((namespace, pid))
    if len({pid for _, pid in hits}) > 1:
        raise AmbiguousTarget(name, [f"containerd namespace {ns}: pid {pid}" for ns, pid in hits])
    if hits:
        return Found(hits[0][1], f"ctr -n {hits[0][0]}")
    raise Miss(
        "; ".join(errors) or "no such task in namespaces " + ", ".join(_CONTAINERD_NAMESPACES)
    )


def _by_cgroup(container_id: str, env: Env, name: str) -> Found:
    pids = pids_in_cgroup_of(container_id, env.proc)
    if not pids:
        raise Miss(f"no process has {container_id[:16]} in its cgroup path")
    pid = _pick_init(pids, env.proc, f"in the cgroup of {container_id[:16]}", name)
    return Found(pid, f"cgroup of container {container_id[:16]}")


def _resolve_crio(name: str, env: Env) -> Found:
    errors = []
    if env.which("crictl"):
        try:
            text = env.run(["crictl", "inspect", "--output", "json", name])
            return Found(parse_crictl_inspect(text), "crictl inspect")
        except Miss as exc:
            errors.append(str(exc))
    else:
        errors.append("'crictl' not found on PATH")
    if _HEX_ID.match(name):
        try:
            return _by_cgroup(name, env, name)
        except Miss as exc:
            errors.append(str(exc))
    raise Miss("; ".join(errors))


def _resolve_kubernetes(name: str, env: Env) -> Found:
    parts = name.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise Miss("not POD, NAMESPACE/POD or NAMESPACE/POD/CONTAINER")
    namespace, pod, container = (
        ("default", parts[0], None)
        if len(parts) == 1
        else (parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    )
    text = env.run(
        ["kubectl", "get", "pod", pod, "-n", namespace, "-o", "json", "--request-timeout=5s"]
    )
    cid = parse_kubectl_container_id(text, container)
    return _by_cgroup(cid, env, name)


def _resolve_lxc(name: str, env: Env) -> Found:
    return Found(
        parse_pid_line(env.run(["lxc-info", "--no-humanize", "--pid", "--name", name])), "lxc-info"
    )


def _resolve_lxd(name: str, env: Env) -> Found:
    return Found(parse_info_pid(env.run(["lxc", "info", name])), "lxc info (LXD)")


def _resolve_incus(name: str, env: Env) -> Found:
    return Found(parse_info_pid(env.run(["incus", "info", name])), "incus info")


def _resolve_nspawn(name: str, env: Env) -> Found:
    text = env.run(["machinectl", "show", "--property=Leader", "--value", name])
    return Found(parse_pid_line(text), "machinectl show")


def _resolve_command(name: str, env: Env) -> Found:
    if not name:
        raise Miss("empty command-line pattern")
    needle = name.encode()
    skip = _our_ancestors(env.proc)
    matches = []
    for pid in _pids(env.proc):
        if pid in skip:
            continue
        cmdline = _read(f"{env.proc}/{pid}/cmdline")
        if cmdline and needle in cmdline.replace(b"\0", b" "):
            matches.append(pid)
    if not matches:
        raise Miss(f"no process has {name!r} in its command line")
    pid = _pick_init(matches, env.proc, f"with {name!r} in its command line", name)
    return Found(pid, "command line")


RESOLVERS: Mapping[str, Callable[[str, Env], Found]] = {
    "pid": _resolve_pid,
    "runc": _resolve_runc,
    "crun": _resolve_crun,
    "podman": _resolve_podman,
    "docker": _resolve_docker,
    "containerd": _resolve_containerd,
    "crio": _resolve_crio,
    "kubernetes": _resolve_kubernetes,
    "lxc": _resolve_lxc,
    "lxd": _resolve_lxd,
    "incus": _resolve_incus,
    "nspawn": _resolve_nspawn,
    "command": _resolve_command,
}


def normalize_types(types: Iterable[str] | str | None) -> list[str]:
    """``-t`` values (comma-separated or a list; ``_``/``-`` spellings) -> resolver names."""
    if types is None:
        return list(DEFAULT_TYPES)
    if isinstance(types, str):
        types = types.split(",")
    result = []
    for raw in types:
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in RESOLVERS:
            raise UnknownType(f"unknown container type {raw!r}; known: {', '.join(TYPES)}")
        if name not in result:
            result.append(name)
    if not result:
        raise UnknownType("no container type given")
    return result


def boot_ticks() -> int:
    """Now, in the unit of /proc/PID/stat's start time (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def pin(found: Found, engine: str, name: str, asked_at: int, tried: list[str]) -> Target:
    """Open a pidfd for ``found.pid`` and make sure it is the process the engine meant."""
    try:
        pidfd = llsys.pidfd_open(found.pid)
    except ProcessLookupError:
        raise TargetGone(
            f"{engine} named pid {found.pid} for {name!r}, but that process has exited"
        ) from None
    target = Target(found.pid, pidfd, engine, name, found.detail, tried)
    started = start_ticks(found.pid)
    ok = started is not None and target.alive()
    if ok and found.start_ticks is not None:
        ok = started == found.start_ticks
    elif ok:
        ok = started is not None and started <= asked_at + 1
    if not ok:
        target.close()
        raise TargetGone(
            f"{engine} named pid {found.pid} for {name!r}, but that process has exited "
            "(the pid now belongs to another process or none)"
        )
    return target


def resolve(name: str, types: Iterable[str] | str | None = None, env: Env | None = None) -> Target:
    """Find the process behind ``name`` and pin it; see the module note for the order.

    Raises TargetNotFound (listing what each resolver said), AmbiguousTarget, or
    TargetGone (the engine named a process that has already exited).
    """
    env = env or Env()
    tried: list[str] = []
    asked_at = boot_ticks()
    for engine in normalize_types(types):
        try:
            found = RESOLVERS[engine](name, env)
        except Miss as exc:
            tried.append(f"{engine}: {exc}")
            continue
        except AmbiguousTarget as exc:
            raise AmbiguousTarget(name, exc.candidates, tried) from None
        return pin(found, engine, name, asked_at, tried)
    raise TargetNotFound(name, tried)


def resolve_pid(pid: int) -> Target:
    """Pin a known pid (for programs that already have one)."""
    return resolve(str(pid), ["pid"])


__all__ = [
    "DEFAULT_TYPES",
    "RESOLVERS",
    "TYPES",
    "Env",
    "Found",
    "Miss",
    "Target",
    "cgroup_line_matches",
    "normalize_types",
    "resolve",
    "resolve_pid",
]
