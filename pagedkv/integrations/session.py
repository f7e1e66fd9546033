"""PagedLM: a transformers model with pagedkv's sessions, pinning, offload and prefix
cache, driven synchronously from the calling thread.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pagedkv")
    lm = PagedLM(model, num_gpu_blocks=4096, num_host_blocks=8192)
    lm.open_session("agent-1")
    turn = lm.generate([history_ids], max_new_tokens=256, sessions=["agent-1"])[0]
    turn.tokens, turn.cached_tokens          # the prefix the session held was not recomputed

Each call submits every prompt to one `pagedkv.serving.Engine` and runs it until they
finish, so the prompts of one call are continuously batched together (uneven lengths,
chunked prefill, decodes of the ones that finished prefilling). A prompt is always the
full token history; the engine works out what its session (or, for a sessionless
prompt, the tenant's content-hash cache) already holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from torch import nn

from pagedkv.integrations.hf_model import PagedCausalLM
from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.serving.engine import Engine
from pagedkv.serving.engine_types import EngineConfig, EngineRequest, TurnDone, TurnFailed
from pagedkv.serving.generation import TokenSpec


class GenerationError(RuntimeError):
    """A prompt of a `PagedLM.generate` call failed in the engine (code and message
    from the engine: `over_capacity`, `context_length_exceeded`, ...)."""

    def __init__(self, index: int, code: str, message: str) -> None:
        super().__init__(f"prompt {index}: {code}: {message}")
        self.index = index
        self.code = code


@dataclass(frozen=True, slots=True)
class Generation:
    """One prompt's result.

    Attributes:
        tokens: the generated ids (a stop token, if one ended it, included).
        prompt_tokens: the prompt's length; cached_tokens: how many of them were not
            computed (held by the session, or found by content hash).
        finish_reason: "stop" (a stop token) or "length" (max_new_tokens).
        metrics: the engine's per-turn timings (ttft_s, queue_s, total_s, prefill_tokens).
    """

    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


class PagedLM:
    """A model on pagedkv's paged pool with sessions (see the module docstring).

    Args:
        model: a `PagedCausalLM`, or a transformers `*ForCausalLM` built with
            `attn_implementation="pagedkv"` (wrapped here).
        block_size, num_gpu_blocks, num_host_blocks, max_batch_tokens,
        prefill_chunk_tokens, seed, tenant: as `EngineConfig` (num_host_blocks=0: no
            host tier).
        scheduler: `SchedulerConfig` fields (max_pinned_sessions, reuse_prefix, ...).

    Not thread-safe: one caller at a time (the engine runs on the caller's thread).
    """

    def __init__(
        self,
        model: PagedCausalLM | nn.Module,
        *,
        block_size: int = 16,
        num_gpu_blocks: int = 1024,
        num_host_blocks: int = 2048,
        max_batch_tokens: int = 512,
        prefill_chunk_tokens: int | None = None,
        seed: int = 0,
        tenant: str = "default",
        **scheduler: Any,
    ) -> None:
        self.model = model if isinstance(model, PagedCausalLM) else PagedCausalLM(model)
        config = EngineConfig(
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            num_host_blocks=num_host_blocks,
            max_batch_tokens=max_batch_tokens,
            prefill_chunk_tokens=prefill_chunk_tokens or max_batch_tokens,
            # on a GPU restores overlap the prefill layer by layer unless the caller says
            # otherwise (on a CPU the copy and the prefill would share the cores)
            scheduler=SchedulerConfig(
                **{"layerwise_restore": self.model.device.type == "cuda", **scheduler}
            ),
            device=str(self.model.device),
            seed=seed,
            tenant=tenant,
        )
        self.engine = Engine(self.model, config)
        self._ids = itertools.count()
        self._sessions: set[str] = set()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def open_session(self, session_id: str) -> None:
        """Open a session: the KV of its prompts stays pinned (up to the scheduler's
        caps) between `generate` calls. Raises `ValueError` if it is already open."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty str, got {session_id!r}")
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} is already open")
        self.engine.open_session(session_id)
        self._sessions.add(session_id)
        self.engine.run_until_idle()

    def close_session(self, session_id: str) -> None:
        """Close a session; its full blocks stay findable by content hash."""
        self._sessions.discard(session_id)
        self.engine.close_session(session_id)
        self.engine.run_until_idle()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_token_ids: Sequence[int] = (),
        sessions: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """Generate for every prompt in one continuously batched run.

        Args:
            prompts: token-id lists, each the full history of its conversation.
            max_new_tokens, temperature, stop_token_ids: as `TokenSpec` (greedy by default).
            sessions: one open session id (or None) per prompt; None for all prompts
                means no sessions (each prompt reuses only the content-hash cache).

        Returns:
            one `Generation` per prompt, in order.

        Raises:
            ValueError: an empty prompt, an id outside the vocabulary, a prompt that with
                max_new_tokens would pass the context, an unknown or repeated session.
                Nothing is submitted then.
            GenerationError: the engine refused or failed a prompt (the others finish).
        """
        stops = tuple(stop_token_ids)
        vocab = self.vocab_size
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab:
                raise ValueError(f"stop_token_ids: {t!r} is not a token id in [0, {vocab})")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {temperature!r}")
        spec = TokenSpec(
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            stop_token_ids=tuple(int(t) for t in stops),
        )
        prompts = [self._check_prompt(i, p, max_new_tokens) for i, p in enumerate(prompts)]
        targets = list(sessions) if sessions is not None else [None] * len(prompts)
        if len(targets) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(targets)} sessions")
        named = [s for s in targets if s is not None]
        if len(set(named)) != len(named):
            raise ValueError("a session can run one prompt per call")
        unknown = sorted(set(named) - self._sessions)
        if unknown:
            raise ValueError(f"sessions not open: {unknown}")
        results: dict[str, Any] = {}
        rids: list[str] = []
        for prompt, target in zip(prompts, targets, strict=True):
            rid = f"g{next(self._ids)}"
            rids.append(rid)
            request = EngineRequest(
                request_id=rid,
                session_id=target if target is not None else f"ephemeral-{rid}",
                prompt_tokens=tuple(prompt),
                output=spec,
                ephemeral=target is None,
            )

            def emit(event: Any, rid: str = rid) -> None:
                if isinstance(event, (TurnDone, TurnFailed)):
                    results[rid] = event

            self.engine.submit(request, emit)
        self.engine.run_until_idle()
        out: list[Generation] = []
        for i, rid in enumerate(rids):
            event = results.get(rid)
            if event is None:
                raise GenerationError(i, "server_error", "the engine ended without an answer")
            if isinstance(event, TurnFailed):
                raise GenerationError(i, event.code, event.message)
            tokens = list(event.output_ids)
            reason = "stop" if tokens and tokens[-1] in spec.stop_token_ids else "length"
            out.append(
                Generation(
                    tokens, event.input_tokens, event.cached_tokens, reason, dict(event.metrics)
                )
            )
        return out

    def stats(self) -> dict[str, Any]:
        """The engine's counters (pool use, sessions by state, offloads, restores)."""
        return self.engine.stats()

    def _check_prompt(self, index: int, prompt: Sequence[int], max_new: int) -> list[int]:
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        ids = list(prompt)
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        vocab = self.vocab_size
        for pos, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab:
                raise ValueError(
                    f"prompt {index}: ids[{pos}]={t!r} is not a token id in [0, {vocab})"
                )
        ids = [int(t) for t in ids]
        limit = self.model.config.max_position
        if len(ids) + max_new > limit:
            raise ValueError(
                f"prompt {index}: {len(ids)} tokens + max_new_tokens={max_new} exceed the "
                f"model's context of {limit}"
            )
        return ids
