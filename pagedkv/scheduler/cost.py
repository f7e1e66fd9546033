"""The cost model behind victim choice and the simulator's timings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Times for moving or recomputing KV, from a few hardware and model numbers.

    Attributes:
        num_params: model parameters (prefill costs ~2 FLOPs per parameter per token).
        num_layers, hidden_size: for the attention term (4 * layers * hidden FLOPs per
            token per context token).
        gpu_flops: sustained prefill FLOP/s of the GPU.
        host_link_bytes_per_s: GPU <-> host bandwidth per direction.
        bytes_per_block: KV bytes per block.
        block_size: tokens per block.
        decode_tokens_per_s: decode speed of one sequence (for modelled turn lengths).
    """

    num_params: float = 8.0e9
    num_layers: int = 32
    hidden_size: int = 4096
    gpu_flops: float = 400e12
    host_link_bytes_per_s: float = 25e9
    bytes_per_block: int = 16 * 128 * 1024
    block_size: int = 16
    decode_tokens_per_s: float = 50.0

    def __post_init__(self) -> None:
        for name in ("num_params", "gpu_flops", "host_link_bytes_per_s", "decode_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_layers", "hidden_size", "bytes_per_block", "block_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)}")

    def prefill_s(self, num_tokens: int, context_start: int = 0) -> float:
        """Seconds to prefill `num_tokens` new tokens after `context_start` cached ones."""
        if num_tokens <= 0:
            return 0.0
        dense = 2.0 * self.num_params * num_tokens
        # each new token attends to the cached prefix plus, on average, half the new ones
        avg_ctx = context_start + num_tokens / 2.0
        attention = 4.0 * self.num_layers * self.hidden_size * num_tokens * avg_ctx
        return (dense + attention) / self.gpu_flops

    def transfer_s(self, num_blocks: int) -> float:
        """Seconds to move `num_blocks` across the host link."""
        return num_blocks * self.bytes_per_block / self.host_link_bytes_per_s

    def restore_is_cheaper(self, num_blocks: int, context_start: int = 0) -> bool:
        """Whether restoring `num_blocks` from host beats recomputing their tokens."""
        return self.transfer_s(num_blocks) < self.prefill_s(
            num_blocks * self.block_size, context_start
        )

    def split_restore(
        self,
        num_blocks: int,
        context_start: int,
        num_new: int,
        *,
        layerwise: bool,
        copy_latency_s: float = 0.0,
        compute_weight: float = 1.0,
    ) -> tuple[int, float]:
        """Plan a load-and-compute split of a restore (after Cake, Jin et al. 2024).

        `context_start` tokens are on the GPU, the next `num_blocks` blocks on the host,
        then `num_new` new tokens. Copy the first `j` of those blocks and compute the
        rest with the new tokens, in one prefill. With `layerwise` the prefill's layer i
        waits only for layer i of the copy (`layerwise_end_s`), so copying the front
        while computing the back overlaps; without it they run one after the other and
        only the ends (all or nothing) can win.

        Each second of extra computation is charged `compute_weight` seconds: the GPU
        time a split adds delays every turn queued behind it on a busy GPU (1.0), or
        nothing on an idle one (0.0).

        Returns `(j, seconds)`: the split with the least prefill end plus charged
        computation (ties to the larger `j`, the least computation) and when its
        prefill ends. `j = num_blocks` is a plain restore and `j = 0` a full recompute,
        so the split is never worse than either.

        Raises:
            ValueError: a negative count, or a `copy_latency_s` or `compute_weight`
                that is negative, infinite or NaN.
        """
        if num_blocks < 0 or context_start < 0 or num_new < 0:
            raise ValueError(
                f"split_restore: counts must be >= 0, got {num_blocks}, {context_start}, {num_new}"
            )
        # `not 0 <= x < inf` also refuses NaN, which would make every score NaN
        if not 0.0 <= copy_latency_s < math.inf:
            raise ValueError(
                f"split_restore: copy_latency_s must be a finite number of seconds >= 0, "
                f"got {copy_latency_s!r}"
            )
        if not 0.0 <= compute_weight < math.inf:
            raise ValueError(
                f"split_restore: compute_weight must be finite and >= 0, got {compute_weight!r}"
            )
        bs = self.block_size
        j = np.arange(num_blocks + 1, dtype=np.float64)
        copy = np.where(
            j > 0, copy_latency_s + j * self.bytes_per_block / self.host_link_bytes_per_s, 0.0
        )
        tokens = (num_blocks - j) * bs + num_new  # computed: the back and the new tokens
        ctx = context_start + j * bs
        prefill = np.where(
            tokens > 0,
            (
                2.0 * self.num_params * tokens
                + 4.0 * self.num_layers * self.hidden_size * tokens * (ctx + tokens / 2.0)
            )
            / self.gpu_flops,
            0.0,
        )
        if layerwise:
            end = np.maximum.reduce(
                [prefill, copy / self.num_layers + prefill, copy + prefill / self.num_layers]
            )
        else:
            end = copy + prefill
        score = end + compute_weight * (prefill - prefill[-1])
        best = num_blocks - int(np.argmin(score[::-1]))  # the largest j among equal scores
        return best, float(end[best])

    def layerwise_end_s(
        self, *, gpu_start_s: float, copy_start_s: float, copy_end_s: float, prefill_s: float
    ) -> float:
        """When a prefill of `prefill_s` seconds ends if its layer i waits only for layer i
        of a restore copying from `copy_start_s` to `copy_end_s` (layers of equal size,
        each layer's copy and compute in order): the later of the compute alone, the
        first layer's copy then all compute, and the whole copy then the last layer."""
        per_layer_copy = (copy_end_s - copy_start_s) / self.num_layers
        return max(
            gpu_start_s + prefill_s,
            copy_start_s + per_layer_copy + prefill_s,
            copy_end_s + prefill_s / self.num_layers,
        )
