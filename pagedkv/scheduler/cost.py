"""The cost model behind victim choice and the simulator's timings."""

from __future__ import annotations

from dataclasses import dataclass


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
