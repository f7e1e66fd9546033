"""KVStore: the block-major KV tensor of one tier (GPU or host), with per-layer views."""

from __future__ import annotations

import torch

from pagedkv.spec import KVSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def can_pin_memory() -> bool:
    """Whether page-locked host memory is available (it needs a CUDA runtime)."""
    return bool(torch.cuda.is_available())


class KVStore:
    """One tensor `kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`.

    A block is one contiguous chunk across all layers, so moving a block between tiers
    is one copy. `k_cache(layer)` / `v_cache(layer)` are the strided per-layer views
    `[num_blocks, block_size, num_kv_heads, head_dim]` the attention kernels read.

    Args:
        spec: the cache shape.
        num_blocks: blocks to allocate (>= 1).
        device: where the tensor lives.
        pin_memory: for a CPU store: True pins it (raises without CUDA), False does not,
            None pins exactly when CUDA is present (what a host tier wants).
        fill: optional value to fill the new tensor with (default: uninitialised).
    """

    def __init__(
        self,
        spec: KVSpec,
        num_blocks: int,
        *,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        fill: float | None = None,
    ) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"KVStore: num_blocks must be an int >= 1, got {num_blocks!r}")
        device = torch.device(device)
        pin = False
        if device.type == "cpu":
            if pin_memory and not can_pin_memory():
                raise ValueError("KVStore: pin_memory=True needs CUDA, and none is available")
            pin = can_pin_memory() if pin_memory is None else pin_memory
        elif pin_memory:
            raise ValueError(f"KVStore: pin_memory applies to CPU stores, got device {device}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.kv = torch.empty(
            (num_blocks, *spec.block_shape),
            dtype=TORCH_DTYPES[spec.dtype],
            device=device,
            pin_memory=pin,
        )
        if fill is not None:
            self.kv.fill_(fill)

    @classmethod
    def from_bytes(
        cls, spec: KVSpec, num_bytes: int, *, device: str | torch.device = "cpu", **kwargs: object
    ) -> KVStore:
        """A store of as many whole blocks as fit in `num_bytes`.

        Raises:
            ValueError: the budget holds no block.
        """
        num_blocks = spec.num_blocks_in(num_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"KVStore: {num_bytes} bytes hold no block of {spec.bytes_per_block} bytes"
            )
        return cls(spec, num_blocks, device=device, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_free_memory(
        cls, spec: KVSpec, *, fraction: float = 0.7, device: str | torch.device = "cuda"
    ) -> KVStore:
        """A GPU store using `fraction` of the device's currently free memory.

        Raises:
            ValueError: `fraction` outside (0, 1], or `device` is not a CUDA device.
        """
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"KVStore: fraction must be in (0, 1], got {fraction}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"KVStore.from_free_memory needs a CUDA device, got {device}")
        free_bytes, _total = torch.cuda.mem_get_info(device)
        return cls.from_bytes(spec, int(free_bytes * fraction), device=device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def is_pinned(self) -> bool:
        return self.kv.device.type == "cpu" and self.kv.is_pinned()

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def k_cache(self, layer: int) -> torch.Tensor:
        """K of one layer: a view `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        return self.kv[:, layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """V of one layer: a view `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        return self.kv[:, layer, 1]
