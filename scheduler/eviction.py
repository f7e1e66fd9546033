"""Victim choice: which idle session makes room, and whether it is offloaded or dropped."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Literal

from scheduler.cost import CostModel
from scheduler.session import Session

Action = Literal["offload", "drop"]


class IdleSessions:
    """IDLE pinned sessions, per priority, least recently active first (O(1) updates)."""

    def __init__(self) -> None:
        self._by_priority: dict[int, OrderedDict[object, Session]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_priority.values())

    def __contains__(self, session_id: object) -> bool:
        return any(session_id in d for d in self._by_priority.values())

    def add(self, session: Session) -> None:
        """Append as the most recently active of its priority."""
        self._by_priority.setdefault(session.priority, OrderedDict())[session.session_id] = session

    def remove(self, session: Session) -> None:
        d = self._by_priority.get(session.priority)
        if d is not None:
            d.pop(session.session_id, None)

    def oldest_first(self) -> Iterator[Session]:
        """Every idle session: lowest priority first, then least recently active (a
        snapshot: safe to evict while iterating; O(n), for checks and reports)."""
        for priority in sorted(self._by_priority):
            yield from list(self._by_priority[priority].values())

    def oldest(self) -> Session | None:
        """The least recently active idle session of any priority (O(priorities))."""
        heads = [next(iter(d.values())) for d in self._by_priority.values() if d]
        return min(heads, key=lambda s: s.last_active, default=None)

    def pick_victim(
        self,
        *,
        max_priority: float,
        exclude: object,
        tenant: str | None,
        over_cap: Mapping[str, bool],
    ) -> Session | None:
        """The next session to evict, or None.

        Only sessions of priority <= `max_priority` (a requester never evicts a more
        important session); sessions of tenants over their pinned cap first; then lowest
        priority, least recently active. With `tenant` set, only that tenant's sessions
        (a tenant at its cap makes room from its own sessions). Scans from the LRU end and
        stops at the first match, so the cost does not grow with the number of sessions
        (beyond the ones it must skip).
        """
        passes = (True, False) if any(over_cap.values()) else (False,)
        for want_over_cap in passes:
            for priority in sorted(self._by_priority):
                if priority > max_priority:
                    break
                for s in self._by_priority[priority].values():
                    if s.session_id == exclude or (tenant is not None and s.tenant != tenant):
                        continue
                    if want_over_cap and not over_cap.get(s.tenant, False):
                        continue
                    return s
        return None


def choose_action(*, num_blocks: int, offload_enabled: bool, cost: CostModel) -> Action:
    """Offload when restoring beats recomputing; else drop (the caller then checks that
    the host tier has, or can make, room)."""
    if offload_enabled and cost.restore_is_cheaper(num_blocks):
        return "offload"
    return "drop"
