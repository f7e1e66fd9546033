"""The simulator's workload data model: requests as chains of prompt-block identities.

The simulator works at block granularity. A prompt of `input_len` tokens is a chain of
`ceil(input_len / tokens_per_block)` block *identities* (`block_keys`), the last one
possibly covering a partial block. Identities stand in for token content and must be
content-consistent: two prompts of one tenant share their first k identities exactly
when they share their first `k * tokens_per_block` tokens. The simulator hashes identity
chains (as the real prefix index hashes token chains), so a key only ever means
"this block, given everything before it"; keys need not be unique across positions.

Only full blocks are cacheable: a partial last block never hits, whatever its key.

Connections: a session (`session_id`) is one conversation. While its connection stays
open the server may keep its blocks pinned. The connection closes after a request whose
`last_turn` is set (the client is done), and also after the request that precedes a
`reconnect` request of the same session (the socket dropped during the think time; the
client comes back on a new connection presenting its full history). The simulator should
treat a drop as happening right after that preceding turn finished;
`Workload.disconnects_after()` lists, per request, whether its connection closes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

__all__ = [
    "MAX_BLOCK_KEY",
    "Request",
    "TurnIdeal",
    "Workload",
    "WorkloadStats",
    "find_sequence_problems",
    "num_blocks_for",
]

MAX_BLOCK_KEY = 2**63 - 1  # keys fit a signed 64-bit int, so numpy int64 can hold them


def num_blocks_for(input_len: int, tokens_per_block: int) -> int:
    """Number of prompt blocks (the last possibly partial) for `input_len` tokens."""
    return -(-input_len // tokens_per_block)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Request:
    """One model call: a prompt (as block identities) and the number of tokens generated.

    Invariants (checked on construction, `ValueError` naming the field otherwise):
    `arrival_s` finite and >= 0; `input_len >= 1`; `output_len >= 1`; `turn_index >= 1`;
    every key an int in `[0, MAX_BLOCK_KEY]`; a request without a session is a one-shot
    connection (`turn_index == 1`, `last_turn`). That `len(block_keys)` matches
    `input_len` is checked by `Workload`, which knows `tokens_per_block`.

    Attributes:
        arrival_s: absolute arrival time, seconds from the workload start.
        session_id: the conversation it belongs to; None when unknown.
        tenant: tenant name, the hash salt: tenants never share blocks.
        block_keys: identity of each prompt block, in order; the last may be partial.
        input_len: prompt tokens.
        output_len: generated tokens.
        turn_index: 1-based turn number within its session (1 when unknown).
        reconnect: arrives on a new connection that re-sends an existing history.
        last_turn: the client closes the session after this turn; no later request of
            the session follows.
    """

    arrival_s: float
    session_id: str | None
    tenant: str
    block_keys: tuple[int, ...]
    input_len: int
    output_len: int
    turn_index: int = 1
    reconnect: bool = False
    last_turn: bool = True

    def __post_init__(self) -> None:
        t = self.arrival_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"Request.arrival_s must be a finite number >= 0, got {t!r}")
        if self.session_id is not None and (
            not isinstance(self.session_id, str) or not self.session_id
        ):
            raise ValueError(
                f"Request.session_id must be None or a non-empty str, got {self.session_id!r}"
            )
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError(f"Request.tenant must be a non-empty str, got {self.tenant!r}")
        for name, low in (("input_len", 1), ("output_len", 1), ("turn_index", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"Request.{name} must be an int >= {low}, got {value!r}")
        for name in ("reconnect", "last_turn"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"Request.{name} must be a bool, got {value!r}")
        keys = self.block_keys
        if not isinstance(keys, tuple):
            raise ValueError(
                f"Request.block_keys must be a tuple of ints, got {type(keys).__name__}"
            )
        if keys:
            if set(map(type, keys)) != {int}:  # C-speed; bool and numpy ints fail too
                bad = next(k for k in keys if type(k) is not int)
                raise ValueError(f"Request.block_keys must hold ints, got {bad!r}")
            low_key, high_key = min(keys), max(keys)
            if low_key < 0 or high_key > MAX_BLOCK_KEY:
                bad_key = low_key if low_key < 0 else high_key
                raise ValueError(f"Request.block_keys must lie in [0, 2**63 - 1], got {bad_key}")
        if self.session_id is None and (self.turn_index != 1 or not self.last_turn):
            raise ValueError(
                "a Request without a session_id is a one-shot connection: it needs "
                f"turn_index=1 and last_turn=True, got turn_index={self.turn_index}, "
                f"last_turn={self.last_turn}"
            )


class WorkloadStats(NamedTuple):
    """Summary of a workload (see `Workload.stats`)."""

    num_requests: int
    num_sessions: int
    num_tenants: int
    num_reconnects: int
    duration_s: float  # last arrival
    total_input_tokens: int
    total_output_tokens: int
    ideal_hit_tokens: int
    ideal_hit_ratio: float  # ideal_hit_tokens / total_input_tokens


@dataclass(frozen=True, slots=True)
class Workload:
    """A named, time-ordered sequence of requests over one block size.

    Invariants (checked on construction, `ValueError` naming the request otherwise):
    requests are sorted by `arrival_s`; each has `ceil(input_len / tokens_per_block)`
    block keys; within a session the tenant never changes, `turn_index` strictly
    increases, and nothing follows a `last_turn` request.
    """

    name: str
    tokens_per_block: int
    requests: tuple[Request, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Workload.name must be a non-empty str, got {self.name!r}")
        tpb = self.tokens_per_block
        if not _is_int(tpb) or tpb < 1:
            raise ValueError(f"Workload.tokens_per_block must be an int >= 1, got {tpb!r}")
        if not isinstance(self.requests, tuple):
            raise ValueError(
                f"Workload.requests must be a tuple, got {type(self.requests).__name__}"
            )
        for index, message in find_sequence_problems(self.requests, tpb):
            raise ValueError(f"Workload {self.name!r}: requests[{index}]: {message}")

    # -- summaries ---------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def num_sessions(self) -> int:
        """Distinct session ids, plus one per request without a session."""
        ids = {r.session_id for r in self.requests if r.session_id is not None}
        return len(ids) + sum(1 for r in self.requests if r.session_id is None)

    @property
    def total_input_tokens(self) -> int:
        return sum(r.input_len for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def duration_s(self) -> float:
        """Arrival time of the last request (0.0 when empty)."""
        return float(self.requests[-1].arrival_s) if self.requests else 0.0

    def ideal_hit_tokens_per_request(self) -> list[int]:
        """Prompt tokens each request would find cached with infinite memory.

        A request's hit is its longest prefix of *full* blocks whose identity chain
        appeared in any earlier request of the same tenant, in tokens
        (`num_blocks * tokens_per_block`). The partial last block never hits, and a
        request never hits on itself. This is the classic definition (Mooncake's);
        `turn_ideal` adds what a server can serve. Linear time, see `turn_ideal`.
        """
        raw: list[int] = self.turn_ideal().raw.tolist()
        return raw

    def turn_ideal(self) -> TurnIdeal:
        """Per-request ideal reuse under one rule, and the bound no server can pass.

        The rule (what an infinite-memory server that pins every open session serves):
        a turn reuses the longer of (a) what its own open connection holds, when the
        prompt extends it: the previous prompt of the session, partial last block
        included, unless the connection closed in between (`disconnects_after`) or the
        history was rewritten (compaction, an edit, a rewind: then (a) is 0); and (b)
        its longest prefix of full blocks that appeared in an earlier request of its
        tenant, at most `input_len - 1` tokens rounded down to full blocks (the last
        token is always computed, for its logits).

        Cost: linear in requests plus the blocks a request does not share with its
        session's previous request. Prefixes are identified by 128-bit fingerprints
        (two position-mixed rolling sums of the block keys, salted by tenant), so an
        honest workload never collides; a collision could only raise the ideal.
        """
        return _turn_ideal(self)

    def ideal_hit_tokens(self) -> int:
        """Total of `ideal_hit_tokens_per_request()`."""
        return sum(self.ideal_hit_tokens_per_request())

    def ideal_hit_ratio(self) -> float:
        """Token-weighted ideal (infinite-cache) prefix-hit ratio; 0.0 when empty."""
        total = self.total_input_tokens
        return self.ideal_hit_tokens() / total if total else 0.0

    def disconnects_after(self) -> list[bool]:
        """Per request: whether its connection closes once it has finished.

        True when the request is its session's `last_turn`, or when the session's next
        request is a `reconnect` (the connection dropped in between).
        """
        result = [False] * len(self.requests)
        next_reconnect: dict[str, bool] = {}  # session -> is its next request a reconnect
        for i in range(len(self.requests) - 1, -1, -1):
            r = self.requests[i]
            sid = r.session_id
            result[i] = r.last_turn or (sid is not None and next_reconnect.get(sid, False))
            if sid is not None:
                next_reconnect[sid] = r.reconnect
        return result

    def per_request_connections(self) -> Workload:
        """This workload with every follow-up turn on a new connection (`reconnect`):
        HTTP clients that re-send the whole history with each call, so a router places
        every turn anew. The prompts are unchanged."""
        requests = tuple(
            r if r.turn_index == 1 or r.reconnect else replace(r, reconnect=True)
            for r in self.requests
        )
        return Workload(f"{self.name}+per-request", self.tokens_per_block, requests)

    def stats(self) -> WorkloadStats:
        """Counts, token totals and the ideal hit ratio, in one pass over the blocks."""
        total_in = self.total_input_tokens
        hit = self.ideal_hit_tokens()
        return WorkloadStats(
            num_requests=self.num_requests,
            num_sessions=self.num_sessions,
            num_tenants=len({r.tenant for r in self.requests}),
            num_reconnects=sum(1 for r in self.requests if r.reconnect),
            duration_s=self.duration_s,
            total_input_tokens=total_in,
            total_output_tokens=self.total_output_tokens,
            ideal_hit_tokens=hit,
            ideal_hit_ratio=hit / total_in if total_in else 0.0,
        )


def find_sequence_problems(
    requests: tuple[Request, ...] | list[Request], tokens_per_block: int
) -> Iterator[tuple[int, str]]:
    """Yield `(index, message)` for each request that breaks a `Workload` invariant.

    Shared by `Workload.__post_init__` and the trace loaders (which turn the index into
    a line number). Items must already be valid `Request`s.
    """
    prev_arrival = -math.inf
    last_turn_of: dict[str, int] = {}  # session -> turn_index of its latest request
    closed: set[str] = set()
    tenant_of: dict[str, str] = {}
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            yield i, f"must be a Request, got {type(r).__name__}"
            continue
        if r.arrival_s < prev_arrival:
            yield (
                i,
                (
                    f"arrival_s {r.arrival_s} is earlier than the previous request's "
                    f"{prev_arrival}; requests must be sorted by arrival_s"
                ),
            )
        prev_arrival = max(prev_arrival, r.arrival_s)
        expected = num_blocks_for(r.input_len, tokens_per_block)
        if len(r.block_keys) != expected:
            yield (
                i,
                (
                    f"has {len(r.block_keys)} block_keys, expected ceil(input_len "
                    f"{r.input_len} / tokens_per_block {tokens_per_block}) = {expected}"
                ),
            )
        sid = r.session_id
        if sid is None:
            continue
        if sid in closed:
            yield i, f"session {sid!r} already ended with a last_turn request"
        tenant = tenant_of.setdefault(sid, r.tenant)
        if tenant != r.tenant:
            yield i, f"session {sid!r} changes tenant from {tenant!r} to {r.tenant!r}"
        prev_turn = last_turn_of.get(sid)
        if prev_turn is not None and r.turn_index <= prev_turn:
            yield (
                i,
                (
                    f"turn_index {r.turn_index} of session {sid!r} does not increase "
                    f"(previous turn {prev_turn})"
                ),
            )
        last_turn_of[sid] = r.turn_index
        if r.last_turn:
            closed.add(sid)


class TurnIdeal(NamedTuple):
    """Per-request results of `Workload.turn_ideal` (int64 arrays indexed like requests).

    Attributes:
        hit: tokens the ideal server reuses for the request (the per-turn rule).
        raw: its longest prefix of full blocks seen in an earlier request of its tenant,
            in tokens, uncapped (`ideal_hit_tokens_per_request`).
        own: tokens its own open connection holds that the prompt extends (0 when the
            connection closed before it or its history was rewritten).
        shared: its longest prefix of full blocks that any *other* request of its tenant
            also has, earlier or later, capped like `hit` (`input_len - 1` rounded down
            to full blocks): with `own`, the most any replay may serve, whatever order
            its turns ran in.
        servable: `raw` capped like `shared`.
    """

    hit: np.ndarray
    raw: np.ndarray
    own: np.ndarray
    shared: np.ndarray
    servable: np.ndarray


_U64 = np.uint64
_FP_SEEDS = (_U64(0x243F6A8885A308D3), _U64(0x13198A2E03707344))  # two independent sums
_FP_POS = _U64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    out: np.ndarray = x ^ (x >> _U64(31))
    return out


def _block_terms(keys: np.ndarray, start: int, seed: np.uint64) -> np.ndarray:
    """Position-mixed terms of full blocks `start, start+1, ...` (keys uint64)."""
    pos = np.arange(start, start + len(keys), dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(_mix64(keys ^ seed) + pos * _FP_POS)


def _leading_run(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per segment `[starts[k], ends[k])` of `flags`, the length of its leading run of
    True values."""
    falses = np.flatnonzero(~flags)
    k = np.searchsorted(falses, starts)
    first_false = np.append(falses, len(flags))[k]
    out: np.ndarray = np.minimum(first_false, ends) - starts
    return out


def _turn_ideal(workload: Workload) -> TurnIdeal:
    tpb = workload.tokens_per_block
    reqs = workload.requests
    n = len(reqs)
    disconnect = workload.disconnects_after()
    own = np.zeros(n, dtype=np.int64)
    common = np.zeros(n, dtype=np.int64)  # full blocks shared with the session's previous
    common_next = np.zeros(n, dtype=np.int64)  # ... and with the session's next request
    num_full = np.zeros(n, dtype=np.int64)
    # per session: (its latest request, that prompt's full keys, its two fingerprint arrays)
    latest: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
    tenant_salt: dict[str, tuple[np.uint64, np.uint64]] = {}
    new_lo: list[np.ndarray] = []  # fingerprints of the positions a request adds
    new_hi: list[np.ndarray] = []
    seg_len = np.zeros(n, dtype=np.int64)
    for i, r in enumerate(reqs):
        nf = r.input_len // tpb
        num_full[i] = nf
        keys = np.array(r.block_keys[:nf], dtype=np.uint64)
        salt = tenant_salt.get(r.tenant)
        if salt is None:
            digest = hashlib.blake2b(r.tenant.encode("utf-8", "surrogatepass"), digest_size=16)
            lo_salt, hi_salt = np.frombuffer(digest.digest(), dtype="<u8").astype(np.uint64)
            salt = tenant_salt[r.tenant] = (lo_salt, hi_salt)
        sid = r.session_id
        prev = latest.get(sid) if sid is not None else None
        d = 0
        if prev is not None:
            p, pkeys, plo, phi = prev
            m = min(nf, len(pkeys))
            diff = np.flatnonzero(keys[:m] != pkeys[:m])
            d = int(diff[0]) if len(diff) else m
            common[i] = d
            common_next[p] = d
            prompt_p = reqs[p].input_len
            if not disconnect[p] and prompt_p < r.input_len and d == len(pkeys):
                own[i] = prompt_p
            base_lo, base_hi = (plo[d - 1], phi[d - 1]) if d else salt
            head_lo, head_hi = plo[:d], phi[:d]
        else:
            base_lo, base_hi = salt
            head_lo = head_hi = np.empty(0, dtype=np.uint64)
        with np.errstate(over="ignore"):
            lo = base_lo + np.cumsum(_block_terms(keys[d:], d, _FP_SEEDS[0]), dtype=np.uint64)
            hi = base_hi + np.cumsum(_block_terms(keys[d:], d, _FP_SEEDS[1]), dtype=np.uint64)
        new_lo.append(lo)
        new_hi.append(hi)
        seg_len[i] = nf - d
        if sid is not None:
            latest[sid] = (i, keys, np.concatenate((head_lo, lo)), np.concatenate((head_hi, hi)))
    latest.clear()
    lo_all = np.concatenate(new_lo) if new_lo else np.empty(0, dtype=np.uint64)
    hi_all = np.concatenate(new_hi) if new_hi else np.empty(0, dtype=np.uint64)
    del new_lo, new_hi
    owner = np.repeat(np.arange(n, dtype=np.int64), seg_len)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(seg_len[:-1], out=starts[1:])
    ends = starts + seg_len
    # group equal prefixes: the first request holding each, and how many list it
    order = np.lexsort((owner, lo_all, hi_all))
    s_lo, s_hi = lo_all[order], hi_all[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (s_lo[1:] != s_lo[:-1]) | (s_hi[1:] != s_hi[:-1])
    group = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    group_size = np.diff(np.append(group_start, len(order)))
    first_owner = owner[order][group_start]
    g = np.empty(len(order), dtype=np.int64)
    g[order] = group
    earlier = first_owner[g] < owner  # seen in an earlier request
    position = np.arange(len(owner), dtype=np.int64) - starts[owner] + common[owner]
    shared_flag = (group_size[g] >= 2) | (position < common_next[owner])
    raw_blocks = common + _leading_run(earlier, starts, ends)
    shared_blocks = common + _leading_run(shared_flag, starts, ends)
    input_len = np.fromiter((r.input_len for r in reqs), np.int64, n)
    cap = (input_len - 1) // tpb
    raw = raw_blocks * tpb
    servable = np.minimum(raw_blocks, cap) * tpb
    shared = np.minimum(np.maximum(shared_blocks, common_next), cap) * tpb
    return TurnIdeal(
        hit=np.maximum(own, servable), raw=raw, own=own, shared=shared, servable=servable
    )
