"""Shielded storage: an exitless, authenticated-encrypted block store on io_uring, with
SQLite on top (the rkt-io idea, with integrity and freshness that dm-crypt XTS lacks).

- ``dvs.shield.engine``: which I/O engine this host gets (io_uring ring, or the
  pread/pwrite thread pool where io_uring is disabled or blocked) and the syscall cost model.
- ``dvs.shield.volume``: the sealed volume (AES-256-GCM per 4 KiB block, a MAC tree whose
  root lives in a sealed superblock, crash-consistent flushes).
- ``dvs.shield.sqlite``: the SQLite VFS that stores databases in sealed volumes.
- ``dvs.shield.cli``: ``dvs shield format|fsck|bench|sqlite``.

No SGX exists on the machines this runs on; nothing here claims enclave protection. The
claims are about the I/O path's structure (syscalls, the stand-in for enclave exits) and
about the authenticated on-disk format.
"""
