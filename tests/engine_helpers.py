"""Shared by the engine tests: greedy output specs and a from-scratch reference decode."""

from __future__ import annotations

from typing import Any

import torch

from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.serving.conversation import Item
from pagedkv.serving.generation import CharMasks, OutputProgram, OutputSpec, sample_rows
from pagedkv.tiers.kv_store import KVStore

TOK = ByteTokenizer()


def greedy(max_tokens: int = 8, **kw: Any) -> OutputSpec:
    return OutputSpec(max_output_tokens=max_tokens, temperature=0.0, **kw)


def reference(model: LlamaModel, prompt: list[int], spec: OutputSpec) -> tuple[list[int], Item]:
    """Greedy decode by full recomputation: returns (tokens after the prompt, item)."""
    program = OutputProgram(spec, TOK)
    masks = CharMasks(TOK)
    seq = list(prompt)
    store = KVStore(model.config.kv_spec(16), (len(seq) + 256) // 16 + 1)
    gen = torch.Generator().manual_seed(0)
    while not program.done:
        n = -(-len(seq) // 16)
        batch = build_forward_batch([SeqChunk(list(range(n)), 0, seq)], block_size=16)
        logits = model(batch, store)
        mask = program.allowed()
        token = None
        if mask is not None:
            token = sample_rows(logits, [0], masks.ids(mask, logits.device), [0.0], gen)[0]
        seq += program.advance(token).tokens
    return seq[len(prompt) :], program.item()
