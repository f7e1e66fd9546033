"""Shared pytest setup: Hypothesis profiles, the `gpu` marker, and the CI skip policy
(`skip_policy`: under CI only GPU tests may skip)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

# The Triton interpreter must be chosen before triton is first imported: without CUDA the
# kernel tests run the Triton kernels interpreted on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["skip_policy"]  # under CI only GPU tests may skip

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


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: the server tests run the engine thread, uvicorn
    and the clients in one process on a shared machine, and intra-op threads would only
    contend with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
TRACES_DIR = SHARED_DIR / "traces"


def _has_cuda() -> bool:
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    from skip_policy import GPU_SKIP_REASON

    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def traces_dir() -> Path:
    """The shared trace folder (`../shared/traces`); skips the test when it is absent,
    and fails it under CI, which always has the folder."""
    from skip_policy import enforced

    if not TRACES_DIR.is_dir():
        if enforced():
            pytest.fail(
                f"shared traces not found at {TRACES_DIR} (CI runs with ../shared beside the clone)"
            )
        pytest.skip(f"shared traces not found at {TRACES_DIR}; they live beside the repository")
    return TRACES_DIR
