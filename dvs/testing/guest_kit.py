"""The Linux guest kit: a stock Debian kernel plus a busybox initramfs, built once and cached.

What the kit holds and why:

* The kernel comes from Debian's ``linux-image-6.1.0-*-amd64`` package (the versioned package
  that the ``linux-image-amd64`` metapackage depends on), fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb -x`` -- never installed into the host, whose own kernel is a
  different one and must stay untouched.
* ``bzImage`` is what QEMU boots. ``vmlinux`` is the same kernel uncompressed: the bzImage's
  payload is an XZ stream (with the x86 BCJ filter) that starts at the XZ magic
  ``FD 37 7A 58 5A 00``; decompressed it is the ELF that introspection code parses offline.
  We check that it is an ELF and carries the ``Linux version <release>`` banner.
* The initramfs is a gzip'd cpio (``newc``, the only format the kernel unpacks) with a static
  busybox, e2fsprogs' ``mke2fs``/``e2fsck``/``tune2fs`` with their shared libraries (busybox
  has a ``mke2fs`` applet but it makes ext2 only, and no ``e2fsck``), the init script and console
  agent from ``csrc/guest/initramfs/``, and the modules the tests need. Debian builds virtio,
  virtio_pci, virtio_mmio, virtio_blk, virtio_console, squashfs and ext4 as modules, so they are
  loaded by init in dependency order. The order is derived, never written down: ``depmod -b``
  over the unpacked package, then ``modprobe -d ROOT -S RELEASE --show-depends`` per module,
  which also lists soft dependencies (ext4 -> crc32c). ``crc32c-intel`` is left out: its
  SSE4.2 probe fails under TCG's default CPU, and ``crc32c_generic`` provides the same algorithm.
  The kernel package ships uncompressed modules today; ``.ko.xz``/``.ko.zst`` are decompressed
  anyway because busybox ``insmod`` may not understand them.

The kit is two cache artefacts (see ``dvs.testing.cache``): the unpacked kernel package with
its vmlinux (slow: a 70 MB download), and the initramfs + ``kit.json`` on top of it, whose name
carries a hash of everything it is built from, so editing the init script or the module list
builds a new initramfs without downloading the kernel again. Paths in ``kit.json`` are relative
to the kit directory because artefacts are built in a temporary directory and renamed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dvs.errors import DvsError
from dvs.testing import cache

KERNEL_FORMAT = 2
"""Bumped whenever what the kernel artefact holds (or how it is derived) changes."""
KIT_FORMAT = 1
"""Bumped whenever the layout of the kit or of its initramfs changes."""
KERNEL_ARTEFACT = f"linux-guest-kernel-v{KERNEL_FORMAT}"

KERNEL_METAPACKAGE = "linux-image-amd64"

WANTED_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "squashfs",
    "ext4",
)
"""Modules the guest must have, loaded (or found built in) by init, dependencies first."""

SKIPPED_MODULES = frozenset({"crc32c_intel"})
"""Modules never loaded even when a wanted module depends on them (see the module docstring)."""

E2FSPROGS_TOOLS: tuple[str, ...] = ("mke2fs", "e2fsck", "tune2fs")
E2FSPROGS_LINKS: dict[str, str] = {
    "mkfs.ext2": "mke2fs",
    "mkfs.ext3": "mke2fs",
    "mkfs.ext4": "mke2fs",
    "fsck.ext2": "e2fsck",
    "fsck.ext3": "e2fsck",
    "fsck.ext4": "e2fsck",
}

GUEST_HOSTNAME = "dvs-guest"

_REPO_ROOT = Path(__file__).resolve().parents[2]
INITRAMFS_SOURCE = _REPO_ROOT / "csrc" / "guest" / "initramfs"
"""Guest-side scripts: ``init`` (PID 1) and ``agent`` (the serial console command agent)."""

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"


class GuestKitError(DvsError):
    """The guest kit could not be built or is inconsistent."""


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """A built kit. All paths are absolute; ``kit.json`` in ``root`` stores them relative."""

    root: Path
    kernel_release: str
    """``uname -r`` inside the guest, e.g. ``6.1.0-56-amd64``."""
    kernel_package: str
    """The Debian package the kernel came from, e.g. ``linux-image-6.1.0-56-amd64``."""
    kernel_package_version: str
    """Its Debian version, e.g. ``6.1.192-2`` (also the upstream version + Debian revision)."""
    linux_banner: str
    """The ``Linux version ...`` string found in vmlinux (what ``/proc/version`` prints)."""
    bzimage: Path
    vmlinux: Path
    initramfs: Path
    kernel_config: Path
    modules_dir: Path
    """``lib/modules/<release>`` of the unpacked package (every module, with depmod files)."""
    module_load_order: tuple[str, ...]
    """Module names in the order init loads them (dependencies first)."""
    builtin_modules: tuple[str, ...]
    """Wanted modules that this kernel has built in (nothing to load)."""
    wanted_modules: tuple[str, ...]
    hostname: str

    @classmethod
    def load(cls, root: Path) -> GuestKit:
        """Read ``root/kit.json``."""
        try:
            meta = json.loads((root / "kit.json").read_text())
        except (OSError, ValueError) as exc:
            raise GuestKitError(f"{root}/kit.json is missing or unreadable: {exc}") from exc
        paths: dict[str, str] = meta["paths"]

        def resolve(key: str) -> Path:
            return (root / paths[key]).resolve()

        return cls(
            root=root,
            kernel_release=meta["kernel_release"],
            kernel_package=meta["kernel_package"],
            kernel_package_version=meta["kernel_package_version"],
            linux_banner=meta["linux_banner"],
            bzimage=resolve("bzimage"),
            vmlinux=resolve("vmlinux"),
            initramfs=resolve("initramfs"),
            kernel_config=resolve("kernel_config"),
            modules_dir=resolve("modules_dir"),
            module_load_order=tuple(meta["module_load_order"]),
            builtin_modules=tuple(meta["builtin_modules"]),
            wanted_modules=tuple(meta["wanted_modules"]),
            hostname=meta["hostname"],
        )


def guest_kit() -> GuestKit:
    """Return the cached kit, building it (and downloading the kernel) on first use."""
    kernel_dir = cache.artefact(KERNEL_ARTEFACT, _build_kernel)
    kit_dir = cache.artefact(
        f"linux-guest-kit-{_kit_fingerprint()}", lambda out: _build_kit(out, kernel_dir)
    )
    return GuestKit.load(kit_dir)


# --- the kernel artefact -------------------------------------------------------------------


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestKitError(
            f"`{' '.join(argv)}` failed with status {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def _versioned_kernel_package() -> str | None:
    """The ``linux-image-<release>`` package that the metapackage depends on, if apt knows."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    except GuestKitError:
        return None
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    return match.group(1) if match else None


def _download_kernel_package(download_dir: Path) -> tuple[str, Path]:
    """``apt-get download`` the versioned kernel package; return its name and the .deb.

    A fresh machine may have no package lists, and stale lists may name a version the
    security archive no longer serves: either way, ``apt-get update`` once and retry.
    """
    for attempt in range(2):
        package = _versioned_kernel_package()
        try:
            if package is None:
                raise GuestKitError(f"apt-cache knows no dependency of {KERNEL_METAPACKAGE}")
            # apt's sandbox user _apt cannot write into our root-owned temp dir.
            _run(
                ["apt-get", "download", "-o", "APT::Sandbox::User=root", package],
                cwd=download_dir,
            )
        except GuestKitError:
            if attempt == 1:
                raise
            _run(["apt-get", "update", "-qq"])
            continue
        debs = sorted(download_dir.glob("*.deb"))
        if len(debs) != 1:
            raise GuestKitError(f"expected one .deb for {package} in {download_dir}: {debs}")
        return package, debs[0]
    raise AssertionError("unreachable: the second attempt returns or raises")


def _build_kernel(out: Path) -> None:
    download_dir = out / "download"
    download_dir.mkdir()
    package, deb = _download_kernel_package(download_dir)
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    package_root = out / "package"
    _run(["dpkg-deb", "-x", str(deb), str(package_root)])
    deb.unlink()
    download_dir.rmdir()

    release = package.removeprefix("linux-image-")
    bzimage_in_package = package_root / "boot" / f"vmlinuz-{release}"
    if not bzimage_in_package.is_file():
        raise GuestKitError(f"{package} has no boot/vmlinuz-{release}")
    shutil.copyfile(bzimage_in_package, out / "bzImage")
    vmlinux = extract_vmlinux(bzimage_in_package.read_bytes())
    banner = _linux_banner(vmlinux, release)
    (out / "vmlinux").write_bytes(vmlinux)
    # The package ships no modules.dep; modprobe --show-depends needs it.
    _run(["depmod", "-b", str(package_root), release])
    (out / "kernel.json").write_text(
        json.dumps(
            {
                "kernel_release": release,
                "kernel_package": package,
                "kernel_package_version": version,
                "linux_banner": banner,
            },
            indent=2,
        )
    )


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Decompress the ELF vmlinux out of a bzImage whose payload is XZ-compressed.

    The magic may also occur by chance in the setup code, so every occurrence is tried until
    one decompresses to an ELF. The stream is followed by the decompressor's own trailer
    (uncompressed size), which ``LZMADecompressor`` leaves in ``unused_data``.
    """
    start = bzimage.find(_XZ_MAGIC)
    while start != -1:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            data = decompressor.decompress(bzimage[start:])
        except lzma.LZMAError:
            data = b""
        if decompressor.eof and data.startswith(_ELF_MAGIC):
            return data
        start = bzimage.find(_XZ_MAGIC, start + 1)
    raise GuestKitError("no XZ stream in the bzImage decompresses to an ELF vmlinux")


def _linux_banner(vmlinux: bytes, release: str) -> str:
    """The ``Linux version <release> ...`` banner, proving vmlinux is the expected kernel.

    Since 6.1 the image holds two banners: ``init/version.o``'s, built before the link
    (``# SMP ...``, no build number), and ``init/version-timestamp.o``'s, which the final link
    uses and ``/proc/version`` prints (``#1 SMP ...``). Prefer the one with a build number.
    """
    pattern = rb"Linux version " + re.escape(release.encode()) + rb" [^\n\x00]*"
    banners = [m.group(0).decode("ascii", errors="replace") for m in re.finditer(pattern, vmlinux)]
    if not banners:
        raise GuestKitError(f"vmlinux carries no 'Linux version {release}' banner")
    numbered = [banner for banner in banners if re.search(r"\) #\d+ ", banner)]
    return (numbered or banners)[0]


# --- module order ------------------------------------------------------------------------


def module_load_order(
    package_root: Path, release: str, wanted: Iterable[str]
) -> tuple[list[tuple[str, Path]], list[str]]:
    """Return ``([(name, .ko path), ...] in load order, [built-in wanted modules])``.

    ``modprobe --show-depends`` prints ``insmod PATH`` lines, dependencies first, and
    ``builtin NAME`` for built-in modules; concatenating its answers for each wanted module and
    keeping first occurrences gives a valid order for the whole set.
    """
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()
    builtin: list[str] = []
    for module in wanted:
        out = _run(["modprobe", "-d", str(package_root), "-S", release, "--show-depends", module])
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "builtin":
                if words[1] == module:
                    builtin.append(module)
                continue
            if len(words) < 2 or words[0] != "insmod":
                continue
            path = Path(words[1])
            name = _module_name(path)
            if name in seen or name in SKIPPED_MODULES:
                continue
            seen.add(name)
            order.append((name, path))
    return order, builtin


def _module_name(path: Path) -> str:
    base = path.name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    # The kernel names modules with underscores; file names may use dashes.
    return base.replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        # Python 3.11 has no zstd module; the zstd tool is in setup.sh's package list.
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            raise GuestKitError(f"zstd cannot decompress {path}: {result.stderr!r}")
        return result.stdout
    return data


# --- the initramfs -----------------------------------------------------------------------


class CpioNewcWriter:
    """Writes a cpio archive in the ``newc`` format (the one the kernel's initramfs accepts).

    Every entry belongs to root and has mtime 0, so the archive depends only on its content.
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._next_inode = 1
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            raise GuestKitError(f"initramfs entry {name!r} added twice")
        self._names.add(name)
        encoded_name = name.encode() + b"\x00"
        fields = (
            self._next_inode,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded_name),
            0,  # check (only for the "crc" variant)
        )
        self._next_inode += 1
        self._out.write(b"070701" + b"".join(b"%08x" % field for field in fields))
        self._out.write(encoded_name)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\x00" * (-self._out.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def _shared_libraries(binary: Path) -> list[Path]:
    """The absolute library paths ``ldd`` reports for a dynamically linked host binary."""
    libraries: list[Path] = []
    for line in _run(["ldd", str(binary)]).splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libraries.append(Path(match.group(1)))
    return libraries


def _which(tool: str) -> Path:
    found = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise GuestKitError(f"{tool} is not installed on the host (apt package e2fsprogs)")
    return Path(found)


def _initramfs_tree(
    release: str, modules: list[tuple[str, Path]], package_root: Path
) -> CpioNewcWriter:
    cpio = CpioNewcWriter()
    directories = [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/dvs", "lib", "lib64",
        "lib/x86_64-linux-gnu", "proc", "sys", "dev", "tmp", "run", "root", "mnt",
        "lib/modules", f"lib/modules/{release}",
    ]  # fmt: skip
    module_dirs = sorted(
        {
            str(parent)
            for _, path in modules
            for parent in _relative_module_path(path, package_root, release).parents
        }
        - {"."}
    )
    for directory in [*directories, *(f"lib/modules/{release}/{d}" for d in module_dirs)]:
        cpio.directory(directory, 0o1777 if directory == "tmp" else 0o755)
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)

    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise GuestKitError("/bin/busybox is missing (apt package busybox-static)")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)

    provided: set[str] = {"bin/busybox"}
    for tool in E2FSPROGS_TOOLS:
        host_binary = _which(tool)
        cpio.file(f"sbin/{tool}", host_binary.read_bytes(), 0o755)
        provided.add(f"sbin/{tool}")
        for library in _shared_libraries(host_binary):
            name = str(library).lstrip("/")
            if name not in provided:
                cpio.file(name, library.resolve().read_bytes(), 0o755)
                provided.add(name)
    for link, tool in E2FSPROGS_LINKS.items():
        cpio.symlink(f"sbin/{link}", tool)
        provided.add(f"sbin/{link}")

    applets = _run([str(busybox), "--list-full"]).split()
    for applet in sorted(set(applets)):
        if applet in provided:
            continue
        provided.add(applet)
        cpio.symlink(applet, "/bin/busybox")

    cpio.file("init", (INITRAMFS_SOURCE / "init").read_bytes(), 0o755)
    cpio.file("etc/dvs/agent", (INITRAMFS_SOURCE / "agent").read_bytes(), 0o755)
    cpio.file("etc/hostname", f"{GUEST_HOSTNAME}\n".encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    mke2fs_conf = Path("/etc/mke2fs.conf")
    if mke2fs_conf.is_file():
        cpio.file("etc/mke2fs.conf", mke2fs_conf.read_bytes())

    load_list: list[str] = []
    for _, path in modules:
        relative = _relative_module_path(path, package_root, release)
        guest_path = f"lib/modules/{release}/{relative}"
        cpio.file(guest_path, _module_bytes(path))
        load_list.append("/" + guest_path)
    cpio.file("etc/dvs/modules", "".join(f"{line}\n" for line in load_list).encode())

    # Let busybox modprobe work inside the guest for the modules we ship: a depmod over a
    # tree holding exactly them.
    for name, content in _depmod_files(release, modules, package_root).items():
        cpio.file(f"lib/modules/{release}/{name}", content)
    return cpio


def _relative_module_path(path: Path, package_root: Path, release: str) -> Path:
    relative = path.relative_to(package_root / "lib" / "modules" / release)
    name = relative.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return relative.with_name(name)


def _depmod_files(
    release: str, modules: list[tuple[str, Path]], package_root: Path
) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="dvs-depmod.") as scratch:
        root = Path(scratch)
        modules_dir = root / "lib" / "modules" / release
        for _, path in modules:
            target = modules_dir / _relative_module_path(path, package_root, release)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_module_bytes(path))
        source_dir = package_root / "lib" / "modules" / release
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, modules_dir / name)
        _run(["depmod", "-b", str(root), release])
        return {
            entry.name: entry.read_bytes()
            for entry in sorted(modules_dir.iterdir())
            if entry.is_file() and entry.name.startswith("modules.")
        }


def _kit_fingerprint() -> str:
    digest = hashlib.sha256()
    digest.update(
        f"format={KIT_FORMAT};kernel={KERNEL_ARTEFACT};modules={WANTED_MODULES};"
        f"skip={sorted(SKIPPED_MODULES)};".encode()
    )
    digest.update(f"tools={E2FSPROGS_TOOLS};links={sorted(E2FSPROGS_LINKS.items())};".encode())
    digest.update(f"hostname={GUEST_HOSTNAME};".encode())
    for name in ("init", "agent"):
        digest.update(name.encode() + b"\x00" + (INITRAMFS_SOURCE / name).read_bytes())
    return digest.hexdigest()[:12]


def _build_kit(out: Path, kernel_dir: Path) -> None:
    kernel = json.loads((kernel_dir / "kernel.json").read_text())
    release: str = kernel["kernel_release"]
    package_root = kernel_dir / "package"
    modules, builtin = module_load_order(package_root, release, WANTED_MODULES)
    loaded = {name for name, _ in modules}
    missing = [m for m in WANTED_MODULES if m not in loaded and m not in builtin]
    if missing:
        raise GuestKitError(f"modprobe found neither a module nor a built-in for {missing}")
    cpio = _initramfs_tree(release, modules, package_root)
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(cpio.finish(), mtime=0))

    kernel_rel = Path(os.path.relpath(kernel_dir, out.parent))
    # ``out`` is renamed next to the kernel directory, so ``../<kernel dir>`` stays valid.
    meta = {
        "format": KIT_FORMAT,
        **kernel,
        "module_load_order": [name for name, _ in modules],
        "builtin_modules": builtin,
        "wanted_modules": list(WANTED_MODULES),
        "hostname": GUEST_HOSTNAME,
        "paths": {
            "bzimage": str(Path("..") / kernel_rel / "bzImage"),
            "vmlinux": str(Path("..") / kernel_rel / "vmlinux"),
            "kernel_config": str(
                Path("..") / kernel_rel / "package" / "boot" / f"config-{release}"
            ),
            "modules_dir": str(Path("..") / kernel_rel / "package" / "lib" / "modules" / release),
            "initramfs": "initramfs.cpio.gz",
        },
    }
    (out / "kit.json").write_text(json.dumps(meta, indent=2) + "\n")
