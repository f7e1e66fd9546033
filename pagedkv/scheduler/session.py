"""Session: one client conversation bound to one connection."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pagedkv.tiers.results import PrefixProbe


class SessionState(enum.Enum):
    """See DESIGN.md: QUEUED -> ACTIVE -> IDLE -> OFFLOADED -> DROPPED, any -> CLOSED."""

    NEW = "new"  # opened, no turn yet
    QUEUED = "queued"  # reported for sessions whose turn waits (see Session.queued_at)
    ACTIVE = "active"  # running a turn (or restoring for it); pinned
    IDLE = "idle"  # pinned, waiting for the client
    OFFLOADED = "offloaded"  # blocks on the host tier, none on the GPU
    DROPPED = "dropped"  # only hash-cache entries remain
    CLOSED = "closed"


PINNED_STATES = frozenset({SessionState.ACTIVE, SessionState.IDLE})


@dataclass(eq=False)
class Session:
    """Scheduler-side record of one session. Read it; the scheduler mutates it."""

    session_id: object
    tenant: str
    priority: int
    opened_at: float
    extra_keys: bytes = b""
    state: SessionState = SessionState.NEW
    num_turns: int = 0
    last_active: float = 0.0  # end of the last turn (or open time)
    pending_tokens: np.ndarray | None = None  # a queued/restoring turn's new tokens
    history: np.ndarray | None = None  # full token history, kept only while DROPPED
    queued_at: float | None = None  # set while a turn waits in the admission queue
    idle_since: float | None = None  # end of the last turn, until the next is submitted
    backup_tokens: int = 0  # tokens whose full blocks its latest backup covers
    # blocks a prefetch brought back while it rested on the host (0 once it returned),
    # and the tokens they hold (its next turn reports them as host hits)
    prefetched_blocks: int = field(default=0, repr=False)
    prefetched_tokens: int = field(default=0, repr=False)
    # prefetches of it wasted (evicted, refused or failed before it returned) since it
    # last returned, and the time before which it is not prefetched again (back-off)
    prefetch_wasted: int = field(default=0, repr=False)
    prefetch_after: float = field(default=float("-inf"), repr=False)
    # while a prefetch brings it back: when the window its return is predicted in ends
    prefetch_until: float = field(default=float("-inf"), repr=False)
    # GPU blocks its prefetch would have taken when last found too big for the room
    # (0: unknown), and, while DROPPED, its history's hash chain kept for those checks
    prefetch_need: int = field(default=0, repr=False)
    prefetch_probe: tuple[np.ndarray, PrefixProbe] | None = field(default=None, repr=False)
    # why the session is not on the GPU (for metrics): "offload", "drop", "release"
    evicted_by: str | None = field(default=None, repr=False)
    # a waiting turn's hash chain, kept between admission attempts so a retry only
    # re-matches it: (the pending_tokens and history arrays it was taken from, the probe)
    chain: tuple[object, object, PrefixProbe] | None = field(default=None, repr=False)

    @property
    def is_pinned(self) -> bool:
        return self.state in PINNED_STATES

    @property
    def is_queued(self) -> bool:
        return self.queued_at is not None
