"""KVStore: the block-major KV tensor of one tier (GPU or host), with per-layer views."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from pagedkv.cache.spec import KVSpec

log = logging.getLogger("pagedkv.tiers.kv_store")

_PAGE = 4096

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


class _RegisteredHostBuffer(np.ndarray):
    """A host buffer page-locked for exactly its own size (`cudaHostRegister`), unlocked
    (`cudaHostUnregister`) just before its memory is freed: the tensors made from it
    (`torch.from_numpy`) keep it alive, so it is unlocked only after the last of them is
    gone. Only the instance that registered holds `_registered_ptr`; views do not."""

    _registered_ptr: int | None
    _unregister: Callable[[int], object] | None

    def __del__(self) -> None:
        ptr = self.__dict__.get("_registered_ptr")
        unregister = self.__dict__.get("_unregister")
        if ptr is not None and unregister is not None:
            # at interpreter shutdown or with a dead CUDA context there is nothing to do
            with contextlib.suppress(Exception):
                unregister(ptr)


def _cuda_register(ptr: int, nbytes: int) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) == 0  # type: ignore[no-untyped-call]


def _cuda_unregister(ptr: int) -> object:
    return torch.cuda.cudart().cudaHostUnregister(ptr)  # type: ignore[no-untyped-call]


def pinned_empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    register: Callable[[int, int], bool] = _cuda_register,
    unregister: Callable[[int], object] = _cuda_unregister,
) -> tuple[torch.Tensor, bool]:
    """An uninitialised page-locked CPU tensor of exactly `shape` x `dtype` bytes.

    `torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator,
    which rounds every request up to a power of two: a 70 GiB host tier would pin 128 GiB
    (or fail). Here a page-aligned buffer of the exact size is allocated and registered
    with the CUDA driver instead. When registration fails the function falls back to
    `pin_memory=True`. Returns (tensor, exact): `exact` is False on the fallback.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * elem
    raw = np.empty(nbytes + _PAGE, dtype=np.uint8).view(_RegisteredHostBuffer)
    offset = (-raw.ctypes.data) % _PAGE
    aligned = raw[offset : offset + nbytes]
    ptr = int(aligned.ctypes.data)
    if nbytes == 0 or not register(ptr, nbytes):
        log.warning("cudaHostRegister of %d bytes failed; using pin_memory=True", nbytes)
        return torch.empty(shape, dtype=dtype, pin_memory=True), False
    raw._registered_ptr = ptr
    raw._unregister = unregister
    tensor = torch.from_numpy(aligned).view(dtype).view(shape)
    return tensor, True


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
        shape = (num_blocks, *spec.block_shape)
        dtype = TORCH_DTYPES[spec.dtype]
        self._pinned = pin
        if pin:  # exactly the bytes asked for (torch's pinned allocator rounds up)
            self.kv, _exact = pinned_empty(shape, dtype)
        else:
            self.kv = torch.empty(shape, dtype=dtype, device=device)
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
        """Whether this is a page-locked host store (copies to and from it are async)."""
        return self.kv.device.type == "cpu" and (self._pinned or self.kv.is_pinned())

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def k_cache(self, layer: int) -> torch.Tensor:
        """K of one layer: a view `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        return self.kv[:, layer, 0]

    def v_cache(self, layer: int) -> torch.Tensor:
        """V of one layer: a view `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        return self.kv[:, layer, 1]
