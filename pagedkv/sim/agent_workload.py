"""Built-in agent-loop workload: coding-agent sessions calling a model 20-40 times per task.

The model (every number is an `AgentWorkloadConfig` option):

- **Sessions** arrive as a Poisson process (`session_rate_per_s`), either a fixed
  `num_sessions` or all arrivals before `duration_s`. A session is one client connection
  of one tenant (uniformly chosen among `num_tenants`) and runs `tasks_per_session`
  tasks back to back on the same conversation, so its context only ever grows.
- **Context stream** of a session (append-only):
  `system prompt | task 1 message | out 1 | tool 1 | out 2 | tool 2 | ... | out n |`
  `task 2 message | out | tool | ...`. Turn k's prompt is everything before `out k`;
  so turn k+1's prompt is turn k's prompt + turn k's output + the next tool output
  (or, at a task boundary, + the next task message).
- **Lengths**: the system prompt (uniform in `system_prompt_len`) is drawn once per
  tenant and shared by all its sessions; task messages uniform in `task_prompt_len`;
  turns per task uniform in `turns_per_task`; tool outputs and model outputs from
  clipped lognormals (`tool_output_len`: heavy-tailed, 50-4,000 tokens; `model_output_len`:
  short, 20-300 tokens).
- **Timing**: turn k+1 arrives at turn k's arrival + a nominal service time + a think
  time. Nominal service = `input_len / nominal_prefill_tokens_per_s +
  output_len / nominal_decode_tokens_per_s` (a server that recomputes the whole prompt,
  so a faster server only lengthens the idle gap). Think time is tool execution within
  a task (`tool_time_s`, median 10 s) and the human between tasks (`human_gap_s`,
  median 2 min, about 18% beyond 5 min). Arrivals are open-loop: the simulator delays a
  turn whose previous turn has not finished.
- **Compaction** (`compact_at_tokens`, off by default): a turn whose prompt would pass
  that many tokens is compacted first, as agent frameworks do: its prompt becomes the
  system prompt + a summary (uniform in `summary_len`) + the new input, in a new block
  stream, so it shares only the system prompt with the history before it; later turns
  append to the compacted stream.
- **Subagents** (`subagent_rate`, off by default): after a turn, with that probability,
  a subagent session (`s<n>.<k>`) starts right when the turn's answer is out: its first
  prompt is that turn's prompt + a task message (it shares the parent's full blocks),
  and it runs its own tool loop (`subagent_turns` turns, tool times as above) beside the
  parent, which goes on without waiting. Both draw from a generator of their own, so
  turning them on leaves every other draw as it was.
- **Dropped connections**: after each turn but the session's last, with probability
  `drop_rate` the connection drops; the next turn arrives `reconnect_delay_s` later than
  it otherwise would, with `reconnect=True`, the same `session_id`, and the full history.

Block identities (ints below 2**63): block j of a session's stream is the tenant's
system-prompt block j when the whole block lies inside the system prompt, otherwise a
session-specific identity. Both are a splitmix64 mix of (kind, owner, j, tokens in the
block), so a partial last block differs from the full block it later becomes, and a full
block's identity never changes. Collisions need two of ~10^7 random 63-bit values to
meet: about 10^-5 for the largest workloads, negligible.

Default size (`AgentWorkloadConfig()`): 100 sessions arriving over about 8 minutes (4
tenants, 1-2 tasks each), 4,389 requests over about 45 minutes, 70M prompt tokens
(4.4M block keys at 16 tokens per block, so budget a few seconds per simulated policy),
a peak of 95 concurrently open sessions, ideal hit ratio 0.968. Generating it takes
about 0.4 s; tests use smaller configs. Scale with `num_sessions`, or
`tokens_per_block` for coarser, cheaper blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeGuard

import numpy as np

from pagedkv.sim.workload import Request, Workload

__all__ = [
    "DEFAULT_NUM_SESSIONS",
    "AgentWorkloadConfig",
    "LogNormalRange",
    "generate_agent_workload",
]

DEFAULT_NUM_SESSIONS = 100

_MASK63 = (1 << 63) - 1
_KIND_SYSTEM = 1  # owner = tenant index
_KIND_SESSION = 2  # owner = session index


@dataclass(frozen=True, slots=True, kw_only=True)
class LogNormalRange:
    """A lognormal distribution given by its median and log-space sigma, clipped to
    `[low, high]`. `sigma=0` gives the constant `median` (clipped)."""

    median: float
    sigma: float
    low: float
    high: float

    def __post_init__(self) -> None:
        for name in ("median", "sigma", "low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LogNormalRange.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"LogNormalRange.{name} must be finite, got {value!r}")
        if self.median <= 0:
            raise ValueError(f"LogNormalRange.median must be > 0, got {self.median!r}")
        if self.sigma < 0:
            raise ValueError(f"LogNormalRange.sigma must be >= 0, got {self.sigma!r}")
        if not 0 <= self.low <= self.high:
            raise ValueError(
                f"LogNormalRange needs 0 <= low <= high, got low={self.low!r}, high={self.high!r}"
            )

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` float64 draws, clipped to `[low, high]`."""
        draws = rng.lognormal(math.log(self.median), self.sigma, size)
        clipped: np.ndarray = np.clip(draws, self.low, self.high)
        return clipped


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentWorkloadConfig:
    """Options of the agent-loop generator (see the module docstring for the model).

    Integer ranges are inclusive `(low, high)` pairs drawn uniformly. Give at most one of
    `num_sessions` and `duration_s` (seconds of session arrivals); with neither,
    `DEFAULT_NUM_SESSIONS` sessions. Raises `ValueError` naming the option on bad values.
    """

    name: str = "agent"
    num_sessions: int | None = None
    duration_s: float | None = None
    session_rate_per_s: float = 0.25
    num_tenants: int = 4
    tasks_per_session: tuple[int, int] = (1, 2)
    system_prompt_len: tuple[int, int] = (2048, 4096)
    task_prompt_len: tuple[int, int] = (50, 500)
    turns_per_task: tuple[int, int] = (20, 40)
    tool_output_len: LogNormalRange = field(
        default=LogNormalRange(median=200.0, sigma=1.2, low=50.0, high=4000.0)
    )
    model_output_len: LogNormalRange = field(
        default=LogNormalRange(median=80.0, sigma=0.8, low=20.0, high=300.0)
    )
    tool_time_s: LogNormalRange = field(
        default=LogNormalRange(median=10.0, sigma=0.8, low=0.5, high=600.0)
    )
    human_gap_s: LogNormalRange = field(
        default=LogNormalRange(median=120.0, sigma=1.0, low=5.0, high=3600.0)
    )
    drop_rate: float = 0.02
    reconnect_delay_s: tuple[float, float] = (1.0, 30.0)
    nominal_prefill_tokens_per_s: float = 20_000.0
    nominal_decode_tokens_per_s: float = 50.0
    compact_at_tokens: int | None = None
    summary_len: tuple[int, int] = (500, 2000)
    subagent_rate: float = 0.0
    subagent_turns: tuple[int, int] = (3, 10)
    tokens_per_block: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _bad("name", self.name, "a non-empty str")
        if self.num_sessions is not None and self.duration_s is not None:
            raise ValueError(
                "AgentWorkloadConfig: give num_sessions or duration_s, not both "
                f"(got num_sessions={self.num_sessions!r}, duration_s={self.duration_s!r})"
            )
        if self.num_sessions is not None:
            _check_int("num_sessions", self.num_sessions, 1)
        if self.duration_s is not None:
            _check_number("duration_s", self.duration_s, positive=True)
        _check_number("session_rate_per_s", self.session_rate_per_s, positive=True)
        _check_int("num_tenants", self.num_tenants, 1)
        _check_int_range("tasks_per_session", self.tasks_per_session, 1)
        _check_int_range("system_prompt_len", self.system_prompt_len, 0)
        _check_int_range("task_prompt_len", self.task_prompt_len, 1)
        _check_int_range("turns_per_task", self.turns_per_task, 1)
        for name in ("tool_output_len", "model_output_len", "tool_time_s", "human_gap_s"):
            value = getattr(self, name)
            if not isinstance(value, LogNormalRange):
                _bad(name, value, "a LogNormalRange")
        if self.model_output_len.low < 1:
            _bad("model_output_len", self.model_output_len, "low >= 1 (a call emits a token)")
        _check_number("drop_rate", self.drop_rate)
        if self.drop_rate > 1:
            _bad("drop_rate", self.drop_rate, "a probability in [0, 1]")
        pair = self.reconnect_delay_s
        if not (isinstance(pair, tuple) and len(pair) == 2) or not all(
            _is_number(x) and 0 <= x < math.inf for x in pair
        ):
            _bad("reconnect_delay_s", pair, "a (low, high) pair of seconds >= 0")
        if pair[0] > pair[1]:
            _bad("reconnect_delay_s", pair, "low <= high")
        _check_number(
            "nominal_prefill_tokens_per_s", self.nominal_prefill_tokens_per_s, positive=True
        )
        _check_number(
            "nominal_decode_tokens_per_s", self.nominal_decode_tokens_per_s, positive=True
        )
        if self.compact_at_tokens is not None:
            _check_int("compact_at_tokens", self.compact_at_tokens, 1)
        _check_int_range("summary_len", self.summary_len, 1)
        _check_number("subagent_rate", self.subagent_rate)
        if self.subagent_rate > 1:
            _bad("subagent_rate", self.subagent_rate, "a probability in [0, 1]")
        _check_int_range("subagent_turns", self.subagent_turns, 1)
        _check_int("tokens_per_block", self.tokens_per_block, 1)
        _check_int("seed", self.seed, 0)

    @property
    def session_limit(self) -> int | None:
        """Number of sessions to generate, or None when `duration_s` bounds them."""
        if self.duration_s is not None:
            return None
        return DEFAULT_NUM_SESSIONS if self.num_sessions is None else self.num_sessions


def generate_agent_workload(config: AgentWorkloadConfig | None = None) -> Workload:
    """Generate the agent-loop workload described by `config` (defaults when None).

    Deterministic: the same config (seed included) gives an identical workload.
    """
    cfg = AgentWorkloadConfig() if config is None else config
    if not isinstance(cfg, AgentWorkloadConfig):
        raise TypeError(f"config must be an AgentWorkloadConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng(cfg.seed)
    tpb = cfg.tokens_per_block

    lo, hi = cfg.system_prompt_len
    system_lens = rng.integers(lo, hi + 1, size=cfg.num_tenants)
    session_starts = _session_starts(cfg, rng)
    tenants = rng.integers(0, cfg.num_tenants, size=len(session_starts))

    # Tenant system-prompt keys, computed once and shared by reference.
    system_keys = [
        _block_keys(_KIND_SYSTEM, t, np.arange(int(n) // tpb), tpb)
        for t, n in enumerate(system_lens)
    ]

    requests: list[tuple[float, int, int, Request]] = []
    for s, (start, tenant) in enumerate(
        zip(session_starts.tolist(), tenants.tolist(), strict=True)
    ):
        _add_session(
            cfg, rng, s, start, tenant, int(system_lens[tenant]), system_keys[tenant], requests
        )
    requests.sort(key=lambda item: item[:3])
    return Workload(
        name=cfg.name, tokens_per_block=tpb, requests=tuple(item[3] for item in requests)
    )


def _session_starts(cfg: AgentWorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    mean_gap = 1.0 / cfg.session_rate_per_s
    limit = cfg.session_limit
    if limit is not None:
        return np.cumsum(rng.exponential(mean_gap, size=limit))
    assert cfg.duration_s is not None
    starts: list[float] = []
    t = 0.0
    while True:
        t += float(rng.exponential(mean_gap))
        if t >= cfg.duration_s:
            return np.asarray(starts, dtype=np.float64)
        starts.append(t)


def _add_session(
    cfg: AgentWorkloadConfig,
    rng: np.random.Generator,
    session: int,
    start_s: float,
    tenant: int,
    system_len: int,
    system_keys: list[int],
    out: list[tuple[float, int, int, Request]],
) -> None:
    """Draw one session's turns (and its subagents') and append `(arrival, session,
    turn, Request)` to out."""
    num_tasks = int(rng.integers(cfg.tasks_per_session[0], cfg.tasks_per_session[1] + 1))
    turns = rng.integers(cfg.turns_per_task[0], cfg.turns_per_task[1] + 1, size=num_tasks)
    task_lens = rng.integers(cfg.task_prompt_len[0], cfg.task_prompt_len[1] + 1, size=num_tasks)
    n = int(turns.sum())  # model calls in the session
    outputs = np.rint(cfg.model_output_len.sample(rng, n)).astype(np.int64)
    tools = np.rint(cfg.tool_output_len.sample(rng, n)).astype(np.int64)
    tool_times = cfg.tool_time_s.sample(rng, n)
    human_gaps = cfg.human_gap_s.sample(rng, n)
    drops = rng.random(n) < cfg.drop_rate
    delays = rng.uniform(cfg.reconnect_delay_s[0], cfg.reconnect_delay_s[1], size=n)

    # task_first[k]: turn k opens a task (its prompt adds a task message, not a tool output)
    task_first = np.zeros(n, dtype=bool)
    task_first[np.concatenate(([0], np.cumsum(turns)[:-1]))] = True
    # added[k]: tokens appended to the stream between turn k-1's prompt and turn k's.
    added = np.where(task_first, 0, tools)  # tools[k] is the output read before turn k
    added[task_first] = task_lens
    added[1:] += outputs[:-1]
    # Gap after turn k: tool time within a task, the human before the next task.
    gaps = np.where(np.roll(task_first, -1), human_gaps, tool_times)
    drops[-1] = False  # nothing follows the last turn
    system = (system_len, system_keys)
    stream = _Stream(cfg, _owner(session, 0), system)
    # the rewrites draw from their own generator, so turning them on leaves every other
    # draw (and, with them off, the whole workload) as it was
    extra = np.random.default_rng((cfg.seed, session))
    _emit_turns(cfg, extra, session, f"s{session}", f"t{tenant}", start_s, system, stream,
                added, outputs, gaps, drops, delays, out)  # fmt: skip


def _owner(session: int, stream: int) -> int:
    """The identity owner of a session's `stream`-th block stream (0: its own; later:
    after a compaction, or a subagent's)."""
    return session | stream << 24


class _Stream:
    """A block stream: the tenant's system prompt, then blocks owned by one stream
    (after a compaction: a summary first), keys drawn lazily as the stream grows."""

    def __init__(
        self,
        cfg: AgentWorkloadConfig,
        owner: int,
        prefix: tuple[int, list[int]] | tuple[int, tuple[int, ...]],
    ) -> None:
        """`prefix`: (tokens, their block keys) the stream starts with: the tenant's
        system prompt, or a subagent's parent prompt (its full blocks are shared)."""
        self.tpb = cfg.tokens_per_block
        self.owner = owner
        self.length = prefix[0]
        self.keys = list(prefix[1][: self.length // self.tpb])

    def prompt(self, length: int) -> tuple[int, ...]:
        """Block keys of the stream's first `length` tokens (the last possibly partial)."""
        full = length // self.tpb
        if full > len(self.keys):
            fresh = np.arange(len(self.keys), full)
            self.keys += _block_keys(_KIND_SESSION, self.owner, fresh, self.tpb)
        keys = tuple(self.keys[:full])
        if length % self.tpb:
            keys += tuple(
                _block_keys(_KIND_SESSION, self.owner, np.array([full]), length % self.tpb)
            )
        return keys


def _emit_turns(
    cfg: AgentWorkloadConfig,
    extra: np.random.Generator,
    session: int,
    session_id: str,
    tenant: str,
    start_s: float,
    system: tuple[int, list[int]],
    stream: _Stream,
    added: np.ndarray,
    outputs: np.ndarray,
    gaps: np.ndarray,
    drops: np.ndarray,
    delays: np.ndarray,
    out: list[tuple[float, int, int, Request]],
    *,
    order: int = 0,
) -> None:
    """Turn k's prompt is the stream so far + `added[k]`; it arrives after turn k-1's
    nominal service and `gaps[k-1]` (+ `delays[k-1]` after a drop). A prompt past
    `compact_at_tokens` is compacted first (a new stream: system prompt + summary), and
    after a turn a subagent may start from its prompt (`subagent_rate`)."""
    n = len(added)
    elapsed = 0.0  # summed like np.cumsum, then offset: arrivals as the vectorised model
    num_streams = 1
    length = stream.length
    for k in range(n):
        length += int(added[k])
        if cfg.compact_at_tokens is not None and length > cfg.compact_at_tokens:
            lo, hi = cfg.summary_len
            summary = int(extra.integers(lo, hi + 1))
            stream = _Stream(cfg, _owner(session, num_streams), system)
            num_streams += 1
            length = stream.length + summary + int(added[k])
        keys = stream.prompt(length)
        arrival = start_s + elapsed
        req = Request(
            arrival_s=arrival,
            session_id=session_id,
            tenant=tenant,
            block_keys=keys,
            input_len=length,
            output_len=int(outputs[k]),
            turn_index=k + 1,
            reconnect=k > 0 and bool(drops[k - 1]),
            last_turn=k == n - 1,
        )
        out.append((arrival, session, order + k, req))
        service = length / cfg.nominal_prefill_tokens_per_s
        service += int(outputs[k]) / cfg.nominal_decode_tokens_per_s
        if k < n - 1 and cfg.subagent_rate > 0 and extra.random() < cfg.subagent_rate:
            _add_subagent(cfg, extra, session, num_streams, tenant, arrival + service,
                          system, (length, keys), out)  # fmt: skip
            num_streams += 1
        elapsed += service + float(gaps[k]) + (float(delays[k]) if drops[k] else 0.0)


def _add_subagent(
    cfg: AgentWorkloadConfig,
    extra: np.random.Generator,
    session: int,
    stream_index: int,
    tenant: str,
    start_s: float,
    system: tuple[int, list[int]],
    parent: tuple[int, tuple[int, ...]],
    out: list[tuple[float, int, int, Request]],
) -> None:
    """A subagent: a new session whose first prompt is the parent's prompt plus its task
    message, running its own tool loop beside the parent (no drops, no compaction)."""
    m = int(extra.integers(cfg.subagent_turns[0], cfg.subagent_turns[1] + 1))
    outputs = np.rint(cfg.model_output_len.sample(extra, m)).astype(np.int64)
    added = np.rint(cfg.tool_output_len.sample(extra, m)).astype(np.int64)
    added[0] = int(extra.integers(cfg.task_prompt_len[0], cfg.task_prompt_len[1] + 1))
    added[1:] += outputs[:-1]
    gaps = cfg.tool_time_s.sample(extra, m)
    stream = _Stream(cfg, _owner(session, stream_index), parent)
    no_drops = np.zeros(m, dtype=bool)
    sub_cfg = replace(cfg, compact_at_tokens=None, subagent_rate=0.0)
    _emit_turns(sub_cfg, extra, session, f"s{session}.{stream_index}", tenant, start_s, system,
                stream, added, outputs, gaps, no_drops, np.zeros(m), out,
                order=stream_index << 20)  # fmt: skip


def _block_keys(kind: int, owner: int, positions: np.ndarray, fill: Any) -> list[int]:
    """63-bit identities mixing (kind, owner, block position, tokens in the block)."""
    base = _splitmix64(np.array([(kind << 40) | owner], dtype=np.uint64))
    h = _splitmix64(base ^ np.asarray(positions, dtype=np.uint64))
    h = _splitmix64(h ^ np.asarray(fill, dtype=np.uint64))
    keys: list[int] = (h & np.uint64(_MASK63)).tolist()
    return keys


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijection."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(name: str, value: object, expected: str) -> NoReturn:
    raise ValueError(f"AgentWorkloadConfig.{name} must be {expected}, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _bad(name, value, f"an int >= {low}")


def _check_number(name: str, value: object, *, positive: bool = False) -> None:
    expected = "a finite number " + ("> 0" if positive else ">= 0")
    if not _is_number(value) or not math.isfinite(value):
        _bad(name, value, expected)
    if value <= 0 if positive else value < 0:
        _bad(name, value, expected)


def _check_int_range(name: str, pair: object, low: int) -> None:
    if not (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        and low <= pair[0] <= pair[1]
    ):
        _bad(name, pair, f"a (low, high) pair of ints with {low} <= low <= high")
