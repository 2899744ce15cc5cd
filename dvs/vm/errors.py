"""Errors of guest introspection, as children of the dvs tree.

Guest memory is untrusted: whatever we expected to find there (a page table, a symbol table, a
type section) may be missing, stale or malformed. Such failures are ``GuestLayoutError`` (a
``GuestProtocolError`` whose rule says what was expected); an address the guest simply does not
map is ``TranslationFault`` (a normal answer, not a violation); no RAM in the process is
``RamNotFound`` (a ``TargetNotFound``).
"""

from __future__ import annotations

from dvs.errors import DvsError, GuestProtocolError, TargetNotFound


class GuestLayoutError(GuestProtocolError):
    """Guest memory does not hold the structure we expected (the rule names what failed)."""


class KernelNotFound(GuestLayoutError):
    """No running Linux kernel could be located and validated in guest RAM."""

    def __init__(self, detail: str) -> None:
        super().__init__("a running Linux kernel is present in guest RAM", detail)


class TranslationFault(DvsError):
    """A virtual address is not mapped by the page tables walked."""

    def __init__(self, va: int, level: int, entry: int) -> None:
        self.va = va
        self.level = level
        self.entry = entry
        super().__init__(f"{va:#x} is not mapped (level {level} entry {entry:#x} not present)")


class RamNotFound(TargetNotFound):
    """The process has no mapping that could be guest RAM."""


class SideloadError(DvsError):
    """The side-loading proof could not be run or did not complete; nothing is left behind."""
