"""The paged model against transformers' LlamaForCausalLM with the same weights.

Every cache here starts filled with NaN, so a read of a slot no token wrote (an unused
page, the tail of a partial block, a wrong block id) turns the logits NaN and fails.
Block ids are drawn from a seeded permutation, so tables are non-contiguous.

Tolerance: both sides compute in fp32; they differ only in summation order (einsum vs
matmul, logsumexp softmax vs softmax), measured at <= 1e-5 absolute on logits of
magnitude up to ~50. 1e-4 absolute and relative leaves 10x headroom, while any real bug
(a wrong position, block or head grouping) moves logits by O(1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import pytest
import torch
import transformers

from pagedkv.kernels import copy_blocks
from pagedkv.model.config import Llama3RopeScaling, LlamaConfig
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.tiers.kv_store import KVStore

ATOL = RTOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 48
NAN = float("nan")

CONFIGS = {
    "untied": LlamaConfig.tiny(),
    "tied-llama3rope": LlamaConfig.tiny(
        tie_word_embeddings=True,
        rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position=64),
    ),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny ops: on a loaded 2-core machine thread hand-offs cost more than the math."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[LlamaModel, torch.nn.Module]:
    """(paged model, HF model) with identical weights."""
    model = init_random(CONFIGS[request.param], seed=1)
    return model, hf_twin(model)


def hf_twin(model: LlamaModel) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (eager attention, fp32) with `model`'s weights."""
    hf_config = transformers.LlamaConfig(**model.config.to_hf_dict(), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).float()
    assert hf.config._attn_implementation == "eager"
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def hf_logits(hf: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """HF logits at every position of `ids`, fp32 `[len(ids), vocab]`."""
    with torch.no_grad():
        return hf(input_ids=torch.tensor([list(ids)])).logits[0].float()


def random_ids(n: int, seed: int, vocab: int = 288) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedSeq:
    """A sequence's block table on a store, grown from a free list as tokens arrive."""

    def __init__(self, free: list[int]) -> None:
        self.free = free
        self.block_ids: list[int] = []
        self.tokens: list[int] = []

    def chunk(self, new_ids: Sequence[int]) -> SeqChunk:
        """The chunk for `new_ids`, allocating blocks; the tokens count as computed after."""
        need = -(-(len(self.tokens) + len(new_ids)) // BLOCK_SIZE)
        while len(self.block_ids) < need:
            self.block_ids.append(self.free.pop())
        chunk = SeqChunk(list(self.block_ids), len(self.tokens), list(new_ids))
        self.tokens += list(new_ids)
        return chunk


def free_list(seed: int) -> list[int]:
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()


def step(model: LlamaModel, store: KVStore, chunks: list[SeqChunk]) -> torch.Tensor:
    batch = build_forward_batch(chunks, block_size=BLOCK_SIZE, vocab_size=model.config.vocab_size)
    return model(batch, store)


def new_store(model: LlamaModel) -> KVStore:
    return KVStore(model.config.kv_spec(BLOCK_SIZE), NUM_BLOCKS, fill=NAN)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_full_prompt_in_one_prefill(pair: tuple[LlamaModel, torch.nn.Module]) -> None:
    model, hf = pair
    ids = random_ids(37, seed=2)
    store = new_store(model)
    logits = step(model, store, [PagedSeq(free_list(0)).chunk(ids)])
    assert logits.shape == (1, model.config.vocab_size) and logits.dtype == torch.float32
    assert_close(logits[0], hf_logits(hf, ids)[-1])


def test_multi_turn_continuation_from_paged_cache(pair: tuple[LlamaModel, torch.nn.Module]) -> None:
    """Prefill a prompt, decode, append a turn on the cached prefix, decode again: each
    step's last-token logits equal HF's on the whole sequence so far."""
    model, hf = pair
    tok = ByteTokenizer()
    turns = [
        tok.render_conversation([("system", "be brief"), ("user", "ls")]),
        tok.render_item("tool", "a.py b.py") + tok.render_generation_prompt(),
        random_ids(5, seed=3),  # lengths 1, block_size-1, block_size, block_size+1 all occur
    ]
    store, seq = new_store(model), PagedSeq(free_list(1))
    got: list[tuple[int, torch.Tensor]] = []  # (position, logits)
    for turn in turns:
        for piece in (turn[:7], turn[7:]) if len(turn) > 7 else (turn,):
            logits = step(model, store, [seq.chunk(piece)])
            got.append((len(seq.tokens) - 1, logits[0]))
        for _ in range(3):  # greedy decode from our own logits
            nxt = int(got[-1][1].argmax())
            logits = step(model, store, [seq.chunk([nxt])])
            got.append((len(seq.tokens) - 1, logits[0]))
    ref = hf_logits(hf, seq.tokens)
    for pos, logits in got:
        assert_close(logits, ref[pos])


def test_blocks_offloaded_and_restored_to_different_ids(
    pair: tuple[LlamaModel, torch.nn.Module],
) -> None:
    """Copy a prefix's blocks to a host store, poison the device store, copy them back to
    other block ids, and continue: the result is as if nothing moved."""
    model, hf = pair
    prompt, more = random_ids(14, seed=4), random_ids(6, seed=5)
    device, host = new_store(model), KVStore(model.config.kv_spec(BLOCK_SIZE), 8, fill=NAN)
    seq = PagedSeq(free_list(2))
    step(model, device, [seq.chunk(prompt)])
    old_ids = list(seq.block_ids)
    copy_blocks(device.kv, host.kv, old_ids, list(range(len(old_ids))))
    device.kv.fill_(NAN)
    new_ids = [i for i in free_list(3) if i not in old_ids][: len(old_ids)]
    copy_blocks(host.kv, device.kv, list(range(len(old_ids))), new_ids)
    seq.block_ids = list(new_ids)
    got = [step(model, device, [seq.chunk(more)])[0]]
    for _ in range(2):
        got.append(step(model, device, [seq.chunk([int(got[-1].argmax())])])[0])
    ref = hf_logits(hf, seq.tokens)
    positions = [len(prompt) + len(more) - 1, len(prompt) + len(more), len(prompt) + len(more) + 1]
    for pos, logits in zip(positions, got, strict=True):
        assert_close(logits, ref[pos])


def _mixed_setup(model: LlamaModel) -> tuple[KVStore, list[PagedSeq], list[list[int]]]:
    """A store where B has 6 cached tokens and C 10, and the next chunks: A prefills 9
    fresh tokens, B 5 more on its prefix, C decodes one."""
    store, free = new_store(model), free_list(4)
    seqs = [PagedSeq(free), PagedSeq(free), PagedSeq(free)]
    step(model, store, [seqs[1].chunk(random_ids(6, seed=6))])
    step(model, store, [seqs[2].chunk(random_ids(10, seed=7))])
    return store, seqs, [random_ids(9, seed=8), random_ids(5, seed=9), random_ids(1, seed=10)]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)], ids=["ABC", "CAB"])
def test_mixed_prefill_and_decode_batch(
    pair: tuple[LlamaModel, torch.nn.Module], order: tuple[int, int, int]
) -> None:
    """Two sequences in prefill and one in decode in one step equal running each alone
    (on a copy of the store), and equal HF; no slot outside the tables is touched."""
    model, hf = pair
    store, seqs, nexts = _mixed_setup(model)
    alone_store = KVStore(store.spec, NUM_BLOCKS)
    alone_store.kv.copy_(store.kv)
    alone = []
    for seq, nxt in zip(seqs, nexts, strict=True):
        alone.append(step(model, alone_store, [seq.chunk(nxt)])[0])
        seq.tokens = seq.tokens[: -len(nxt)]  # undo, to chunk the same tokens again
    chunks = [seqs[i].chunk(nexts[i]) for i in order]
    together = step(model, store, chunks)
    for row, i in enumerate(order):
        torch.testing.assert_close(together[row], alone[i], atol=1e-5, rtol=1e-5)
        assert_close(together[row], hf_logits(hf, seqs[i].tokens)[-1])
    used = sorted({b for s in seqs for b in s.block_ids})
    unused = [b for b in range(NUM_BLOCKS) if b not in used]
    assert torch.isnan(store.kv[unused]).all()
    torch.testing.assert_close(
        store.kv[used], alone_store.kv[used], atol=1e-6, rtol=1e-6, equal_nan=True
    )


def test_pure_decode_batch_uses_every_length(pair: tuple[LlamaModel, torch.nn.Module]) -> None:
    """A decode-only step (the `paged_decode` path) over sequences whose lengths end
    mid-block, at a block end and just past it."""
    model, hf = pair
    store, free = new_store(model), free_list(5)
    prompts = [random_ids(n, seed=20 + n) for n in (1, BLOCK_SIZE - 1, BLOCK_SIZE, 2 * BLOCK_SIZE)]
    seqs = [PagedSeq(free) for _ in prompts]
    step(model, store, [s.chunk(p) for s, p in zip(seqs, prompts, strict=True)])
    nexts = random_ids(len(seqs), seed=30)
    batch = build_forward_batch(
        [s.chunk([t]) for s, t in zip(seqs, nexts, strict=True)], block_size=BLOCK_SIZE
    )
    assert batch.is_decode
    logits = model(batch, store)
    for row, seq in enumerate(seqs):
        assert_close(logits[row], hf_logits(hf, seq.tokens)[-1])


def test_demo_preset_matches_hf() -> None:
    """The demo preset's shapes (head_dim 64, tied head) on one chunked prompt."""
    model = init_random(LlamaConfig.demo(num_layers=2), seed=3)
    hf = hf_twin(model)
    ids = random_ids(23, seed=11)
    store, seq = new_store(model), PagedSeq(free_list(6))
    step(model, store, [seq.chunk(ids[:10])])
    logits = step(model, store, [seq.chunk(ids[10:])])
    assert_close(logits[0], hf_logits(hf, ids)[-1])


def test_bfloat16_on_cpu_tracks_float32() -> None:
    """A bf16 model (bf16 weights, activations and cache) stays near the fp32 model with
    the same (bf16-rounded) weights. Loose bound: 8 bits of mantissa through 2 layers and
    a 64-wide head; a wrong path (e.g. an fp32/bf16 cache mix-up) is off by O(logits)."""
    model32 = init_random(LlamaConfig.tiny(), seed=4)
    cfg16 = dataclasses.replace(model32.config, dtype="bfloat16")
    model16 = init_random(cfg16, seed=4)
    with torch.no_grad():
        for p32, p16 in zip(model32.parameters(), model16.parameters(), strict=True):
            p32.copy_(p16.float())  # same weights on both sides
    ids = random_ids(21, seed=12)
    out32 = step(model32, new_store(model32), [PagedSeq(free_list(7)).chunk(ids)])
    out16 = step(model16, new_store(model16), [PagedSeq(free_list(7)).chunk(ids)])
    assert out16.dtype == torch.float32
    scale = out32.abs().max()
    assert (out16 - out32).abs().max() <= 0.03 * scale  # measured 0.0066
