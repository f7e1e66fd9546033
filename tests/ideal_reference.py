"""An independent, brute-force reference for `Workload.turn_ideal` (O(n^2) in requests).

Written from the rule's definition, sharing no code with the linear implementation:
longest common prefixes by direct comparison of block-key tuples.
"""

from __future__ import annotations

from pagedkv.sim.workload import Workload


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reference_turn_ideal(w: Workload) -> dict[str, list[int]]:
    """Per request: `raw`, `servable`, `own`, `hit` and `shared` in tokens."""
    tpb = w.tokens_per_block
    reqs = w.requests
    full = [r.block_keys[: r.input_len // tpb] for r in reqs]
    out: dict[str, list[int]] = {k: [] for k in ("raw", "servable", "own", "hit", "shared")}
    for i, r in enumerate(reqs):
        cap = (r.input_len - 1) // tpb
        earlier = [_lcp(full[i], full[j]) for j in range(i) if reqs[j].tenant == r.tenant]
        anyone = [
            _lcp(full[i], full[j])
            for j in range(len(reqs))
            if j != i and reqs[j].tenant == r.tenant
        ]
        raw = max(earlier, default=0)
        own = 0
        prev = next(
            (j for j in range(i - 1, -1, -1) if r.session_id is not None
             and reqs[j].session_id == r.session_id),
            None,
        )  # fmt: skip
        if prev is not None and not r.reconnect:
            p = reqs[prev]
            if p.input_len < r.input_len and full[i][: len(full[prev])] == full[prev]:
                own = p.input_len
        servable = min(raw, cap) * tpb
        out["raw"].append(raw * tpb)
        out["servable"].append(servable)
        out["own"].append(own)
        out["hit"].append(max(own, servable))
        out["shared"].append(min(max(anyone, default=0), cap) * tpb)
    return out
