"""A transformers model (Qwen2: q/k/v biases, GQA) with `attn_implementation="pagedkv"`
on the Triton kernels, run by the Triton interpreter on the CPU, against transformers'
own eager attention on the same weights: the kernel path a GPU server takes under a
Hugging Face model (strided per-layer views, chunked prefill, mixed and pure decode
steps), checked without a GPU.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():  # effective only if set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers
from interpret_helpers import interpreter_active, rerun_interpreted

import pagedkv.integrations.hf_model as hf_model
from pagedkv import kernels
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.tiers.kv_store import KVStore

_CHILD = "PAGEDKV_TEST_HF_INTERPRET_CHILD"
BLOCK_SIZE = 4


@pytest.mark.skipif(
    not kernels.HAS_TRITON or torch.cuda.is_available(),
    reason="needs triton, and no CUDA (on a GPU the kernels run compiled)",
)
def test_triton_kernels_under_a_transformers_model_match_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not interpreter_active():
        rerun_interpreted(__file__, _CHILD)
        return
    for name in ("store_kv", "paged_prefill", "paged_decode"):
        monkeypatch.setattr(
            hf_model, name, functools.partial(getattr(kernels, name), backend="triton")
        )
    cfg = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    lm = hf_model.from_config(cfg, seed=2)
    ref = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="eager"
    ).eval()
    ref.load_state_dict(lm.hf.state_dict())
    store = KVStore(lm.config.kv_spec(BLOCK_SIZE), 24, fill=float("nan"))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[0:8], perm[8:16], perm[16:24]]
    gen = torch.Generator().manual_seed(1)
    seqs: list[list[int]] = [[], [], []]

    def step(work: list[tuple[int, int]]) -> None:
        chunks = []
        for s, n in work:
            new = torch.randint(0, 96, (n,), generator=gen).tolist()
            chunks.append(SeqChunk(tables[s], len(seqs[s]), new))
            seqs[s] += new
        got = lm(build_forward_batch(chunks, block_size=BLOCK_SIZE), store)
        for row, (s, _n) in enumerate(work):
            with torch.no_grad():
                want = ref(torch.tensor([seqs[s]])).logits[0, -1].float()
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)

    step([(0, 11)])  # a prompt over three blocks
    step([(1, 4), (2, 5)])
    step([(0, 1), (1, 7), (2, 1)])  # mixed: decodes beside a chunk on a cached prefix
    step([(0, 1), (1, 1), (2, 1)])  # pure decode
