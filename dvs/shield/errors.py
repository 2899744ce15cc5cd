"""Errors of sealed storage: finer kinds of ``dvs.errors.IntegrityError``.

Each says what failed to authenticate and where; none of them is ever raised with
unauthenticated plaintext handed out (the C core wipes the destination first).
"""

from __future__ import annotations

from dvs.errors import DvsError, IntegrityError


class WrongKey(IntegrityError):
    """The key (or passphrase) does not open this volume, or every superblock copy was
    replaced; the two cannot be told apart without the key."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("the volume key", None, detail or "wrong key or passphrase")


class RollbackDetected(IntegrityError):
    """The volume on disk is older than the trusted anchor the caller kept."""

    def __init__(self, found_epoch: int, anchor_epoch: int, detail: str = "") -> None:
        self.found_epoch = found_epoch
        self.anchor_epoch = anchor_epoch
        super().__init__(
            "volume freshness",
            None,
            detail or f"the file holds epoch {found_epoch}, the anchor expects {anchor_epoch}",
        )


class NotAVolume(DvsError):
    """Neither superblock slot carries the sealed-volume magic."""
