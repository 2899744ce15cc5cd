#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (as root) for dvs: the apt packages the
# build, the tests, the demo and the benchmarks use; the pip dependencies; the cffi core.
# Everything that CI needs is installed here, never by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # build of the cffi core
  build-essential pkg-config liburing-dev libssl-dev libsqlite3-dev libfuse3-dev libseccomp-dev
  # container attach: runtimes and a static busybox for slim rootfs
  runc crun podman uidmap busybox-static iproute2 procps util-linux kmod
  # FUSE: fusermount3 and the libfuse baseline examples
  fuse3
  # VMs: QEMU (system + storage daemon), guest kit tools
  qemu-system-x86 qemu-system-common qemu-utils cpio xz-utils zstd squashfs-tools e2fsprogs
  # measuring and stressing
  strace linux-perf fio stress-ng dbench fsmark postmark sqlcipher libsqlcipher-dev iperf3
  # the shield benchmark's AES-GCM ceiling (openssl speed)
  openssl
  # VM introspection: gdb reads the ELF cores `dvs vm coredump` writes (tests)
  gdb
  # the C fast paths' fuzzing toolchain (clang + compiler-rt's libFuzzer/ASan/UBSan runtimes)
  clang libclang-rt-14-dev
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# The dependencies from pyproject.toml (main + test + fuzz extras; the fuzz harnesses run
# briefly in the test suite), not dvs itself: the checkout is
# used in place (python3 -m dvs, python3 -m pytest), so several checkouts never fight over
# one site-wide install.
mkdir -p .cache
if [ ! -f .cache/requirements.txt ] || [ pyproject.toml -nt .cache/requirements.txt ]; then
  echo "setup: installing pip dependencies"
  "$PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
x = p["optional-dependencies"]
print("\n".join(p["dependencies"] + x["test"] + x["fuzz"]))' > .cache/requirements.tmp
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -r .cache/requirements.tmp
  mv .cache/requirements.tmp .cache/requirements.txt
fi
echo "setup: building the cffi core"
"$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "BetaConfiguration|_BetaConfiguration|warnings.warn" || true
"$PY" -c 'import dvs._native' || { echo "setup: the cffi core does not import" >&2; exit 1; }
