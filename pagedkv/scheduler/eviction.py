"""Victim choice: which idle session makes room, and whether it is offloaded or dropped."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Literal

import numpy as np

from pagedkv.scheduler.cost import CostModel
from pagedkv.scheduler.session import Session

Action = Literal["offload", "drop"]


# pick_victim looks at this many sessions from each end of the recency order
VICTIM_CANDIDATES = 4


class IdleGapModel:
    """The distribution of idle gaps (end of a turn to the session's next turn), learned
    online, and what it predicts for a session that has been idle a while.

    Agent loops have a typical gap (tool execution, seconds) and a long tail (a human):
    a session that has just finished a turn is *less* likely to come back within the
    next seconds than one that has waited nearly the typical gap, so least-recently-used
    is the wrong victim order there, while a session idle far past the typical gap is
    probably waiting for a human and is the best victim. `stays_idle(age)` is the
    probability that a session idle for `age` seconds is still idle `horizon` seconds
    later (default horizon: half the median observed gap): the chance that evicting it
    costs nothing soon. It is robust to heavy tails, unlike the expected remaining wait, which
    a few long human gaps dominate.

    Gaps are counted in log-spaced bins; old observations decay (counts halve every
    `half_life` observations), so it follows a changing workload. With fewer than
    `min_samples` observations it has no opinion (None), and victim choice falls back
    to least recently used.
    """

    def __init__(
        self,
        *,
        horizon_s: float | None = None,
        min_s: float = 0.01,
        max_s: float = 86_400.0,
        bins_per_decade: int = 8,
        min_samples: int = 32,
        half_life: int = 4096,
    ) -> None:
        if not 0 < min_s < max_s:
            raise ValueError(f"IdleGapModel needs 0 < min_s < max_s, got {min_s}, {max_s}")
        if horizon_s is not None and not horizon_s > 0:
            raise ValueError(f"IdleGapModel.horizon_s must be > 0 or None, got {horizon_s!r}")
        if bins_per_decade < 1 or min_samples < 1 or half_life < 1:
            raise ValueError(
                "IdleGapModel: bins_per_decade, min_samples and half_life must be >= 1"
            )
        self.horizon_s = horizon_s
        self._log_min = math.log10(min_s)
        self._per_decade = bins_per_decade
        num_bins = math.ceil((math.log10(max_s) - self._log_min) * bins_per_decade)
        self._edges = 10.0 ** (self._log_min + np.arange(num_bins + 1) / bins_per_decade)
        self._counts = np.zeros(num_bins)
        self._num_bins = num_bins
        self._min_samples = min_samples
        self._half_life = half_life
        self._since_decay = 0
        self.num_observed = 0
        self._survival: np.ndarray | None = None  # at the bin edges, rebuilt lazily
        self._horizon = 0.0

    def observe(self, gap_s: float) -> None:
        """Record one observed idle gap (seconds; clipped to the histogram's range)."""
        if not gap_s >= 0:  # also rejects NaN
            raise ValueError(f"IdleGapModel.observe: gap must be >= 0 seconds, got {gap_s!r}")
        self.num_observed += 1
        self._since_decay += 1
        if self._since_decay >= self._half_life:
            self._counts *= 0.5
            self._since_decay = 0
        self._counts[self._bin(gap_s)] += 1.0
        self._survival = None

    def survival(self, t_s: float) -> float | None:
        """P(gap > t_s) (None: too few observations); log-linear within a bin."""
        if self.num_observed < self._min_samples or math.isnan(t_s):
            return None
        if self._survival is None:
            tail = np.concatenate((np.cumsum(self._counts[::-1])[::-1], [0.0]))
            self._survival = tail / tail[0]
            self._horizon = self.horizon_s or self._median() / 2
        if t_s <= self._edges[0]:
            return 1.0
        if t_s >= self._edges[-1]:
            return 0.0
        x = (math.log10(t_s) - self._log_min) * self._per_decade
        i = min(int(x), self._num_bins - 1)
        frac = x - i
        return float(self._survival[i] * (1 - frac) + self._survival[i + 1] * frac)

    def stays_idle(self, age_s: float) -> float | None:
        """P(still idle `horizon` seconds from now | idle for `age_s` so far); None with
        too few observations. Past every observed gap: 1 (nothing says it returns)."""
        now = self.survival(age_s)
        if now is None:
            return None
        if now <= 0.0:
            return 1.0
        later = self.survival(age_s + self._horizon)
        assert later is not None
        return later / now

    def returns_within(self, age_s: float, horizon_s: float) -> float | None:
        """P(the next turn comes within `horizon_s` | idle for `age_s` so far); None with
        too few observations. Past every observed gap: 0 (nothing says it returns)."""
        now = self.survival(age_s)
        if now is None:
            return None
        if now <= 0.0:
            return 0.0
        later = self.survival(age_s + horizon_s)
        assert later is not None
        return 1.0 - later / now

    def _median(self) -> float:
        assert self._survival is not None
        i = int(np.searchsorted(-self._survival, -0.5))  # first edge with survival <= 0.5
        return float(self._edges[min(max(i, 1), self._num_bins)])

    def _bin(self, seconds: float) -> int:
        if seconds <= 0:
            return 0
        b = int((math.log10(seconds) - self._log_min) * self._per_decade)
        return min(max(b, 0), self._num_bins - 1)


class IdleSessions:
    """IDLE pinned sessions, per priority, least recently active first (O(1) updates).

    Sessions a prefetch brought back that have not returned yet are kept apart, in
    landing order, each with the end of its protection (the window its return was
    predicted in): past it they are the first victims (`pick_victim`), whatever their
    priority, tenant or the victim order, since their blocks are still on the host and
    releasing them copies nothing; within it they are the last resort (evictable by
    anyone, but only when no other idle session can go)."""

    def __init__(self) -> None:
        self._by_priority: dict[int, OrderedDict[object, Session]] = {}
        # id -> (session, protected until)
        self._prefetched: OrderedDict[object, tuple[Session, float]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_priority.values()) + len(self._prefetched)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._prefetched or any(
            session_id in d for d in self._by_priority.values()
        )

    @property
    def num_prefetched(self) -> int:
        """Prefetched sessions that have not returned (and are still IDLE)."""
        return len(self._prefetched)

    def prefetched(self) -> Iterator[Session]:
        """The prefetched sessions that have not returned, earliest landed first."""
        return (s for s, _until in self._prefetched.values())

    def add(self, session: Session, *, prefetched_until: float | None = None) -> None:
        """Append as the most recently active of its priority; with `prefetched_until`,
        as the latest landed prefetch, protected until that time (then a first victim)."""
        if prefetched_until is not None:
            self._prefetched[session.session_id] = (session, prefetched_until)
            return
        self._by_priority.setdefault(session.priority, OrderedDict())[session.session_id] = session

    def remove(self, session: Session) -> None:
        self._prefetched.pop(session.session_id, None)
        d = self._by_priority.get(session.priority)
        if d is not None:
            d.pop(session.session_id, None)

    def oldest_first(self) -> Iterator[Session]:
        """Every idle session in victim order: the prefetched ones (landing order), then
        lowest priority first, then least recently active (a snapshot: safe to evict
        while iterating; O(n), for checks and reports)."""
        yield from [s for s, _until in self._prefetched.values()]
        for priority in sorted(self._by_priority):
            yield from list(self._by_priority[priority].values())

    def oldest(self) -> Session | None:
        """The least recently active idle session of any priority (O(priorities +
        prefetched sessions): a prefetched one keeps its old `last_active`)."""
        heads = [next(iter(d.values())) for d in self._by_priority.values() if d]
        heads.extend(s for s, _until in self._prefetched.values())
        return min(heads, key=lambda s: s.last_active, default=None)

    def pick_victim(
        self,
        *,
        max_priority: float,
        exclude: object,
        tenant: str | None,
        over_cap: Mapping[str, bool],
        score: Callable[[Session], float | None] | None = None,
        skip: Callable[[Session], bool] | None = None,
        skip_prefetched: Callable[[Session], bool] | None = None,
        now: float = math.inf,
    ) -> Session | None:
        """The next session to evict, or None.

        First a prefetched session that has not returned and whose protection ended by
        `now` (the earliest landed), of any priority, tenant share or `score`: only
        `exclude`, `tenant` and `skip_prefetched` (not `max_priority`, `over_cap` or
        `skip`) rule one out. Last, when no other session is eligible, a protected one
        (the one whose protection ends first), ruled out the same way. Between them,
        only sessions of priority <= `max_priority` (a requester never evicts a more
        important session); sessions of tenants over their pinned cap first; then lowest
        priority. Within that: with `score` (higher = better victim, e.g. the chance that
        the session stays idle a while longer; None = no opinion), the best-scoring of the
        `VICTIM_CANDIDATES` least and most recently active eligible sessions (ties go to
        the least recently active); without it, or when it has no opinion, the least
        recently active. With `tenant` set, only that tenant's sessions (a tenant at its
        cap makes room from its own sessions). Sessions for which `skip` says True are
        not eligible. Scans from both ends of the recency order
        and stops early, so the cost does not grow with the number of sessions (beyond
        the ones it must skip).
        """
        last_resort: tuple[float, Session] | None = None
        for s, until in self._prefetched.values():
            if s.session_id == exclude or (tenant is not None and s.tenant != tenant):
                continue
            if skip_prefetched is not None and skip_prefetched(s):
                continue
            if until <= now:
                return s
            if last_resort is None or until < last_resort[0]:
                last_resort = (until, s)
        victim = self._pick_pinned(
            max_priority=max_priority, exclude=exclude, tenant=tenant, over_cap=over_cap,
            score=score, skip=skip,
        )  # fmt: skip
        if victim is None and last_resort is not None:
            return last_resort[1]
        return victim

    def _pick_pinned(
        self,
        *,
        max_priority: float,
        exclude: object,
        tenant: str | None,
        over_cap: Mapping[str, bool],
        score: Callable[[Session], float | None] | None,
        skip: Callable[[Session], bool] | None,
    ) -> Session | None:
        """`pick_victim` among the sessions that are not prefetched ones."""
        passes = (True, False) if any(over_cap.values()) else (False,)
        for want_over_cap in passes:
            for priority in sorted(self._by_priority):
                if priority > max_priority:
                    break
                d = self._by_priority[priority]

                def eligible(s: Session, want_over_cap: bool = want_over_cap) -> bool:
                    if s.session_id == exclude or (tenant is not None and s.tenant != tenant):
                        return False
                    if want_over_cap and not over_cap.get(s.tenant, False):
                        return False
                    return skip is None or not skip(s)

                oldest = list(islice(filter(eligible, d.values()), VICTIM_CANDIDATES))
                if not oldest:
                    continue
                if score is None or len(oldest) == 1:
                    return oldest[0]
                newest = islice(filter(eligible, reversed(d.values())), VICTIM_CANDIDATES)
                best, best_score = oldest[0], score(oldest[0])
                if best_score is None:
                    return best
                for s in (*oldest[1:], *newest):
                    value = score(s)
                    if value is not None and value > best_score:
                        best, best_score = s, value
                return best
        return None


def choose_action(*, num_blocks: int, offload_enabled: bool, cost: CostModel) -> Action:
    """Offload when restoring beats recomputing; else drop (the caller then checks that
    the host tier has, or can make, room)."""
    if offload_enabled and cost.restore_is_cheaper(num_blocks):
        return "offload"
    return "drop"
