"""The model on CUDA (Triton kernels) against the CPU path, and decode under a CUDA graph.

Skipped without a CUDA device (the `gpu` marker).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedkv.model.config import Llama3RopeScaling, LlamaConfig
from pagedkv.model.forward_batch import ForwardBatch, SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.tiers.kv_store import KVStore

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 16
NUM_BLOCKS = 64


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 272, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_script(model: LlamaModel, device: str) -> list[torch.Tensor]:
    """Three sequences: chunked prefills, a mixed prefill+decode step, decode steps.
    Returns each step's logits on the CPU."""
    store = KVStore(model.config.kv_spec(BLOCK_SIZE), NUM_BLOCKS, device=device, fill=float("nan"))
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[0:8], perm[8:16], perm[16:24]]
    done = [0, 0, 0]
    out = []

    def step(work: list[tuple[int, list[int]]]) -> None:
        chunks = [SeqChunk(tables[s], done[s], ids) for s, ids in work]
        batch = build_forward_batch(chunks, block_size=BLOCK_SIZE, device=device)
        out.append(model(batch, store).cpu())
        for s, ids in work:
            done[s] += len(ids)

    step([(0, random_ids(37, 1))])
    step([(1, random_ids(16, 2)), (2, random_ids(17, 3))])
    step([(0, random_ids(1, 4)), (1, random_ids(20, 5)), (2, random_ids(1, 6))])
    for i in range(3):
        step([(s, random_ids(1, 10 + 3 * i + s)) for s in range(3)])
    return out


def test_cuda_fp32_matches_cpu() -> None:
    cfg = LlamaConfig.tiny(rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position=64))
    cpu = run_script(init_random(cfg, seed=1), "cpu")
    cuda = run_script(init_random(cfg, seed=1, device="cuda"), "cuda")
    for got, want in zip(cuda, cpu, strict=True):
        # fp32 on both sides (the Triton kernels use IEEE fp32 dots); matmul order differs.
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_tracks_fp32(dtype: str) -> None:
    cfg16 = LlamaConfig.demo(num_layers=2, dtype=dtype)
    model16 = init_random(cfg16, seed=2, device="cuda")
    model32 = init_random(dataclasses.replace(cfg16, dtype="float32"), seed=2)
    with torch.no_grad():
        for p32, p16 in zip(model32.parameters(), model16.parameters(), strict=True):
            p32.copy_(p16.float().cpu())  # the same (rounded) weights on both sides
    for got, want in zip(run_script(model16, "cuda"), run_script(model32, "cpu"), strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # 8 (bf16) or 11 (fp16) mantissa bits through 2 layers: relative to the logit scale.
        assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_decode_replays_in_a_cuda_graph() -> None:
    """Capture one decode step (B=3, fixed table width); replaying it with new token ids,
    positions, slots and lengths copied into the captured tensors gives the eager logits."""
    cfg = LlamaConfig.demo(num_layers=2, dtype="bfloat16")
    model = init_random(cfg, seed=3, device="cuda")
    eager_store = KVStore(cfg.kv_spec(BLOCK_SIZE), NUM_BLOCKS, device="cuda", fill=0.0)
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    lens = [5, 16, 33]
    prefill = [
        SeqChunk(t, 0, random_ids(n, 20 + i))
        for i, (t, n) in enumerate(zip(tables, lens, strict=True))
    ]
    model(build_forward_batch(prefill, block_size=BLOCK_SIZE, device="cuda"), eager_store)
    graph_store = KVStore(cfg.kv_spec(BLOCK_SIZE), NUM_BLOCKS, device="cuda")
    graph_store.kv.copy_(eager_store.kv)

    def decode_batch(step: int) -> ForwardBatch:
        chunks = [
            SeqChunk(t, n + step, random_ids(1, 100 + 3 * step + i))
            for i, (t, n) in enumerate(zip(tables, lens, strict=True))
        ]
        b = build_forward_batch(chunks, block_size=BLOCK_SIZE, max_blocks=8, device="cuda")
        # a static bound for the captured launch plan (the table capacity)
        return dataclasses.replace(b, max_seq_len=8 * BLOCK_SIZE)

    static = decode_batch(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(static, graph_store)  # warm-up (compiles the kernels); rewrites step 0's K/V
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model(static, graph_store)
    for step in range(4):
        batch = decode_batch(step)
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
            getattr(static, name).copy_(getattr(batch, name))
        graph.replay()
        want = model(batch, eager_store)
        torch.testing.assert_close(static_logits, want, atol=1e-3, rtol=1e-3)


def test_engine_accepts_a_bare_cuda_device_and_answers_on_the_gpu() -> None:
    """`--device cuda` (no index) must match the model's `cuda:0`; a short turn runs."""
    from pagedkv.serving.engine import Engine
    from pagedkv.serving.engine_types import EngineConfig, EngineRequest, TurnDone
    from pagedkv.serving.generation import OutputSpec

    model = init_random(LlamaConfig.tiny(), seed=0, device="cuda")
    engine = Engine(model, EngineConfig(num_gpu_blocks=64, num_host_blocks=16, device="cuda"))
    assert engine.device == model.device
    events: list[object] = []
    engine.open_session("s")
    engine.submit(
        EngineRequest(request_id="r", session_id="s", prompt_tokens=tuple(random_ids(40, 1)),
                      output=OutputSpec(max_output_tokens=3)),
        events.append,
    )  # fmt: skip
    engine.run_until_idle()
    assert any(isinstance(e, TurnDone) for e in events), events
