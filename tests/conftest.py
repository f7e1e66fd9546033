"""Shared pytest setup: Hypothesis profiles and the `gpu` marker."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The Triton interpreter must be chosen before triton is first imported: without CUDA the
# kernel tests run the Triton kernels interpreted on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, stateful_step_count=40, deadline=None)
settings.register_profile(
    "thorough",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
TRACES_DIR = SHARED_DIR / "traces"


def _has_cuda() -> bool:
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def traces_dir() -> Path:
    """The shared trace folder (`../shared/traces`); skips the test when it is absent."""
    if not TRACES_DIR.is_dir():
        pytest.skip(f"shared traces not found at {TRACES_DIR}; they live beside the repository")
    return TRACES_DIR
