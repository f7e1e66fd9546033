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
from dataclasses import dataclass, field
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
    """Draw one session's turns and append `(arrival, session, turn, Request)` to out."""
    tpb = cfg.tokens_per_block
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
    input_lens = system_len + np.cumsum(added)

    # Gap after turn k: tool time within a task, the human before the next task.
    gaps = np.where(np.roll(task_first, -1), human_gaps, tool_times)
    drops[-1] = False  # nothing follows the last turn
    service = input_lens / cfg.nominal_prefill_tokens_per_s + (
        outputs / cfg.nominal_decode_tokens_per_s
    )
    steps = service + gaps + np.where(drops, delays, 0.0)
    arrivals = start_s + np.concatenate(([0.0], np.cumsum(steps[:-1])))

    # Full-block keys of the whole stream: the tenant's inside the system prompt, then ours.
    num_full = int(input_lens[-1]) // tpb
    num_system = min(len(system_keys), num_full)
    full_keys = system_keys[:num_system] + _block_keys(
        _KIND_SESSION, session, np.arange(num_system, num_full), tpb
    )
    partial = input_lens % tpb
    partial_keys = _block_keys(_KIND_SESSION, session, input_lens // tpb, partial)

    session_id = f"s{session}"
    tenant_name = f"t{tenant}"
    input_list = input_lens.tolist()
    reconnects = [False, *drops[:-1].tolist()]
    for k, (arrival, in_len, out_len) in enumerate(
        zip(arrivals.tolist(), input_list, outputs.tolist(), strict=True)
    ):
        keys = tuple(full_keys[: in_len // tpb])
        if partial[k]:
            keys += (partial_keys[k],)
        req = Request(
            arrival_s=arrival,
            session_id=session_id,
            tenant=tenant_name,
            block_keys=keys,
            input_len=in_len,
            output_len=out_len,
            turn_index=k + 1,
            reconnect=reconnects[k],
            last_turn=k == n - 1,
        )
        out.append((arrival, session, k, req))


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
