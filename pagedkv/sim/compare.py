"""Run several policies (and a GPU-memory sweep) on one workload, optionally in parallel.

Policies are independent replays, so they run in worker processes when `jobs > 1`
(forked: the workload and its synthesised tokens are shared copy-on-write, and only the
per-turn arrays come back). Results are identical whatever `jobs` is.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pagedkv.scheduler.cost import CostModel
from pagedkv.sim.cluster import ClusterSpec
from pagedkv.sim.policies import (
    HardwareProfile,
    Policy,
    SimSettings,
    default_pinned_cap,
    ideal_gpu_blocks,
)
from pagedkv.sim.simulator import DONE, PolicyRun, replay
from pagedkv.sim.tokens import PromptTokens
from pagedkv.sim.workload import Workload

__all__ = [
    "Job",
    "ReplayError",
    "WorkloadFacts",
    "default_workers",
    "gpu_sweep_sizes",
    "main_jobs",
    "peak_open",
    "run_jobs",
    "sweep_jobs",
    "workload_facts",
]


# nominal service time of a request when sizing the peak open KV (agent generator's)
NOMINAL_PREFILL_TOKENS_PER_S = 20_000.0
NOMINAL_DECODE_TOKENS_PER_S = 50.0


@dataclass(frozen=True, slots=True)
class WorkloadFacts:
    """What the report needs to know about a workload, computed once.

    Attributes:
        ideal_hit_tokens: the per-turn ideal (`Workload.turn_ideal().hit`, summed): each
            turn reuses the longer of what its own open connection holds (partial last
            block included) and its longest prefix of full blocks seen earlier, at most
            `input_len - 1` tokens (the last token is computed for its logits). The
            ideal policy (infinite GPU, every session pinned) reaches exactly this when
            its turns run in arrival order.
        prefix_ideal_hit_tokens: the classic infinite-cache figure
            (`Workload.ideal_hit_tokens()`: full blocks seen earlier, uncapped), the one
            published trace studies quote.
        peak_open_tokens: largest sum over open connections of their latest prompt
            length: the KV that pinning every open session would hold (shared system
            prompts counted per session). A connection opens at its first request and
            closes after the request `Workload.disconnects_after()` marks, at that
            request's arrival plus a nominal service time (the agent generator's:
            prompt / 20,000 tokens/s + output / 50 tokens/s, whatever the profile, so
            the size a fraction of it gives does not move with --gpu-tflops), so
            one-request connections (Mooncake) count while they are in flight.
        peak_open_sessions: most sessions open at once.
        ideal_prefill_s: seconds of prefill the ideal policy needs in all (each request
            computes its prompt less its ideal hit), when a cost model was given:
            against `duration_s`, the GPU load no policy can go below.
        own_tokens, shared_tokens: per request, `turn_ideal().own` and `.shared`: the
            most any replay may serve it (see `check_hits`).
    """

    name: str
    num_requests: int
    num_sessions: int
    tokens_per_block: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float
    mean_input_len: float
    ideal_hit_tokens: int
    prefix_ideal_hit_tokens: int
    peak_open_tokens: int
    peak_open_sessions: int
    ideal_prefill_s: float | None = None
    own_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)
    shared_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)
    workload: Workload | None = field(default=None, repr=False, compare=False)

    def check_hits(self, run: PolicyRun) -> None:
        """Fail loudly when a replay served a request more than any cache could.

        The bound per request is the larger of what it shares with any other request of
        its tenant (full blocks, capped like the ideal; `turn_ideal().shared`, which
        holds whatever order a policy's turns ran in) and what its session holds when
        the prompt extends it (`own`; when the session's previous turns were refused,
        the latest one that ran on the same connection). A violation means stale KV was
        served for tokens that changed: a simulator or scheduler bug, never a good
        result.

        Raises:
            AssertionError: naming the policy, the first offending requests and the
                numbers.
        """
        if self.own_tokens is None or self.shared_tokens is None:
            return
        t = run.turns
        hits = t.hit_pinned + t.hit_gpu + t.hit_host
        bound = np.maximum(self.own_tokens, self.shared_tokens)
        suspects = np.flatnonzero((t.status == DONE) & (hits > bound)).tolist()
        bad = [i for i in suspects if hits[i] > self._held_after_refusals(run, i)]
        if bad:
            shown = ", ".join(f"#{i}: {int(hits[i])} > {int(bound[i])}" for i in bad[:5])
            raise AssertionError(
                f"policy {run.policy.name!r} served more cached tokens than the prompt "
                f"shares with anything else on {len(bad)} requests ({shown})"
            )

    def _held_after_refusals(self, run: PolicyRun, i: int) -> int:
        """What request `i`'s session may hold when turns before it were refused: the
        prompt of the latest earlier turn that ran on the same connection, if `i`
        extends it (else 0)."""
        w = self.workload
        if w is None:
            return 0
        reqs, tpb, status = w.requests, w.tokens_per_block, run.turns.status
        r = reqs[i]
        if r.session_id is None or r.reconnect:
            return 0
        closes = w.disconnects_after()
        for j in range(i - 1, -1, -1):
            q = reqs[j]
            if q.session_id != r.session_id:
                continue
            if closes[j]:
                return 0
            if status[j] == DONE:
                full = q.input_len // tpb
                extends = q.input_len < r.input_len and r.block_keys[:full] == q.block_keys[:full]
                return q.input_len if extends else 0
        return 0

    @property
    def ideal_hit_ratio(self) -> float:
        return self.ideal_hit_tokens / self.total_input_tokens if self.total_input_tokens else 0.0

    @property
    def prefix_ideal_hit_ratio(self) -> float:
        total = self.total_input_tokens
        return self.prefix_ideal_hit_tokens / total if total else 0.0


def workload_facts(workload: Workload, *, cost: CostModel | None = None) -> WorkloadFacts:
    """Compute `WorkloadFacts` (`Workload.turn_ideal`: linear in the blocks)."""
    ideal = workload.turn_ideal()
    ideal_prefill_s = None
    if cost is not None:
        ideal_prefill_s = sum(
            cost.prefill_s(r.input_len - h, h)
            for h, r in zip(ideal.hit.tolist(), workload.requests, strict=True)
        )
    peak, peak_sessions = peak_open(workload)
    n = workload.num_requests
    return WorkloadFacts(
        name=workload.name,
        num_requests=n,
        num_sessions=workload.num_sessions,
        tokens_per_block=workload.tokens_per_block,
        total_input_tokens=workload.total_input_tokens,
        total_output_tokens=workload.total_output_tokens,
        duration_s=workload.duration_s,
        mean_input_len=workload.total_input_tokens / n if n else 0.0,
        ideal_hit_tokens=int(ideal.hit.sum()),
        prefix_ideal_hit_tokens=int(ideal.raw.sum()),
        peak_open_tokens=peak,
        peak_open_sessions=peak_sessions,
        ideal_prefill_s=ideal_prefill_s,
        own_tokens=ideal.own,
        shared_tokens=ideal.shared,
        workload=workload,
    )


def peak_open(workload: Workload) -> tuple[int, int]:
    """(peak open tokens, peak open connections); see `WorkloadFacts`."""
    # events: (time, order, key, new size or -1 for a close); at equal times a close
    # comes after an arrival, so back-to-back connections briefly overlap (conservative)
    events: list[tuple[float, int, str, int]] = []
    num_closed: dict[str, int] = {}  # session -> connections closed so far
    for i, (r, closes) in enumerate(
        zip(workload.requests, workload.disconnects_after(), strict=True)
    ):
        sid = r.session_id if r.session_id is not None else f"#{i}"
        key = f"{sid}/{num_closed.get(sid, 0)}"  # one key per connection
        events.append((r.arrival_s, 2 * i, key, r.input_len))
        if closes:
            num_closed[sid] = num_closed.get(sid, 0) + 1
            service = r.input_len / NOMINAL_PREFILL_TOKENS_PER_S
            service += r.output_len / NOMINAL_DECODE_TOKENS_PER_S
            events.append((r.arrival_s + service, 2 * i + 1, key, -1))
    events.sort()
    open_len: dict[str, int] = {}
    total = peak = peak_sessions = 0
    for _t, _order, key, size in events:
        if size < 0:
            total -= open_len.pop(key)
            continue
        total += size - open_len.get(key, 0)
        open_len[key] = size
        peak = max(peak, total)
        peak_sessions = max(peak_sessions, len(open_len))
    return peak, peak_sessions


@dataclass(frozen=True, slots=True)
class Job:
    """One replay: a policy at one GPU size. `sweep` jobs only feed the sweep plot;
    `cluster` replays on replicas behind a router; `profile` overrides the run's."""

    policy: Policy
    settings: SimSettings
    gpu_blocks: int
    sweep: bool = False
    cluster: ClusterSpec | None = None
    profile: HardwareProfile | None = None


def main_jobs(
    policies: Sequence[Policy], settings: SimSettings, workload: Workload, facts: WorkloadFacts
) -> list[Job]:
    """One job per policy at `settings.gpu_blocks` (the ideal gets its unbounded pool)."""
    ideal_blocks = ideal_gpu_blocks(
        workload, facts.prefix_ideal_hit_tokens, high_watermark=settings.high_watermark
    )
    return [
        Job(p, settings, max(ideal_blocks, settings.gpu_blocks) if p.infinite_gpu else 0)
        for p in policies
    ]


def sweep_jobs(
    policies: Sequence[Policy],
    settings: SimSettings,
    workload: Workload,
    gpu_blocks: Sequence[int],
    *,
    fixed_cap: bool,
) -> list[Job]:
    """Jobs for hit ratio vs GPU memory: every policy whose result depends on the GPU size
    (not the ideal, not stateless) at each size; the pinned cap follows the size unless
    the user fixed it."""
    jobs = []
    for blocks in gpu_blocks:
        cap = (
            settings.max_pinned_sessions
            if fixed_cap
            else default_pinned_cap(workload, blocks, high_watermark=settings.high_watermark)
        )
        sized = replace(settings, gpu_blocks=blocks, max_pinned_sessions=cap)
        jobs += [
            Job(p, sized, 0, sweep=True) for p in policies if p.reuse_prefix and not p.infinite_gpu
        ]
    return jobs


# Shared with forked workers (set just before the pool starts; read-only afterwards).
_SHARED: dict[str, Any] = {}


class ReplayError(RuntimeError):
    """A replay failed in a worker process; the message carries its traceback (the
    original exception may not survive pickling back to the parent)."""


def _run_job(index: int) -> PolicyRun:
    job: Job = _SHARED["jobs"][index]
    try:
        return _replay_job(job)
    except Exception as exc:
        raise ReplayError(
            f"policy {job.policy.name!r}"
            + (f" routed by {job.cluster.routing.name!r}" if job.cluster is not None else "")
            + f" at {job.settings.gpu_blocks} GPU blocks failed in a "
            f"worker:\n{''.join(traceback.format_exception(exc))}"
        ) from None


def _replay_job(job: Job) -> PolicyRun:
    counter = _SHARED.get("counter")

    def report(n: int) -> None:
        if counter is not None:
            with counter.get_lock():
                counter.value += n

    return replay(
        _SHARED["workload"],
        job.policy,
        job.settings,
        job.profile or _SHARED["profile"],
        tokens=_SHARED["tokens"],
        gpu_blocks=job.gpu_blocks or None,
        check_every=_SHARED["check_every"],
        on_progress=report,
        cluster=job.cluster,
    )


def run_jobs(
    workload: Workload,
    jobs: Sequence[Job],
    profile: HardwareProfile,
    *,
    num_workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
    check_every: int = 0,
) -> list[PolicyRun]:
    """Replay every job; results in job order.

    Args:
        num_workers: processes to use (1: in this process). Needs the `fork` start
            method; without it the jobs run here one after another.
        on_progress: called with the number of requests finished since the last call
            (summed over jobs; the total is `len(jobs) * workload.num_requests`).
        check_every: see `simulator.replay`.
    """
    tokens = PromptTokens(workload)
    _SHARED.update(
        workload=workload, tokens=tokens, profile=profile, jobs=list(jobs), check_every=check_every
    )
    try:
        workers = min(num_workers, len(jobs))
        if workers <= 1 or "fork" not in mp.get_all_start_methods():
            _SHARED["counter"] = None
            out = []
            for i in range(len(jobs)):
                run = replay(
                    workload,
                    jobs[i].policy,
                    jobs[i].settings,
                    jobs[i].profile or profile,
                    tokens=tokens,
                    gpu_blocks=jobs[i].gpu_blocks or None,
                    check_every=check_every,
                    on_progress=on_progress,
                    cluster=jobs[i].cluster,
                )
                out.append(run)
            return out
        return _run_parallel(len(jobs), workers, on_progress)
    finally:
        _SHARED.clear()


def _run_parallel(
    num_jobs: int, workers: int, on_progress: Callable[[int], None] | None
) -> list[PolicyRun]:
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    _SHARED["counter"] = counter
    seen = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures: dict[Future[PolicyRun], int] = {
            pool.submit(_run_job, i): i for i in range(num_jobs)
        }
        pending = set(futures)
        while pending:
            _done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            if on_progress is not None:
                value = int(counter.value)
                if value > seen:
                    on_progress(value - seen)
                    seen = value
        results = {futures[f]: f.result() for f in futures}
    return [results[i] for i in range(num_jobs)]


def default_workers(num_jobs: int) -> int:
    """Worker processes for `num_jobs` replays: one per CPU this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(num_jobs, cpus))


def gpu_sweep_sizes(center_blocks: int, peak_blocks: int, num: int = 5) -> list[int]:
    """GPU sizes for the sweep: `num` sizes, geometric, from an eighth of the run's GPU
    up to the peak open-session KV (at least twice the run's size)."""
    low = max(1, center_blocks // 8)
    high = max(2 * center_blocks, peak_blocks)
    if num <= 1:
        return [center_blocks]
    sizes = np.geomspace(low, high, num)
    return sorted({max(1, math.floor(x)) for x in sizes} | {center_blocks})
