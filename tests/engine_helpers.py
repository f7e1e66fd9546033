"""Shared by the engine tests: greedy output specs and a from-scratch reference decode."""

from __future__ import annotations

from typing import Any

import torch

from pagedkv.model.forward_batch import SeqChunk, build_forward_batch
from pagedkv.model.llama import LlamaModel
from pagedkv.model.tokenizer import ByteTokenizer
from pagedkv.serving.conversation import Item, Message, render_prompt
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineRequest, TurnDone
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


def run_conversations(engine: Engine, model: LlamaModel) -> list[Item]:
    """Four sessions, three turns each, one at a time on `engine` (small pools push them
    to the host and back between turns): every output equals a from-scratch recompute's.
    Closes the sessions and checks the invariants; returns the output items in order."""
    sessions = [f"s{i}" for i in range(4)]
    convs: dict[str, list[Item]] = {sid: [Message("user", f"{sid} " * 20)] for sid in sessions}
    items: list[Item] = []
    for sid in sessions:
        engine.open_session(sid)
    n = 0
    for turn in range(3):
        for sid in sessions:
            prompt = render_prompt(TOK, instructions=None, tools=(), items=convs[sid])
            n += 1
            events: list[Any] = []
            engine.submit(
                EngineRequest(
                    request_id=f"r{n}", session_id=sid, prompt_tokens=tuple(prompt),
                    output=greedy(4),
                ),
                events.append,
            )  # fmt: skip
            engine.run_until_idle()
            done = events[-1]
            assert isinstance(done, TurnDone), events
            assert done.item == reference(model, prompt, greedy(4))[1], (turn, sid)
            assert done.item is not None
            items.append(done.item)
            convs[sid] += [done.item, Message("user", f"turn {turn} " * 5)]
    for sid in sessions:
        engine.close_session(sid)
    engine.run_until_idle()
    engine.scheduler.check_invariants()
    engine.cache.check_invariants()
    return items
