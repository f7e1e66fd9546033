"""A tiny Hugging Face checkpoint directory, built in the test (nothing downloaded): a
byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens, and a
random Qwen2 model whose vocabulary is larger than the tokenizer's (padded rows, as
real checkpoints have)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "hello world, the agent calls a tool and reads its output.",
    "user assistant system tool function call arguments",
    "The quick brown fox jumps over the lazy dog 0123456789",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<tool_response>"]


def make_tokenizer(specials: list[str] = SPECIALS):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def make_checkpoint(root: Path, *, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    import torch
    import transformers

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False})
    )
    vocab = -(-tok.get_vocab_size() // 64) * 64  # padded to a multiple of 64
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(root, safe_serialization=True)
    return root
