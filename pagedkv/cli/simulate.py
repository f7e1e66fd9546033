"""`pagedkv simulate`: replay a workload under several KV-cache policies and compare them.

See docs/simulator.md for the model behind the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pagedkv.cli.main import UsageError

DESCRIPTION = """\
Replay a workload (the built-in agent-loop generator, or a trace file) through the
session scheduler on a virtual clock and a metadata-only KV pool, once per policy, and
print per policy: token hit ratio by tier (own pinned blocks, GPU hash cache, host tier)
and against the infinite-memory ideal, prefilled tokens, bytes offloaded and restored,
modelled time to first token (p50/p90/p99, and by turn index), admission waits and
refusals, and peak GPU/host blocks in use.

Policies: stateless (no reuse), prefix (content-hash LRU over GPU memory, as vLLM and
SGLang), prefix+host (the same with a host tier written through at turn end, as LMCache
and SGLang HiCache), ours (pinned sessions with an admission cap, cost-aware idle offload
and hash fallback on reconnect), pinned (ours without a host tier) and ideal (infinite
GPU memory).

With --replicas N it replays on N replicas behind a router instead, and compares routing
policies: round-robin, affinity (consistent hashing on the conversation), kv-aware (the
replica with the longest cached prefix) and ours (kv-aware within bounded loads, with a
shared remote KV tier), against one pooled replica with N times everything.

The default profile is Llama-3-8B (128 KiB of KV per token) on an 80 GB GPU (64 GB left
for KV after the weights) with 256 GB of host memory for KV."""

EPILOG = """\
examples:
  pagedkv simulate                                   # default agent workload, 5 policies
  pagedkv simulate --gpu-fraction-of-peak 0.25 --json out.json --plot out.png
  pagedkv simulate --trace ../shared/traces/mooncake/conversation_trace.jsonl \\
      --gpu-kv-gb 393 --gpu-tflops 3200 --policies prefix,ideal
  pagedkv simulate --sessions 20 --sweep 6 --plot sweep.png
  pagedkv simulate --compact-at 30000 --subagent-rate 0.05 --tokens-per-block 64
  pagedkv simulate --replicas 4                      # 4 replicas, every routing policy
  pagedkv simulate --replicas 4 --per-request-connections --remote all"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a probability in [0, 1], got {text!r}"
        ) from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


_TTL_OFF = -1.0
# --replicas defaults: the agent workload's size and block size, and the GPU memory
# (a fraction of the workload's peak open-session KV, over all replicas together)
CLUSTER_SESSIONS_PER_REPLICA = 40
CLUSTER_TOKENS_PER_BLOCK = 64
CLUSTER_FRACTION_OF_PEAK = 0.25
_CLUSTER_DEFAULTS = {
    "routing": "all",
    "remote": "ours",
    "remote_gb": 2000.0,
    "remote_gbps": 10.0,
    "remote_latency_us": 300.0,
}


def _ttl(text: str) -> float:
    if text.lower() in ("off", "none"):
        return _TTL_OFF
    return _non_negative_float(text)


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 100], got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `simulate` on the `pagedkv` subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="compare KV-cache policies on a workload (virtual clock, no GPU needed)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--trace",
        metavar="PATH",
        help="replay a trace file instead of the built-in agent workload: our JSONL format "
        "(docs/trace_format.md) or a Mooncake FAST'25 trace (detected by 'hash_ids'); "
        ".gz is read compressed",
    )
    w.add_argument(
        "--sessions",
        type=_int_at_least(1),
        metavar="N",
        help="agent workload: number of sessions (default 100: ~4,400 requests, 70M "
        "prompt tokens over ~45 min)",
    )
    w.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="agent workload seed (default 0)"
    )
    w.add_argument(
        "--tokens-per-block",
        type=_int_at_least(1),
        metavar="N",
        help="agent workload: block size in tokens (default 16; 64 is 4x cheaper to replay)",
    )
    w.add_argument(
        "--compact-at",
        type=_int_at_least(1),
        metavar="TOKENS",
        help="agent workload: compact a session's history (system prompt + summary) when "
        "a prompt would pass TOKENS (default: never)",
    )
    w.add_argument(
        "--subagent-rate",
        type=_probability,
        metavar="P",
        help="agent workload: probability that a turn starts a subagent session from its "
        "prompt (default 0)",
    )
    m = p.add_argument_group("memory and hardware")
    size = m.add_mutually_exclusive_group()
    size.add_argument(
        "--gpu-kv-gb",
        type=_positive_float,
        metavar="GB",
        help="GPU memory for KV, in GB (default: the profile's 80 GB GPU minus 16 GB of "
        "weights = 64 GB)",
    )
    size.add_argument(
        "--gpu-fraction-of-peak",
        type=_fraction,
        metavar="F",
        help="size the GPU KV memory as this fraction of the workload's peak open-session "
        "KV (e.g. 0.25: room for a quarter of what pinning every open session would hold)",
    )
    m.add_argument(
        "--host-gb",
        type=_non_negative_float,
        default=256.0,
        metavar="GB",
        help="host memory for the KV host tier, in GB (default 256; 0: no host tier)",
    )
    m.add_argument(
        "--gpu-tflops",
        type=_positive_float,
        default=400.0,
        metavar="T",
        help="sustained prefill TFLOP/s of the modelled GPU (default 400, one H100 on an "
        "8B model; raise it to model tensor parallelism across GPUs)",
    )
    m.add_argument(
        "--link-gbps",
        type=_positive_float,
        default=25.0,
        metavar="GB/s",
        help="GPU <-> host copy bandwidth per direction, in GB/s (default 25)",
    )
    s = p.add_argument_group("policies")
    s.add_argument(
        "--policies",
        metavar="LIST",
        help="comma-separated policies to compare: stateless, prefix, prefix+host, ours, "
        "pinned, ideal, or 'all' (default: all but pinned); with --replicas, the one "
        "policy every replica runs (default ours)",
    )
    s.add_argument(
        "--max-pinned",
        type=_int_at_least(1),
        metavar="N",
        help="pinned-session cap of ours/pinned (default: twice the sessions that fit in "
        "0.95 of the GPU KV at the workload's mean prompt length)",
    )
    s.add_argument(
        "--idle-ttl",
        type=_ttl,
        metavar="S",
        help="ours: offload a session idle this many seconds ahead of need; 'off' to "
        "offload only under pressure (default 45)",
    )
    w.add_argument(
        "--per-request-connections",
        action="store_true",
        help="every follow-up turn arrives on a new connection (HTTP clients re-sending "
        "the history), so the server, or the router, meets every turn anew",
    )
    c = p.add_argument_group(
        "replicas (compare routing policies over N servers; sizes are per replica)"
    )
    c.add_argument(
        "--replicas",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="replay on N replicas behind a router (default 1: one server). With N > 1 "
        "the agent workload defaults to 40*N sessions at 64 tokens/block and the GPU to a "
        "quarter of the peak open-session KV across all replicas",
    )
    c.add_argument(
        "--routing",
        default="all",
        metavar="LIST",
        help="routing policies to compare: round-robin, affinity, kv-aware, ours, or 'all' "
        "(default); a pooled replica with N times everything is always the reference",
    )
    c.add_argument(
        "--remote",
        choices=("ours", "all", "none"),
        default="ours",
        help="which routing policies get the shared remote KV tier (default: ours)",
    )
    c.add_argument(
        "--remote-gb",
        type=_positive_float,
        default=2000.0,
        metavar="GB",
        help="remote tier memory (Redis maxmemory over the cluster), in GB (default 2000)",
    )
    c.add_argument(
        "--remote-gbps",
        type=_positive_float,
        default=10.0,
        metavar="GB/s",
        help="remote tier bandwidth per replica and direction, in GB/s (default 10)",
    )
    c.add_argument(
        "--remote-latency-us",
        type=_non_negative_float,
        default=300.0,
        metavar="US",
        help="remote tier round trip, in microseconds (default 300)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    o.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG: hit ratio vs GPU memory per policy, and p50 TTFT by turn index "
        "(needs matplotlib: pip install 'pagedkv[sim]')",
    )
    o.add_argument(
        "--sweep",
        type=_int_at_least(2),
        nargs="?",
        const=5,
        metavar="N",
        help="also replay the cache policies at N GPU sizes (default 5, from 1/8 of the GPU "
        "size to the peak open-session KV) for the hit-ratio-vs-memory curve; without it "
        "the plot shows the one size",
    )
    o.add_argument(
        "--jobs",
        type=_int_at_least(1),
        metavar="N",
        help="worker processes (default: one per CPU, at most one per replay)",
    )
    o.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it appears on stderr, for runs longer than 2 s, on a terminal)",
    )
    return p


def _check_output(path: str | None, what: str) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path!r}: directory {parent!r} does not exist")


def run(args: argparse.Namespace) -> int:
    """Run `pagedkv simulate`; returns the exit status."""
    from pagedkv.sim.policies import DEFAULT_IDLE_TTL_S, DEFAULT_POLICIES, parse_policies

    if args.replicas > 1:
        return _simulate_cluster(args)
    for flag in ("routing", "remote", "remote_gb", "remote_gbps", "remote_latency_us"):
        if getattr(args, flag) != _CLUSTER_DEFAULTS[flag]:
            raise UsageError(f"--{flag.replace('_', '-')} needs --replicas N with N > 1")
    try:
        policies = parse_policies(args.policies or ",".join(DEFAULT_POLICIES))
    except ValueError as err:
        raise UsageError(f"--policies: {err}") from None
    if args.trace is not None:
        for flag in ("sessions", "tokens_per_block", "compact_at", "subagent_rate"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                raise UsageError(f"{name} shapes the built-in agent workload; drop it with --trace")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'pagedkv[sim]'"
        )
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot")
    idle_ttl: float | None = DEFAULT_IDLE_TTL_S if args.idle_ttl is None else args.idle_ttl
    if idle_ttl == _TTL_OFF:
        idle_ttl = None
    return _simulate(args, policies, idle_ttl)


def _load_workload(args: argparse.Namespace) -> tuple[Any, int | None]:
    """The workload, and the peak open-session KV memory flags size against when it
    is not the workload's own (`--per-request-connections`: the conversations' peak,
    before each turn got its own connection)."""
    from pagedkv.sim.agent_workload import AgentWorkloadConfig, generate_agent_workload
    from pagedkv.sim.traces import TraceFormatError, load_workload

    if args.trace is None:
        extra: dict[str, Any] = {}
        if args.tokens_per_block is not None:
            extra["tokens_per_block"] = args.tokens_per_block
        if args.subagent_rate is not None:
            extra["subagent_rate"] = args.subagent_rate
        workload = generate_agent_workload(
            AgentWorkloadConfig(
                num_sessions=args.sessions,
                seed=args.seed,
                compact_at_tokens=args.compact_at,
                **extra,
            )
        )
    else:
        try:
            workload = load_workload(args.trace)
        except TraceFormatError as err:
            raise UsageError(str(err)) from None
        except OSError as err:
            raise UsageError(f"cannot read trace {args.trace!r}: {err.strerror or err}") from None
    if args.per_request_connections:
        from pagedkv.sim.compare import peak_open

        return workload.per_request_connections(), peak_open(workload)[0]
    return workload, None


def _simulate(args: argparse.Namespace, policies: Any, idle_ttl: float | None) -> int:
    from dataclasses import asdict, replace

    from pagedkv.sim.compare import (
        default_workers,
        gpu_sweep_sizes,
        main_jobs,
        run_jobs,
        sweep_jobs,
        workload_facts,
    )
    from pagedkv.sim.policies import HardwareProfile, SimSettings, default_pinned_cap
    from pagedkv.sim.report import build_report, format_tables, plot_report, write_json

    t0 = time.perf_counter()
    profile = HardwareProfile(
        gpu_flops=args.gpu_tflops * 1e12, host_link_bytes_per_s=args.link_gbps * 1e9
    )
    workload, sizing_peak = _load_workload(args)
    cost = profile.cost_model(workload.tokens_per_block)
    facts = workload_facts(workload, cost=cost)
    if sizing_peak is not None:
        facts = replace(facts, peak_open_tokens=sizing_peak)
    tpb = workload.tokens_per_block
    block_bytes = profile.kv_bytes_per_token * tpb
    gpu_blocks = _gpu_blocks(args, profile, facts, tpb)
    host_blocks = int(args.host_gb * 1e9 // block_bytes)
    cap = args.max_pinned or default_pinned_cap(workload, gpu_blocks, high_watermark=0.95)
    settings = SimSettings(
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        max_pinned_sessions=cap,
        idle_ttl_s=idle_ttl,
    )
    jobs = main_jobs(policies, settings, workload, facts)
    num_main = len(jobs)
    if args.sweep:
        peak_blocks = -(-facts.peak_open_tokens // tpb)
        sizes = [b for b in gpu_sweep_sizes(gpu_blocks, peak_blocks, args.sweep) if b != gpu_blocks]
        jobs += sweep_jobs(
            policies, settings, workload, sizes, fixed_cap=args.max_pinned is not None
        )
    if facts.ideal_prefill_s is not None and facts.duration_s > 0:
        load = facts.ideal_prefill_s / facts.duration_s
        if load > 0.9:
            print(
                f"note: even the ideal policy needs {facts.ideal_prefill_s:,.0f} s of prefill "
                f"for a {facts.duration_s:,.0f} s workload (GPU load {load:.2f}); queues grow "
                "and TTFTs measure the backlog (raise --gpu-tflops)",
                file=sys.stderr,
            )
    workers = args.jobs or default_workers(len(jobs))
    bar = _progress_bar(len(jobs) * workload.num_requests, enabled=not args.no_progress)
    try:
        runs = run_jobs(
            workload,
            jobs,
            profile,
            num_workers=workers,
            on_progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    settings_out = {
        **asdict(settings),
        "gpu_kv_gb": round(gpu_blocks * block_bytes / 1e9, 3),
        "host_gb": round(host_blocks * block_bytes / 1e9, 3),
        "gpu_fraction_of_peak": round(gpu_blocks * tpb / max(1, facts.peak_open_tokens), 4),
        "kv_bytes_per_token": profile.kv_bytes_per_token,
        "block_size": tpb,
        "trace": args.trace,
        "seed": None if args.trace else args.seed,
        "workers": workers,
    }
    report = build_report(
        facts=facts,
        profile=asdict(profile),
        settings=settings_out,
        runs=runs[:num_main],
        sweep=[*runs[num_main:], *(r for r in runs[:num_main] if _varies_with_gpu(r.policy))]
        if args.sweep
        else (),
        wall_s=time.perf_counter() - t0,
    )
    print(format_tables(report), flush=True)
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _gpu_blocks(args: argparse.Namespace, profile: Any, facts: Any, tpb: int) -> int:
    """GPU KV blocks (per replica) from the memory flags."""
    block_bytes = profile.kv_bytes_per_token * tpb
    replicas = args.replicas
    if args.gpu_kv_gb is not None:
        gpu_blocks = int(args.gpu_kv_gb * 1e9 // block_bytes)
    elif args.gpu_fraction_of_peak is not None or replicas > 1:
        fraction = args.gpu_fraction_of_peak or CLUSTER_FRACTION_OF_PEAK
        gpu_blocks = int(fraction * facts.peak_open_tokens // tpb) // replicas
    else:
        gpu_blocks = profile.blocks_for_bytes(profile.gpu_kv_bytes, tpb)
    if gpu_blocks < 1:
        raise UsageError(
            f"the GPU KV memory holds no block of {tpb} tokens ({block_bytes / 1e6:.1f} MB)"
            + (f" on each of {replicas} replicas" if replicas > 1 else "")
        )
    return gpu_blocks


def _simulate_cluster(args: argparse.Namespace) -> int:
    """`--replicas N`: every routing policy on N replicas, and the pooled reference."""
    from dataclasses import asdict, replace

    from pagedkv.sim.cluster import ROUTINGS, ClusterSpec, RemoteProfile, parse_routings
    from pagedkv.sim.cluster_report import build_cluster_report, format_cluster_tables
    from pagedkv.sim.compare import Job, default_workers, run_jobs, workload_facts
    from pagedkv.sim.policies import (
        DEFAULT_IDLE_TTL_S,
        HardwareProfile,
        SimSettings,
        default_pinned_cap,
        parse_policies,
    )
    from pagedkv.sim.report import write_json

    t0 = time.perf_counter()
    n = args.replicas
    for flag in ("plot", "sweep"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} compares one server's policies; drop it with --replicas")
    try:
        policies = parse_policies(args.policies or "ours")
    except ValueError as err:
        raise UsageError(f"--policies: {err}") from None
    if len(policies) != 1:
        raise UsageError("--policies: with --replicas, name the one policy every replica runs")
    policy = policies[0]
    if policy.infinite_gpu:
        raise UsageError("--policies: the ideal has infinite memory; replicas change nothing")
    try:
        routings = parse_routings(args.routing, remote=args.remote)
    except ValueError as err:
        raise UsageError(f"--routing: {err}") from None
    if args.trace is not None:
        for flag in ("sessions", "tokens_per_block", "compact_at", "subagent_rate"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                raise UsageError(f"{name} shapes the built-in agent workload; drop it with --trace")
    else:
        if args.sessions is None:
            args.sessions = CLUSTER_SESSIONS_PER_REPLICA * n
        if args.tokens_per_block is None:
            args.tokens_per_block = CLUSTER_TOKENS_PER_BLOCK
    _check_output(args.json, "--json")
    idle_ttl: float | None = DEFAULT_IDLE_TTL_S if args.idle_ttl is None else args.idle_ttl
    if idle_ttl == _TTL_OFF:
        idle_ttl = None
    profile = HardwareProfile(
        gpu_flops=args.gpu_tflops * 1e12, host_link_bytes_per_s=args.link_gbps * 1e9
    )
    remote = RemoteProfile(
        capacity_bytes=args.remote_gb * 1e9,
        read_bytes_per_s=args.remote_gbps * 1e9,
        write_bytes_per_s=args.remote_gbps * 1e9,
        latency_s=args.remote_latency_us * 1e-6,
    )
    workload, sizing_peak = _load_workload(args)
    tpb = workload.tokens_per_block
    facts = workload_facts(workload, cost=profile.cost_model(tpb))
    if sizing_peak is not None:
        facts = replace(facts, peak_open_tokens=sizing_peak)
    block_bytes = profile.kv_bytes_per_token * tpb
    gpu_blocks = _gpu_blocks(args, profile, facts, tpb)
    host_blocks = int(args.host_gb * 1e9 // block_bytes)
    cap = args.max_pinned or default_pinned_cap(workload, gpu_blocks, high_watermark=0.95)
    settings = SimSettings(
        gpu_blocks=gpu_blocks, host_blocks=host_blocks, max_pinned_sessions=cap, idle_ttl_s=idle_ttl
    )
    pooled_settings = replace(
        settings,
        gpu_blocks=gpu_blocks * n,
        host_blocks=host_blocks * n,
        max_pinned_sessions=cap * n,
    )
    pooled_profile = replace(profile, gpu_flops=profile.gpu_flops * n)
    # the reference: one replica with n times everything, and the remote tier when any
    # routing under comparison has it (so the remote's capacity is not counted as a win
    # of the cluster over it)
    pooled = replace(ROUTINGS["round-robin"], name="pooled", remote=any(r.remote for r in routings))
    jobs = [
        Job(
            policy,
            pooled_settings,
            0,
            profile=pooled_profile,
            cluster=ClusterSpec(1, pooled, remote),
        )
    ]
    jobs += [Job(policy, settings, 0, cluster=ClusterSpec(n, r, remote)) for r in routings]
    workers = args.jobs or default_workers(len(jobs))
    bar = _progress_bar(len(jobs) * workload.num_requests, enabled=not args.no_progress)
    try:
        runs = run_jobs(
            workload,
            jobs,
            profile,
            num_workers=workers,
            on_progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    settings_out = {
        **asdict(settings),
        "gpu_kv_gb": round(gpu_blocks * block_bytes / 1e9, 3),
        "host_gb": round(host_blocks * block_bytes / 1e9, 3),
        "gpu_fraction_of_peak": round(gpu_blocks * n * tpb / max(1, facts.peak_open_tokens), 4),
        "kv_bytes_per_token": profile.kv_bytes_per_token,
        "block_size": tpb,
        "trace": args.trace,
        "seed": None if args.trace else args.seed,
        "workers": workers,
    }
    cluster_out = {
        "replicas": n,
        "node_policy": policy.name,
        "routings": [asdict(r) for r in routings],
        "remote": asdict(remote),
        "per_request_connections": bool(args.per_request_connections),
    }
    report = build_cluster_report(
        facts=facts,
        profile=asdict(profile),
        settings=settings_out,
        cluster=cluster_out,
        pooled=runs[0],
        runs=runs[1:],
        wall_s=time.perf_counter() - t0,
    )
    print(format_cluster_tables(report), flush=True)
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _varies_with_gpu(policy: Any) -> bool:
    return bool(policy.reuse_prefix and not policy.infinite_gpu)


def _progress_bar(total: int, *, enabled: bool) -> Any:
    """A tqdm bar on stderr that shows up after 2 s, or None (disabled, not a terminal,
    or tqdm missing)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="simulate", delay=2.0, file=sys.stderr, leave=False)
