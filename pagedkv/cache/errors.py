"""Exceptions raised at pagedkv's public boundary."""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of every pagedkv-specific error."""


class OutOfBlocksError(PagedKVError):
    """A request needs more blocks than the pool can supply; nothing was changed.

    Attributes:
        needed: blocks the request needed.
        available: blocks that were free or reclaimable when it was refused.

    Picklable (across process pools): the keyword fields have defaults and are restored
    from the instance dict.
    """

    def __init__(self, message: str, *, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class InvariantError(PagedKVError, AssertionError):
    """`check_invariants()` found an inconsistency; the message carries the numbers."""
