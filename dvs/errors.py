"""The dvs exception tree.

Every failure dvs reports on purpose is a ``DvsError``. The children say *whose* fault it
is, because callers react differently: a target that vanished is retried or reported, a
missing kernel feature selects another backend, a guest protocol violation or an integrity
failure is an attack or a bug on the other side and must never be papered over.
Plain syscall failures without a dvs-level meaning stay ``OSError`` subclasses.
Messages say what was expected and what was found.
"""

from __future__ import annotations


class DvsError(Exception):
    """Base of every error dvs raises deliberately."""


class TargetNotFound(DvsError):
    """No container, process or VM matches the given name; ``tried`` lists each attempt."""

    def __init__(self, target: str, tried: list[str] | None = None) -> None:
        self.target = target
        self.tried = list(tried or [])
        detail = "".join(f"\n  - {attempt}" for attempt in self.tried)
        super().__init__(f"no target matches {target!r}" + (f"; tried:{detail}" if detail else ""))


class TargetGone(DvsError):
    """The target existed but exited (or was replaced) while dvs worked on it."""


class NotPermitted(DvsError):
    """The caller lacks a privilege dvs needs (root, a capability, ptrace access)."""


class KernelLacksFeature(DvsError):
    """The running kernel (or its configuration) does not offer a needed feature."""

    def __init__(self, feature: str, needed: str, detail: str = "") -> None:
        self.feature = feature
        self.needed = needed
        message = f"the kernel lacks {feature} (needs {needed})"
        super().__init__(f"{message}: {detail}" if detail else message)


class GuestProtocolError(DvsError):
    """An untrusted peer (guest driver, FUSE client, hypervisor memory) broke a rule.

    ``rule`` names the violated rule, e.g. ``"descriptor chain longer than queue size"``.
    """

    def __init__(self, rule: str, detail: str = "") -> None:
        self.rule = rule
        super().__init__(f"protocol violation: {rule}" + (f" ({detail})" if detail else ""))


class IntegrityError(DvsError):
    """Authenticated data failed verification; nothing unauthenticated was returned."""

    def __init__(self, what: str, block: int | None = None, detail: str = "") -> None:
        self.block = block
        where = f" at block {block}" if block is not None else ""
        super().__init__(
            f"integrity check failed for {what}{where}" + (f": {detail}" if detail else "")
        )
