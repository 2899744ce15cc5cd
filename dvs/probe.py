"""What this kernel and host offer, and which backend each capability will therefore use.

Every answer comes from asking the running kernel, not from version numbers:
- FUSE: mount a throw-away FUSE filesystem and read the kernel's FUSE_INIT request; its
  protocol minor and offered flags tell whether passthrough (FUSE_PASSTHROUGH, 7.40 / Linux
  6.9) and FUSE-over-io_uring (FUSE_OVER_IO_URING, offered only while the ``fuse`` module
  parameter ``enable_uring`` is Y) are there.
- io_uring: set up a ring and ask IORING_REGISTER_PROBE for the supported opcodes;
  ``kernel.io_uring_disabled`` and seccomp may forbid it even when it is built in.
- mount API / idmapped mounts: fsopen+fsmount a tmpfs; open_tree a directory and give the
  detached clone an id mapping from a freshly made user namespace (per filesystem type).
- namespaces: start a child in new user and time namespaces.
- KVM: the flavour is the module that provides /dev/kvm (kvm_intel -> vmx, kvm_amd -> svm,
  kvm_pvm -> pvm). kvm-pvm runs guest kernel code by emulation, and a stock Linux kernel dies
  there with emulation failures, so stock guests must use QEMU's TCG instead.
Results are cached per process (``probe()``); tests use them to decide skips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvs.lowlevel import ffi, lib
from dvs.lowlevel import sys as llsys

# io_uring opcodes by number (include/uapi/linux/io_uring.h); later ones print as op_N.
URING_OPCODES = [
    "NOP",
    "READV",
    "WRITEV",
    "FSYNC",
    "READ_FIXED",
    "WRITE_FIXED",
    "POLL_ADD",
    "POLL_REMOVE",
    "SYNC_FILE_RANGE",
    "SENDMSG",
    "RECVMSG",
    "TIMEOUT",
    "TIMEOUT_REMOVE",
    "ACCEPT",
    "ASYNC_CANCEL",
    "LINK_TIMEOUT",
    "CONNECT",
    "FALLOCATE",
    "OPENAT",
    "CLOSE",
    "FILES_UPDATE",
    "STATX",
    "READ",
    "WRITE",
    "FADVISE",
    "MADVISE",
    "SEND",
    "RECV",
    "OPENAT2",
    "EPOLL_CTL",
    "SPLICE",
    "PROVIDE_BUFFERS",
    "REMOVE_BUFFERS",
    "TEE",
    "SHUTDOWN",
    "RENAMEAT",
    "UNLINKAT",
    "MKDIRAT",
    "SYMLINKAT",
    "LINKAT",
    "MSG_RING",
    "FSETXATTR",
    "SETXATTR",
    "FGETXATTR",
    "GETXATTR",
    "SOCKET",
    "URING_CMD",
    "SEND_ZC",
    "SENDMSG_ZC",
    "READ_MULTISHOT",
    "WAITID",
    "FUTEX_WAIT",
    "FUTEX_WAKE",
    "FUTEX_WAITV",
    "FIXED_FD_INSTALL",
    "FTRUNCATE",
    "BIND",
    "LISTEN",
    "RECV_ZC",
    "EPOLL_WAIT",
    "READV_FIXED",
    "WRITEV_FIXED",
    "PIPE",
]

# FUSE_INIT flags worth reporting (bit -> name); see csrc/compat.h.
FUSE_INIT_FLAGS = {
    0: "ASYNC_READ",
    1: "POSIX_LOCKS",
    3: "ATOMIC_O_TRUNC",
    4: "EXPORT_SUPPORT",
    5: "BIG_WRITES",
    6: "DONT_MASK",
    7: "SPLICE_WRITE",
    8: "SPLICE_MOVE",
    9: "SPLICE_READ",
    10: "FLOCK_LOCKS",
    11: "HAS_IOCTL_DIR",
    12: "AUTO_INVAL_DATA",
    13: "DO_READDIRPLUS",
    14: "READDIRPLUS_AUTO",
    15: "ASYNC_DIO",
    16: "WRITEBACK_CACHE",
    17: "NO_OPEN_SUPPORT",
    18: "PARALLEL_DIROPS",
    19: "HANDLE_KILLPRIV",
    20: "POSIX_ACL",
    21: "ABORT_ERROR",
    22: "MAX_PAGES",
    23: "CACHE_SYMLINKS",
    24: "NO_OPENDIR_SUPPORT",
    25: "EXPLICIT_INVAL_DATA",
    26: "MAP_ALIGNMENT",
    27: "SUBMOUNTS",
    28: "HANDLE_KILLPRIV_V2",
    29: "SETXATTR_EXT",
    30: "INIT_EXT",
    32: "SECURITY_CTX",
    33: "HAS_INODE_DAX",
    34: "CREATE_SUPP_GROUP",
    35: "HAS_EXPIRE_ONLY",
    36: "DIRECT_IO_ALLOW_MMAP",
    37: "PASSTHROUGH",
    38: "NO_EXPORT_SUPPORT",
    39: "HAS_RESEND",
    40: "ALLOW_IDMAP",
    41: "OVER_IO_URING",
    42: "REQUEST_TIMEOUT",
}

TOOLS = (
    "runc",
    "crun",
    "podman",
    "docker",
    "ctr",
    "crictl",
    "kubectl",
    "lxc-info",
    "lxc",
    "incus",
    "machinectl",
    "qemu-system-x86_64",
    "qemu-storage-daemon",
)


@dataclass
class FuseInfo:
    device: bool
    protocol: str = ""
    flags: list[str] = field(default_factory=list)
    passthrough: bool = False  # offered by the kernel in FUSE_INIT
    passthrough_usable: bool = False  # a backing file could really be registered
    over_io_uring: str = "absent"  # "offered", "built in, off (...)", "absent"
    error: str = ""


@dataclass
class UringInfo:
    available: bool
    disabled_sysctl: int | None = None
    last_op: int = -1
    opcodes: list[str] = field(default_factory=list)
    error: str = ""

    def supports(self, *ops: str) -> bool:
        return self.available and all(op in self.opcodes for op in ops)


@dataclass
class KvmInfo:
    device: bool
    flavour: str  # "vmx", "svm", "pvm" or "none"
    stock_linux_guest: bool
    reason: str


@dataclass
class ProbeReport:
    kernel: str
    kernel_version: tuple[int, int, int]
    root: bool
    fuse: FuseInfo
    io_uring: UringInfo
    mount_api: bool
    idmapped_mounts: dict[str, bool]
    user_namespaces: bool
    time_namespaces: bool
    cgroup: str  # "v2", "v1", "hybrid", "none"
    cgroup_detail: str
    kvm: KvmInfo
    tun: bool
    userfaultfd: bool
    tools: dict[str, str]
    backends: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def has_tool(self, name: str) -> bool:
        return name in self.tools


@functools.cache
def probe() -> ProbeReport:
    """Probe once per process (see the module note)."""
    return _probe_now()


def _probe_now() -> ProbeReport:
    release = platform.release()
    numbers = [int(n) for n in re.findall(r"\d+", release)[:3]]
    version = [*numbers, 0, 0, 0][:3]
    root = os.geteuid() == 0
    fuse = probe_fuse()
    uring = probe_io_uring()
    mount_api = _probe_mount_api()
    idmapped = _probe_idmapped_mounts() if root else {}
    userns = _probe_spawn_flags(llsys.CLONE_NEWUSER)
    timens = _probe_spawn_flags(llsys.CLONE_NEWTIME)
    cgroup, cgroup_detail = _probe_cgroups()
    kvm = probe_kvm()
    report = ProbeReport(
        kernel=release,
        kernel_version=(version[0], version[1], version[2]),
        root=root,
        fuse=fuse,
        io_uring=uring,
        mount_api=mount_api,
        idmapped_mounts=idmapped,
        user_namespaces=userns,
        time_namespaces=timens,
        cgroup=cgroup,
        cgroup_detail=cgroup_detail,
        kvm=kvm,
        tun=_can_open("/dev/net/tun"),
        userfaultfd=_probe_userfaultfd(),
        tools=_find_tools(),
        backends={},
    )
    report.backends = choose_backends(report)
    return report


def choose_backends(report: ProbeReport) -> dict[str, str]:
    """Name the backend each capability uses on this host, with the reason."""
    backends: dict[str, str] = {}
    if report.mount_api:
        idmap = "with idmapped mounts" if any(report.idmapped_mounts.values()) else "no idmap"
        backends["container attach"] = f"mount (new mount API, {idmap})"
    elif report.fuse.device:
        backends["container attach"] = "fuse (mount API unavailable)"
    else:
        backends["container attach"] = "unavailable (neither mount API nor /dev/fuse)"
    if not report.fuse.device:
        backends["cntrfs"] = "unavailable (no /dev/fuse)"
    elif report.fuse.passthrough_usable:
        backends["cntrfs"] = "fuse with kernel passthrough"
    else:
        why = report.fuse.error if report.fuse.passthrough else "kernel offers no passthrough"
        backends["cntrfs"] = f"fuse without passthrough ({why})"
    if report.io_uring.supports("READ", "WRITE", "READ_FIXED", "WRITE_FIXED", "FSYNC"):
        backends["shield engine"] = "io_uring"
    else:
        backends["shield engine"] = (
            f"threads with pread/pwrite ({report.io_uring.error or 'io_uring lacks opcodes'})"
        )
    backends["vm memory"] = "process_vm_readv/writev on the hypervisor's guest RAM mapping"
    if report.kvm.device:
        backends["vm mechanics"] = (
            f"ptrace syscall injection into the hypervisor (KVM {report.kvm.flavour})"
        )
    else:
        backends["vm mechanics"] = "unavailable (no /dev/kvm); TCG guests only"
    backends["stock linux guests"] = (
        "KVM" if report.kvm.stock_linux_guest else f"QEMU TCG ({report.kvm.reason})"
    )
    return backends


# ---- individual probes ------------------------------------------------------------------------


def probe_fuse() -> FuseInfo:
    if not os.path.exists("/dev/fuse"):
        return FuseInfo(device=False, error="/dev/fuse is missing")
    info = FuseInfo(device=True)
    with tempfile.TemporaryDirectory(prefix="dvs-probe-fuse-") as scratch:
        mountpoint = os.path.join(scratch, "mnt")
        backing = os.path.join(scratch, "backing")
        os.mkdir(mountpoint)
        Path(backing).write_bytes(b"dvs")
        out = ffi.new("struct dvs_fuse_init_info *")
        ret = lib.dvs_probe_fuse_init(mountpoint.encode(), backing.encode(), out)
        if ret < 0:
            info.error = f"FUSE_INIT probe failed: {os.strerror(-ret)}"
            return info
    info.protocol = f"{out.major}.{out.minor}"
    info.flags = [name for bit, name in FUSE_INIT_FLAGS.items() if out.flags >> bit & 1]
    info.passthrough = "PASSTHROUGH" in info.flags
    info.passthrough_usable = out.passthrough_result >= 0
    if info.passthrough and not info.passthrough_usable:
        info.error = f"passthrough offered but unusable: {os.strerror(-out.passthrough_result)}"
    param = Path("/sys/module/fuse/parameters/enable_uring")
    if "OVER_IO_URING" in info.flags:
        info.over_io_uring = "offered"
    elif param.exists():
        value = param.read_text().strip()
        info.over_io_uring = f"built in, off (enable_uring={value}; root can write Y)"
    return info


def probe_io_uring() -> UringInfo:
    disabled: int | None = None
    with contextlib.suppress(OSError, ValueError):
        disabled = int(Path("/proc/sys/kernel/io_uring_disabled").read_text())
    n_ops = 256
    supported = ffi.new("uint8_t[]", n_ops)
    last_op = ffi.new("uint32_t *")
    ret = lib.dvs_probe_uring(supported, n_ops, last_op)
    if ret < 0:
        reason = {errno.ENOSYS: "not built into the kernel", errno.EPERM: "forbidden"}.get(
            -ret, os.strerror(-ret)
        )
        return UringInfo(available=False, disabled_sysctl=disabled, error=f"io_uring: {reason}")
    names = [
        URING_OPCODES[op] if op < len(URING_OPCODES) else f"op_{op}"
        for op in range(min(n_ops, last_op[0] + 1))
        if supported[op]
    ]
    return UringInfo(True, disabled, last_op[0], names)


def probe_kvm() -> KvmInfo:
    device = os.path.exists("/dev/kvm")
    modules = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()}
    if not device:
        return KvmInfo(False, "none", False, "no /dev/kvm")
    if "kvm_pvm" in modules:
        return KvmInfo(
            True,
            "pvm",
            False,
            "kvm-pvm emulates guest kernel code; stock Linux dies with emulation failures",
        )
    if "kvm_intel" in modules:
        return KvmInfo(True, "vmx", True, "hardware virtualisation (Intel VMX)")
    if "kvm_amd" in modules:
        return KvmInfo(True, "svm", True, "hardware virtualisation (AMD SVM)")
    return KvmInfo(True, "none", False, "/dev/kvm present but no known KVM vendor module")


def _probe_mount_api() -> bool:
    try:
        fs = llsys.fsopen("tmpfs")
    except OSError:
        return False
    try:
        llsys.fsconfig(fs, llsys.FSCONFIG_CMD_CREATE)
        mnt = llsys.fsmount(fs)
        os.close(mnt)
        return True
    except OSError:
        return False
    finally:
        os.close(fs)


@contextlib.contextmanager
def _userns_fd(mapping: str) -> Iterator[int]:
    holder = llsys.spawn(None, clone_flags=llsys.CLONE_NEWUSER, uid_map=mapping, gid_map=mapping)
    try:
        fd = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()
        holder.close()


def _probe_idmapped_mounts() -> dict[str, bool]:
    """Idmapped-mount support per filesystem type of a few places dvs grafts from."""
    result: dict[str, bool] = {}
    candidates = ["/dev/shm", tempfile.gettempdir(), str(Path.home())]
    try:
        with _userns_fd("0 100000 65536") as userns:
            for place in candidates:
                fstype = _fstype_of(place)
                if not fstype or fstype in result:
                    continue
                result[fstype] = _try_idmap(place, userns)
    except OSError:
        return {}
    return result


def _try_idmap(path: str, userns: int) -> bool:
    try:
        tree = llsys.open_tree(
            llsys.AT_FDCWD, path, llsys.OPEN_TREE_CLONE | llsys.OPEN_TREE_CLOEXEC
        )
    except OSError:
        return False
    try:
        llsys.mount_setattr(
            tree, "", llsys.AT_EMPTY_PATH, attr_set=llsys.MOUNT_ATTR_IDMAP, userns_fd=userns
        )
        return True
    except OSError:
        return False
    finally:
        os.close(tree)


def _fstype_of(path: str) -> str:
    """The filesystem type of the mount that holds ``path`` (longest mountinfo prefix)."""
    real = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4]
            if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(
                mount_point
            ) >= len(best):
                best, best_type = mount_point, right.split()[0]
    return best_type


def _probe_spawn_flags(flags: int) -> bool:
    try:
        holder = llsys.spawn(None, clone_flags=flags)
    except OSError:
        return False
    holder.kill()
    holder.wait()
    holder.close()
    return True


def _cgroup_mounts() -> tuple[list[str], list[str]]:
    """Mount points of cgroup v1 hierarchies and of cgroup2, from our mountinfo."""
    v1: list[str] = []
    v2: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, mount_point = right.split()[0], left.split()[4]
            if fstype == "cgroup2":
                v2.append(mount_point)
            elif fstype == "cgroup":
                v1.append(mount_point)
    return v1, v2


def cgroup2_mount() -> str | None:
    """Where the cgroup2 hierarchy is mounted (``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    return next(iter(_cgroup_mounts()[1]), None)


def _probe_cgroups() -> tuple[str, str]:
    v1, v2 = _cgroup_mounts()
    if v2 and v1:
        return "hybrid", f"v1 at {', '.join(sorted(v1))}; v2 at {', '.join(v2)}"
    if v2:
        return "v2", f"v2 at {', '.join(v2)}"
    if v1:
        return "v1", f"v1 at {', '.join(sorted(v1))}"
    return "none", "no cgroup filesystem mounted"


def _probe_userfaultfd() -> bool:
    try:
        fd = llsys.userfaultfd(os.O_CLOEXEC | llsys.UFFD_USER_MODE_ONLY)
    except OSError:
        return False
    os.close(fd)
    return True


def _can_open(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def _find_tools() -> dict[str, str]:
    found: dict[str, str] = {}
    for tool in TOOLS:
        path = shutil.which(tool)
        if not path:
            continue
        version = ""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
            first = (out.stdout or out.stderr).strip().splitlines()
            version = first[0] if first and out.returncode == 0 else ""
        found[tool] = f"{path} ({version})" if version else path
    return found


# ---- presentation -----------------------------------------------------------------------------


def format_table(report: ProbeReport) -> str:
    """A table for people (``dvs probe``)."""

    def yes(value: bool) -> str:
        return "yes" if value else "no"

    fuse = report.fuse
    uring = report.io_uring
    rows: list[tuple[str, str]] = [
        ("kernel", report.kernel),
        ("running as root", yes(report.root)),
        ("FUSE", f"protocol {fuse.protocol}" if fuse.protocol else (fuse.error or "absent")),
        (
            "FUSE passthrough",
            f"offered: {yes(fuse.passthrough)}, usable: {yes(fuse.passthrough_usable)}",
        ),
        ("FUSE over io_uring", fuse.over_io_uring),
        (
            "io_uring",
            f"yes, {len(uring.opcodes)} opcodes (last {uring.last_op})"
            if uring.available
            else f"no ({uring.error})",
        ),
        ("mount API", yes(report.mount_api)),
        (
            "idmapped mounts",
            ", ".join(f"{fs}: {yes(ok)}" for fs, ok in sorted(report.idmapped_mounts.items()))
            or "not probed",
        ),
        ("user namespaces", yes(report.user_namespaces)),
        ("time namespaces", yes(report.time_namespaces)),
        ("cgroups", f"{report.cgroup} ({report.cgroup_detail})"),
        (
            "KVM",
            f"{report.kvm.flavour}; stock Linux guest: {yes(report.kvm.stock_linux_guest)}"
            f" ({report.kvm.reason})"
            if report.kvm.device
            else "no /dev/kvm",
        ),
        ("TUN", yes(report.tun)),
        ("userfaultfd", yes(report.userfaultfd)),
    ]
    rows += [(f"tool {name}", where) for name, where in sorted(report.tools.items())]
    rows += [(f"backend: {cap}", choice) for cap, choice in report.backends.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def as_dict(report: ProbeReport) -> dict[str, Any]:
    return dataclasses.asdict(report)
