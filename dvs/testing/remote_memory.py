"""Guest RAM that lives in another process, for testing the remote guest-memory backend.

``forked_guest_memory(size)`` maps ``size`` bytes of private anonymous memory, forks a child
that only waits, and returns a ``GuestMemory`` over the *child's* copy of that mapping
(``pid`` = the child, same virtual addresses). Every access then goes through
process_vm_readv/writev exactly as it does against a hypervisor's RAM, while the parent's
own copy (MAP_PRIVATE, copy-on-write after fork) stays separate. The child is reaped and
the mapping released when the context exits, also on failure.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dvs.lowlevel import ffi
from dvs.lowlevel.guestmem import GuestMemory, Region


@contextmanager
def forked_guest_memory(size: int, base_gpa: int = 0) -> Iterator[GuestMemory]:
    backing = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ffi.from_buffer(backing)
    hva = int(ffi.cast("uintptr_t", view))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the address space until the parent is done
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        yield GuestMemory([Region(base_gpa, size, hva)], pid=pid)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
        del view
        backing.close()
