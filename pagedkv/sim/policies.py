"""What the simulator compares: hardware profiles, policies (scheduler configurations)
and the memory sizes a run uses.

A policy is a `SchedulerConfig` plus a choice of tiers, never a second simulator: every
policy replays through the same `SessionScheduler`, `TieredKVCache` and `BlockPool`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pagedkv.scheduler.config import PrefetchConfig, SchedulerConfig
from pagedkv.scheduler.cost import CostModel
from pagedkv.sim.workload import Workload

__all__ = [
    "DEFAULT_IDLE_TTL_S",
    "DEFAULT_POLICIES",
    "PINNED_CAP_FACTOR",
    "POLICIES",
    "HardwareProfile",
    "Policy",
    "SimSettings",
    "default_pinned_cap",
    "ideal_gpu_blocks",
    "parse_policies",
    "scheduler_config",
]

GB = 1e9
# Idle sessions pinned longer than this are offloaded ahead of need (tool calls take
# ~10 s; a human between tasks takes minutes), so the GPU keeps the sessions that will
# speak soon. Tuned on the default agent workload, then fixed (docs/simulator.md).
DEFAULT_IDLE_TTL_S = 45.0
UNCAPPED = 1_000_000  # "no pinned-session cap": memory is the only limit


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareProfile:
    """The model and machine behind memory sizes and modelled times.

    Defaults: Llama-3-8B (32 layers, 8 KV heads of 128 dims, bf16: 128 KiB of KV per
    token) on an 80 GB GPU with 16 GB of weights, 256 GB of host memory for the KV host
    tier, a 25 GB/s host link per direction, 400 TFLOP/s sustained prefill, and 50
    decode tokens/s per sequence.
    """

    name: str = "Llama-3-8B on an 80 GB GPU, 256 GB host"
    kv_bytes_per_token: int = 32 * 2 * 8 * 128 * 2
    gpu_memory_bytes: float = 80 * GB
    weights_bytes: float = 16 * GB
    host_memory_bytes: float = 256 * GB
    num_params: float = 8.0e9
    num_layers: int = 32
    hidden_size: int = 4096
    gpu_flops: float = 400e12
    host_link_bytes_per_s: float = 25e9
    decode_tokens_per_s: float = 50.0

    def __post_init__(self) -> None:
        for name in ("kv_bytes_per_token", "gpu_memory_bytes", "num_params", "gpu_flops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareProfile.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.weights_bytes < self.gpu_memory_bytes:
            raise ValueError(
                f"HardwareProfile.weights_bytes must be in [0, gpu_memory_bytes "
                f"{self.gpu_memory_bytes:g}), got {self.weights_bytes:g}"
            )
        if self.host_memory_bytes < 0:
            raise ValueError(
                f"HardwareProfile.host_memory_bytes must be >= 0, got {self.host_memory_bytes}"
            )

    @property
    def gpu_kv_bytes(self) -> float:
        """GPU memory left for KV after the weights."""
        return self.gpu_memory_bytes - self.weights_bytes

    def blocks_for_bytes(self, num_bytes: float, block_size: int) -> int:
        """Whole KV blocks of `block_size` tokens that fit in `num_bytes`."""
        return int(num_bytes // (self.kv_bytes_per_token * block_size))

    def cost_model(self, block_size: int) -> CostModel:
        """The cost model for blocks of `block_size` tokens."""
        return CostModel(
            num_params=self.num_params,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            gpu_flops=self.gpu_flops,
            host_link_bytes_per_s=self.host_link_bytes_per_s,
            bytes_per_block=self.kv_bytes_per_token * block_size,
            block_size=block_size,
            decode_tokens_per_s=self.decode_tokens_per_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One policy under comparison: scheduler switches plus which tiers it gets.

    Attributes:
        name: short name (command line, table, JSON).
        summary: one line for the report.
        reuse_prefix: look up cached prefixes at all.
        pin_sessions: keep sessions' blocks pinned between turns.
        host_tier: give it the host pool.
        offload_on_release: write a released turn's blocks through to the host.
        offload_idle: offload (rather than drop) idle pinned sessions under pressure.
        capped: apply `SimSettings.max_pinned_sessions` (else only memory limits).
        idle_ttl: apply `SimSettings.idle_ttl_s` (proactive idle offload).
        backup_idle: write idle pinned sessions' new blocks back to the host at turn end.
        infinite_gpu: a GPU pool big enough never to evict (the ideal). With
            `pin_sessions`, a turn whose prompt has a longer cached prefix than its
            session holds closes and resumes the session, so every turn gets the
            per-turn ideal (`Workload.turn_ideal`).
        layerwise: a turn waiting on a restore starts its prefill when the first layer
            has landed, each layer waiting only for its own copy
            (`CostModel.layerwise_end_s`).
        split: plan each restore as load-and-compute (`CostModel.split_restore`):
            recompute the front while the back crosses the link.
        prefetch: restore offloaded sessions likely to return soon into free GPU
            blocks ahead of their return (`SchedulerConfig.prefetch`).
    """

    name: str
    summary: str
    reuse_prefix: bool = True
    pin_sessions: bool = False
    host_tier: bool = False
    offload_on_release: bool = False
    offload_idle: bool = True
    capped: bool = False
    idle_ttl: bool = False
    backup_idle: bool = False
    infinite_gpu: bool = False
    layerwise: bool = False
    split: bool = False
    prefetch: bool = False


_OURS = Policy(
    name="ours",
    summary="pinned sessions, admission cap, write-back and cost-aware idle "
    "offload, hash fallback on reconnect; restores overlap the prefill layer by "
    "layer, split with recompute where that ends sooner, and sessions likely to "
    "return soon are restored ahead of their return",
    pin_sessions=True,
    host_tier=True,
    capped=True,
    idle_ttl=True,
    backup_idle=True,
    layerwise=True,
    split=True,
    prefetch=True,
)
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            name="stateless",
            summary="no reuse: every turn recomputes its whole prompt",
            reuse_prefix=False,
        ),
        Policy(
            name="prefix",
            summary="content-hash LRU prefix cache over GPU memory (vLLM, SGLang)",
        ),
        Policy(
            name="prefix+host",
            summary="prefix cache with a host tier, written through at turn end "
            "(LMCache, SGLang HiCache)",
            host_tier=True,
            offload_on_release=True,
        ),
        _OURS,
        replace(
            _OURS,
            name="ours-off",
            summary="ours with whole restores before the prefill, no split, no prefetch",
            layerwise=False,
            split=False,
            prefetch=False,
        ),
        replace(
            _OURS,
            name="ours-layerwise",
            summary="ours-off with layer-wise restores",
            split=False,
            prefetch=False,
        ),
        replace(
            _OURS,
            name="ours-split",
            summary="ours-layerwise with load-and-compute splits (ours without prefetch)",
            prefetch=False,
        ),
        Policy(
            name="pinned",
            summary="ours without a host tier: idle sessions are dropped, not offloaded",
            pin_sessions=True,
            offload_idle=False,
            capped=True,
        ),
        Policy(
            name="ideal",
            summary="infinite GPU memory, every session pinned: a turn reuses the longer "
            "of its session's KV and anything cached earlier",
            pin_sessions=True,
            infinite_gpu=True,
        ),
    )
}
DEFAULT_POLICIES: tuple[str, ...] = ("stateless", "prefix", "prefix+host", "ours", "ideal")


def parse_policies(text: str) -> tuple[Policy, ...]:
    """Policies from a comma-separated list of names (`all` = every policy).

    Raises:
        ValueError: an unknown or repeated name, or an empty list.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return tuple(POLICIES.values())
    if not names:
        raise ValueError(f"no policy given; choose from {', '.join(POLICIES)}")
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}, all")
    if len(set(names)) != len(names):
        raise ValueError(f"policy list repeats a name: {text!r}")
    return tuple(POLICIES[n] for n in names)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSettings:
    """Memory sizes and knobs shared by every policy of one run.

    Attributes:
        gpu_blocks: GPU KV blocks (each `block_size` tokens).
        host_blocks: host-tier KV blocks (for policies with a host tier).
        max_pinned_sessions: the pinned-session cap of capped policies.
        idle_ttl_s: proactive idle offload of policies that use it (None: off).
        high_watermark, max_queue, queue_timeout_s: as in `SchedulerConfig`.
    """

    gpu_blocks: int
    host_blocks: int
    max_pinned_sessions: int
    idle_ttl_s: float | None = DEFAULT_IDLE_TTL_S
    high_watermark: float = 0.95
    max_queue: int = 256
    queue_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.gpu_blocks < 1:
            raise ValueError(f"SimSettings.gpu_blocks must be >= 1, got {self.gpu_blocks}")
        if self.host_blocks < 0:
            raise ValueError(f"SimSettings.host_blocks must be >= 0, got {self.host_blocks}")
        if self.max_pinned_sessions < 1:
            raise ValueError(
                f"SimSettings.max_pinned_sessions must be >= 1, got {self.max_pinned_sessions}"
            )
        if self.idle_ttl_s is not None and self.idle_ttl_s < 0:
            raise ValueError(f"SimSettings.idle_ttl_s must be >= 0 or None, got {self.idle_ttl_s}")


def scheduler_config(policy: Policy, settings: SimSettings) -> SchedulerConfig:
    """The `SchedulerConfig` a policy runs with under `settings`."""
    return SchedulerConfig(
        max_pinned_sessions=settings.max_pinned_sessions if policy.capped else UNCAPPED,
        high_watermark=settings.high_watermark,
        max_queue=settings.max_queue,
        queue_timeout_s=settings.queue_timeout_s,
        idle_ttl_s=settings.idle_ttl_s if policy.idle_ttl else None,
        pin_sessions=policy.pin_sessions,
        offload_on_release=policy.offload_on_release,
        reuse_prefix=policy.reuse_prefix,
        offload_idle=policy.offload_idle,
        backup_idle=policy.backup_idle and policy.host_tier,
        layerwise_restore=policy.layerwise,
        restore_split=policy.split and policy.host_tier,
        prefetch=PrefetchConfig() if policy.prefetch and policy.host_tier else None,
    )


# Pinned-session cap = this many times the sessions that fit the GPU at the mean prompt
# size. At 1x, sessions decoding at once (ACTIVE: they hold a pin slot) often fill every
# slot and new turns queue behind them; uncapped, idle pinned sessions crowd out the hash
# cache. 2x was best (p50/p99 TTFT, recomputed tokens) on agent workloads at 0.25-0.6
# of the peak open-session KV (docs/simulator.md, "Tuning").
PINNED_CAP_FACTOR = 2


def default_pinned_cap(workload: Workload, gpu_blocks: int, *, high_watermark: float) -> int:
    """The default pinned-session cap for a GPU of `gpu_blocks`.

    `PINNED_CAP_FACTOR * floor(high_watermark * gpu_blocks / ceil(mean input_len /
    tokens_per_block))`, at least 1.
    """
    tpb = workload.tokens_per_block
    n = workload.num_requests
    mean_len = workload.total_input_tokens / n if n else float(tpb)
    typical_blocks = max(1, math.ceil(mean_len / tpb))
    return max(1, PINNED_CAP_FACTOR * (int(high_watermark * gpu_blocks) // typical_blocks))


def ideal_gpu_blocks(workload: Workload, ideal_hit_tokens: int, *, high_watermark: float) -> int:
    """A GPU pool the ideal policy never has to reclaim a cached block from.

    Distinct full blocks (every block the infinite cache keeps: full blocks minus the
    ideal hits, `ideal_hit_tokens` from `Workload.ideal_hit_tokens()`) + one partial
    block per request + the largest request (in flight before its blocks are
    registered), scaled past the watermark.
    """
    tpb = workload.tokens_per_block
    num_full = sum(r.input_len // tpb for r in workload.requests)
    distinct = num_full - ideal_hit_tokens // tpb
    largest = max((len(r.block_keys) for r in workload.requests), default=1)
    need = distinct + workload.num_requests + largest
    return math.ceil(need / high_watermark) + 16
