"""pagedkv.scheduler: connection-scoped sessions on a two-tier paged KV cache.

`SessionScheduler` admits turns under a pinned-session cap, per-tenant caps and a GPU
watermark, keeps each open session's blocks pinned between turns, and offloads or drops
idle sessions (cost-aware, by the learned `IdleGapModel`) when room is needed. It never
touches tensors and reads time only from an injected clock, so the server and the
simulator drive the same code.
"""

from __future__ import annotations

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.errors import OverCapacityError, SessionError
from pagedkv.scheduler.events import Event, TurnPlan, TurnReady, TurnRefused
from pagedkv.scheduler.eviction import IdleGapModel, IdleSessions, choose_action
from pagedkv.scheduler.metrics import SchedulerMetrics
from pagedkv.scheduler.scheduler import SessionScheduler
from pagedkv.scheduler.session import PINNED_STATES, Session, SessionState

__all__ = [
    "PINNED_STATES",
    "CostModel",
    "Event",
    "IdleGapModel",
    "IdleSessions",
    "OverCapacityError",
    "SchedulerConfig",
    "SchedulerMetrics",
    "Session",
    "SessionError",
    "SessionScheduler",
    "SessionState",
    "TurnPlan",
    "TurnReady",
    "TurnRefused",
    "choose_action",
]
