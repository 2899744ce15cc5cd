"""Real-component fixtures for tests, benchmarks and the demo.

Everything here starts real things -- runc/crun/podman containers from a busybox rootfs,
QEMU guests with a Debian kernel, a minimal KVM guest of our own -- and cleans them up
again, also when the caller fails half-way. Built artefacts are cached (see ``cache``).
"""
