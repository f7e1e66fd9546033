"""The model with its attention on the Triton kernels, run by the Triton interpreter on
the CPU, against the same model on the torch references: the kernel path of a GPU
server (strided per-layer cache views, GQA, chunked prefill, mixed and pure decode
steps), checked without a GPU.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():  # as tests/kernels_helpers.py (effective if set first)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from interpret_helpers import interpreter_active, rerun_interpreted

import pagedkv.model.llama
from pagedkv import kernels
from pagedkv.model.config import Llama3RopeScaling, LlamaConfig
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.tiers.kv_store import KVStore

BLOCK_SIZE = 4
NUM_BLOCKS = 32


def run_script(model: LlamaModel) -> list[torch.Tensor]:
    """Three sequences: a prefill, two chunked prefills, a mixed step, decode steps."""
    store = KVStore(model.config.kv_spec(BLOCK_SIZE), NUM_BLOCKS, fill=float("nan"))
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).tolist()
    tables, done, out = [perm[0:10], perm[10:20], perm[20:30]], [0, 0, 0], []
    gen = torch.Generator().manual_seed(1)

    def step(work: list[tuple[int, int]]) -> None:
        chunks = [
            SeqChunk(tables[s], done[s], torch.randint(0, 272, (n,), generator=gen).tolist())
            for s, n in work
        ]
        out.append(model(build_forward_batch(chunks, block_size=BLOCK_SIZE), store))
        for s, n in work:
            done[s] += n

    step([(0, 13)])
    step([(1, 4), (2, 5)])
    step([(0, 1), (1, 9), (2, 1)])
    step([(0, 1), (1, 1), (2, 1)])
    step([(0, 1), (1, 1), (2, 1)])
    return out


_CHILD = "PAGEDKV_TEST_MODEL_INTERPRET_CHILD"


@pytest.mark.skipif(
    not kernels.HAS_TRITON or torch.cuda.is_available(),
    reason="needs triton, and no CUDA (on a GPU the gpu-marked model tests run instead)",
)
def test_triton_kernels_through_the_model_match_the_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not interpreter_active():
        rerun_interpreted(__file__, _CHILD)
        return
    cfg = LlamaConfig.tiny(rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position=64))
    want = run_script(init_random(cfg, seed=1))
    for name in ("store_kv", "paged_prefill", "paged_decode"):
        op = functools.partial(getattr(kernels, name), backend="triton")
        monkeypatch.setattr(pagedkv.model.llama, name, op)
    got = run_script(init_random(cfg, seed=1))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)  # fp32 both; order differs
