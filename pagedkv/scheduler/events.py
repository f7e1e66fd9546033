"""What the scheduler hands a server: turn plans and admission events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagedkv.scheduler.errors import OverCapacityError

if TYPE_CHECKING:
    from pagedkv.tiers.transfer import TransferHandle


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What the model must compute for a turn that is ready to run.

    Attributes:
        session_id: the session.
        num_tokens: sequence length after this turn's input.
        compute_start: first position to compute (everything before is cached); at least
            one token is always left to compute, for the next-token logits.
        slot_mapping: int64 slots of positions `[compute_start, num_tokens)`.
        block_ids: the session's GPU block table at plan time.
        hit_pinned / hit_gpu / hit_host: cached tokens by source (the session's own
            pinned blocks, the GPU hash cache, the host tier).
        restore: with `SchedulerConfig.layerwise_restore` and an engine that signals
            layers, the host-to-GPU copy of the cached positions before `compute_start`
            that is still in flight (None: everything cached is in place). The runner
            calls `restore.wait_layer(i)` before layer i reads the cache, then
            `SessionScheduler.commit_restore` once the forward is issued.
    """

    session_id: object
    num_tokens: int
    compute_start: int
    slot_mapping: np.ndarray
    block_ids: list[int]
    hit_pinned: int
    hit_gpu: int
    hit_host: int
    restore: TransferHandle | None = None

    @property
    def cached_tokens(self) -> int:
        return self.compute_start

    @property
    def num_computed(self) -> int:
        return self.num_tokens - self.compute_start


@dataclass(frozen=True, slots=True)
class TurnReady:
    """poll() event: a waiting turn can run now."""

    session_id: object
    plan: TurnPlan


@dataclass(frozen=True, slots=True)
class TurnRefused:
    """poll() event: a waiting turn was refused (queue timeout); the session keeps the
    state it had before the turn and may try again."""

    session_id: object
    error: OverCapacityError


Event = TurnReady | TurnRefused
