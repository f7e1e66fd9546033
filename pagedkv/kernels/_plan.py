"""Host-side launch planning helpers shared by the launchers (shapes only, no syncs)."""

from __future__ import annotations

import functools

import torch

# Programs per SM to aim for: several CTAs per SM keep enough loads in flight to cover
# HBM latency in a memory-bound loop.
PROGRAMS_PER_SM = 4


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@functools.lru_cache(maxsize=16)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def cuda_capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as an int (80 for sm_80, 90 for sm_90), cached.
    The tile planners choose per architecture: sm_80's mma instructions hold a tile in
    more registers than sm_90's wgmma."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 for any other device, so
    the interpreter exercises the same multi-split paths on tiny shapes."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


def check_positive_int(op: str, name: str, value: object) -> int:
    """Return `value` if it is an int >= 1, else raise (`TypeError` / `ValueError`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1; got {name}={value}")
    return value


# The Triton kernels keep a [rows, head_dim] tile per operand in shared memory/registers;
# past this the fixed tile configs no longer fit (the torch reference has no limit).
MAX_TRITON_HEAD_DIM = 256


def check_triton_head_dim(op: str, head_dim: int) -> None:
    """Raise `ValueError` if the Triton kernels cannot take this head dim."""
    if head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(
            f"{op}: the Triton kernels support head_dim <= {MAX_TRITON_HEAD_DIM}; got "
            f"head_dim={head_dim} (use backend='torch')"
        )
