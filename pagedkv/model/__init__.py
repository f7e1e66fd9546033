"""pagedkv.model: the reference model runner on the paged KV cache.

A Llama-style decoder (`LlamaModel`, GQA, RoPE with Llama-3 scaling) whose attention
reads and writes the block-paged cache through `pagedkv.kernels`; its config
(`LlamaConfig`), Hugging Face-compatible safetensors weights, a byte-level tokenizer,
and `build_forward_batch`, which packs the sequences of one step into the kernels'
inputs.
"""

from __future__ import annotations

from pagedkv.model.config import MODEL_DTYPES, Llama3RopeScaling, LlamaConfig
from pagedkv.model.forward_batch import ForwardBatch, SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel, init_random
from pagedkv.model.protocol import PagedModel, PagedModelConfig
from pagedkv.model.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, ByteTokenizer, StreamDecoder
from pagedkv.model.weights import (
    hf_state_dict,
    load_pretrained,
    load_safetensors,
    load_weights,
    save_pretrained,
    save_safetensors,
)

__all__ = [
    "MODEL_DTYPES",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "ForwardBatch",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaModel",
    "PagedModel",
    "PagedModelConfig",
    "SeqChunk",
    "StreamDecoder",
    "build_forward_batch",
    "hf_state_dict",
    "init_random",
    "load_pretrained",
    "load_safetensors",
    "load_weights",
    "save_pretrained",
    "save_safetensors",
]
