"""transformers models on pagedkv: `attn_implementation="pagedkv"` against eager.

Tiny random configs built here (nothing downloaded): Llama, Qwen2 (q/k/v biases) and
Mistral, each with GQA and a different head size. Greedy generation through `PagedLM`
(three uneven prompts continuously batched, 32 steps) must give exactly the tokens of
transformers' own eager `generate` on each prompt alone; logits of prefill, chunked
extension and decode steps must match eager's within fp32 tolerance. Then sessions:
turn 2 reuses turn 1, also after an offload to the host tier and after a reconnect.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers

from pagedkv.integrations.hf_model import (
    PagedCausalLM,
    UnsupportedModelError,
    check_supported,
    from_config,
)
from pagedkv.integrations.session import PagedLM
from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.tiers.kv_store import KVStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 160


def _configs() -> dict[str, Any]:
    common = dict(vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, eos_token_id=None)  # fmt: skip
    return {
        "llama": transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **common
        ),
        "qwen2": transformers.Qwen2Config(
            hidden_size=96, num_attention_heads=6, num_key_value_heads=2, **common
        ),
        "mistral": transformers.MistralConfig(
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=None,
            **common,
        ),
    }


ARCHS = sorted(_configs())


def _pair(arch: str, seed: int = 3) -> tuple[PagedCausalLM, Any]:
    cfg = _configs()[arch]
    lm = from_config(cfg, seed=seed)
    ref = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="eager"
    ).eval()
    ref.load_state_dict(lm.hf.state_dict())
    return lm, ref


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _eager_greedy(ref: Any, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
            do_sample=False, pad_token_id=VOCAB - 1,
        )  # fmt: skip
    assert out.shape[1] == len(prompt) + steps  # no eos in these configs: never stops early
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_eager_for_a_batch_of_uneven_prompts(arch: str) -> None:
    lm, ref = _pair(arch)
    prompts = _prompts(1, (5, 37, 20))
    paged = PagedLM(lm, num_gpu_blocks=64, num_host_blocks=0, max_batch_tokens=48)
    outs = paged.generate(prompts, max_new_tokens=32)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.tokens == _eager_greedy(ref, prompt, 32)
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)
    # the 37-token prompt was prefilled in chunks (48-token budget shared with the others)
    assert paged.stats()["steps"] >= 32
    assert paged.stats()["gpu_blocks"]["in_use"] == 0  # sessionless: nothing held


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_eager_for_prefill_extension_and_decode(arch: str) -> None:
    lm, ref = _pair(arch, seed=5)
    a, b = _prompts(2, (23, 9))
    store = KVStore(lm.config.kv_spec(16), 16)
    with torch.no_grad():
        want_a = ref(torch.tensor([a])).logits[0].float()
        want_b = ref(torch.tensor([b])).logits[0].float()
    # step 1: a's first 17 tokens and b whole; step 2: the rest of a (extension on its
    # cached prefix) with b decoding its last token again as a new position
    batch = build_forward_batch([SeqChunk([0, 1], 0, a[:17]), SeqChunk([2], 0, b)], block_size=16)
    got = lm(batch, store)
    torch.testing.assert_close(got[0], want_a[16], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want_b[-1], atol=1e-4, rtol=1e-4)
    batch = build_forward_batch([SeqChunk([0, 1], 17, a[17:])], block_size=16)
    torch.testing.assert_close(lm(batch, store)[0], want_a[-1], atol=1e-4, rtol=1e-4)
    nxt = int(want_a[-1].argmax())
    with torch.no_grad():
        want = ref(torch.tensor([[*a, nxt]])).logits[0, -1].float()
    batch = build_forward_batch([SeqChunk([0, 1], len(a), [nxt])], block_size=16)
    assert batch.is_decode
    torch.testing.assert_close(lm(batch, store)[0], want, atol=1e-4, rtol=1e-4)


def test_turn_two_reuses_turn_one_pinned_offloaded_and_after_a_reconnect() -> None:
    lm, ref = _pair("qwen2", seed=7)
    paged = PagedLM(
        lm, num_gpu_blocks=24, num_host_blocks=64, max_pinned_sessions=1, layerwise_restore=True
    )
    first, other = _prompts(3, (40, 30))
    paged.open_session("a")
    t1 = paged.generate([first], max_new_tokens=8, sessions=["a"])[0]
    assert t1.tokens == _eager_greedy(ref, first, 8) and t1.cached_tokens == 0
    history = [*first, *t1.tokens]
    # pinned: turn 2 computes only its new tokens
    turn2 = [*history, 11, 12, 13]
    t2 = paged.generate([turn2], max_new_tokens=8, sessions=["a"])[0]
    assert t2.cached_tokens == len(history)
    assert t2.metrics["prefill_tokens"] == 3
    assert t2.tokens == _eager_greedy(ref, turn2, 8)
    # offloaded: another session takes the only pinned slot, "a" goes to the host tier
    paged.open_session("b")
    paged.generate([other], max_new_tokens=4, sessions=["b"])
    turn3 = [*turn2, *t2.tokens, 21, 22]
    t3 = paged.generate([turn3], max_new_tokens=8, sessions=["a"])[0]
    metrics = paged.stats()["scheduler"]
    assert metrics["sessions_offloaded"] >= 1 and metrics["blocks_restored"] >= 1
    assert metrics["restores_layerwise"] >= 1  # the attention waited per layer
    assert t3.cached_tokens >= (len(turn3) - 2) // 16 * 16
    assert t3.tokens == _eager_greedy(ref, turn3, 8)
    # reconnect: a new session with the full history finds its full blocks by content
    paged.close_session("a")
    paged.open_session("a2")
    turn4 = [*turn3, *t3.tokens, 31]
    t4 = paged.generate([turn4], max_new_tokens=8, sessions=["a2"])[0]
    assert t4.cached_tokens >= (len(turn4) - 1) // 16 * 16 - 16
    assert t4.cached_tokens > 0.8 * len(turn4)
    assert t4.tokens == _eager_greedy(ref, turn4, 8)
    for sid in ("b", "a2"):
        paged.close_session(sid)
    assert paged.stats()["gpu_blocks"]["in_use"] == 0


def test_bad_input_is_refused_before_anything_runs() -> None:
    lm, _ref = _pair("llama")
    paged = PagedLM(lm, num_gpu_blocks=8, num_host_blocks=0)
    before = paged.stats()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompts": [[1, 2, VOCAB]]}, "not a token id"),
        ({"prompts": [[1, -1]]}, "not a token id"),
        ({"prompts": [[]]}, "empty"),
        ({"prompts": [[1, 2.0]]}, "not a token id"),
        ({"prompts": [[1] * 500]}, "context"),
        ({"prompts": [[1]], "sessions": ["nope"]}, "not open"),
        ({"prompts": [[1], [2]], "sessions": ["x"]}, "sessions"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            paged.generate(max_new_tokens=16, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        paged.generate([[1]], max_new_tokens=0)
    assert paged.stats() == before


def test_a_plain_forward_without_the_runner_is_refused() -> None:
    lm, _ref = _pair("llama")
    with pytest.raises(UnsupportedModelError, match="PagedCausalLM"):
        lm.hf(torch.tensor([[1, 2, 3]]))


def test_a_config_switched_to_another_attention_is_caught() -> None:
    cfg = _configs()["llama"]
    lm = from_config(cfg)
    lm.hf.config._attn_implementation = "eager"  # what sharing a config object does
    batch = build_forward_batch([SeqChunk([0], 0, [1, 2, 3])], block_size=16)
    with pytest.raises(UnsupportedModelError, match="changed to 'eager'"):
        lm(batch, KVStore(lm.config.kv_spec(16), 2))


def test_unsupported_attention_features_are_named() -> None:
    mistral = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=256,
        max_position_embeddings=4096,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        check_supported(mistral)
    check_supported(mistral, max_position=256)  # the window covers the context: exact
    lm = from_config(mistral, max_position=256)
    assert lm.config.max_position == 256
    qwen = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
        sliding_window=128, max_window_layers=1, max_position_embeddings=1024,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_supported(qwen)
    gemma2 = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"soft-capping|sliding"):
        check_supported(gemma2)
    eager = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(_configs()["llama"]), attn_implementation="eager"
    )
    with pytest.raises(UnsupportedModelError, match="attn_implementation='pagedkv'"):
        PagedCausalLM(eager)


def test_models_that_would_run_wrong_are_refused_up_front() -> None:
    tiny = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)
    bloom = transformers.BloomConfig(n_layer=1, **{"n_head": 4, "hidden_size": 64,
                                                   "vocab_size": VOCAB})  # fmt: skip
    # BLOOM computes attention itself (no attention interface): packed sequences would
    # see each other and nothing would reach the pool
    with pytest.raises(UnsupportedModelError, match="computes attention itself"):
        from_config(bloom, max_position=256)
    with pytest.raises(UnsupportedModelError, match="differential attention"):
        check_supported(transformers.DiffLlamaConfig(num_hidden_layers=1, **tiny))
    with pytest.raises(UnsupportedModelError, match="attention sinks"):
        check_supported(transformers.GptOssConfig(num_hidden_layers=1, **tiny))
    with pytest.raises(UnsupportedModelError, match="NoPE"):
        check_supported(transformers.Llama4TextConfig(num_hidden_layers=1, **tiny))


def test_a_second_attention_call_for_a_layer_in_one_step_is_refused() -> None:
    from pagedkv.integrations.hf_model import PagedStep, paged_attention_forward

    lm, _ref = _pair("llama")
    store = KVStore(lm.config.kv_spec(16), 4)
    step = PagedStep(build_forward_batch([SeqChunk([0], 0, [1, 2, 3])], block_size=16), store)
    attn = lm.hf.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    paged_attention_forward(attn, q, kv, kv, None, pagedkv=step)
    before = store.kv.clone()
    with pytest.raises(UnsupportedModelError, match="twice for layer 0"):
        paged_attention_forward(attn, q, kv * 2, kv * 2, None, pagedkv=step)
    torch.testing.assert_close(store.kv, before, equal_nan=True)  # nothing overwritten


def test_stop_ids_and_prompt_ids_are_checked_not_coerced() -> None:
    import numpy as np

    lm, _ref = _pair("llama")
    paged = PagedLM(lm, num_gpu_blocks=8, num_host_blocks=0)
    for bad in ([2.9], ["5"], [VOCAB], [True]):
        with pytest.raises(ValueError, match="stop_token_ids"):
            paged.generate([[1, 2]], max_new_tokens=2, stop_token_ids=bad)
    out = paged.generate([[np.int64(1), np.int32(2)]], max_new_tokens=2)[0]
    assert len(out.tokens) == 2
