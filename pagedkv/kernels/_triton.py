"""Optional Triton import and backend selection shared by every launcher.

The package must import on machines without Triton (macOS, CPU-only CI images), so
Triton is imported here once, guarded, and the kernel modules (`*_kernel.py`) are
imported lazily by the launchers only when the Triton backend is chosen. A side effect
worth knowing: `triton.jit` reads `TRITON_INTERPRET` when a kernel is *decorated*, i.e.
when its `*_kernel.py` module is first imported, which is the first Triton call.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

try:  # pragma: no cover - which branch runs depends on the machine
    import triton

    HAS_TRITON = True
    TRITON_VERSION: str | None = str(triton.__version__)
    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - ImportError, or a broken install
    HAS_TRITON = False
    TRITON_VERSION = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when `TRITON_INTERPRET=1` is set (kernels then run on the CPU via NumPy)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(op: str, backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """Pick the implementation for a call.

    `auto` runs Triton for CUDA tensors (when Triton imports) and the torch reference
    otherwise; `torch` always runs the reference; `triton` always runs the kernel and
    needs either a CUDA device or `TRITON_INTERPRET=1`.

    Raises:
        ValueError: `backend` is not one of "auto", "triton", "torch".
        ImportError: `backend="triton"` but Triton is not importable.
        RuntimeError: `backend="triton"` on CPU tensors without `TRITON_INTERPRET=1`.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend must be one of {_BACKENDS}; got backend={backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if not HAS_TRITON:
        raise ImportError(
            f"{op}: backend='triton' needs the triton package, which failed to import "
            f"({_TRITON_IMPORT_ERROR}); install triton or use backend='torch'"
        )
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 in the "
            "environment before the first Triton call; got TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}"
        )
    return "triton"


def check_kernel_runnable(op: str, kernel: Any, device: torch.device) -> None:
    """Raise if `kernel` was compiled for the GPU but is about to run on CPU tensors.

    `triton.jit` decides between compiling and interpreting when the kernel module is
    imported; if `TRITON_INTERPRET=1` was set only afterwards, a CPU launch would fail
    deep inside Triton with an unhelpful message.
    """
    if device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"{op}: the Triton kernels were imported without TRITON_INTERPRET=1, so they "
            f"cannot run on {device.type} tensors; set TRITON_INTERPRET=1 before the first "
            "Triton call (before importing kernels.*_kernel)"
        )


def device_context(device: torch.device) -> Any:
    """`torch.cuda.device(device)` for CUDA tensors (Triton launches on the current
    device), a no-op context otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()
