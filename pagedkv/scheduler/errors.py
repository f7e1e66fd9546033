"""Errors the scheduler raises at its public boundary."""

from __future__ import annotations

from pagedkv.cache.errors import PagedKVError


class SessionError(PagedKVError, ValueError):
    """A call does not fit the session's state (unknown id, turn already running ...)."""


class OverCapacityError(PagedKVError):
    """A turn could not be admitted: the queue was full or its wait timed out.

    A server turns this into an "over capacity" error for the client.

    Attributes:
        session_id: the refused session.
        reason: "queue_full", "timeout", "tenant_quota" (a timeout while held back only by
            its tenant's pinned cap) or "too_large" (a turn that can never fit).
        detail: the reason in words, without the session id (what a server can show a
            client without exposing its internal keys).
    """

    def __init__(
        self, message: str, *, session_id: object = None, reason: str = "", detail: str = ""
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reason = reason
        self.detail = detail or message
