"""Output programs: which token comes next while one output item is generated.

Generated tokens must re-render exactly when the client sends the item back, so every
token is either *forced* (the item's framing: the tool-call header, the JSON around the
arguments, `<|im_end|>\\n`) or *sampled from the model's logits* restricted to characters
that round-trip through JSON and UTF-8 unchanged (a grammar mask, as constrained
decoding does):

- a message samples printable ASCII and newlines, and may stop with `<|im_end|>` (not
  as its first token), up to `max_output_tokens` characters;
- a function call (the `tool_choice` hook) forces `<|tool_call|>{call_id}\\n{name}\\n`
  and `{"key": "`, samples the string value from letters, digits, space and `_-./`, then
  forces `"}`. Its arguments are a JSON object with one string property: the first
  string property of the tool's schema, else "input".

The tokens a program appends are exactly the item's render after the
`<|im_start|>assistant\\n` header that ends the prompt (see `pagedkv.serving.conversation`).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pagedkv.model.tokenizer import ChatTokenizer
from pagedkv.serving.conversation import FunctionCall, Item, Message

_TEXT_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
_ARG_CHARS = string.ascii_letters + string.digits + " _-./"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    """What one response generates.

    Attributes:
        max_output_tokens: sampled tokens at most (>= 1).
        temperature: 0 is greedy; otherwise softmax sampling at this temperature.
        call_id, name, arg_key: set for a function call; None for a message.
    """

    max_output_tokens: int
    temperature: float = 1.0
    call_id: str | None = None
    name: str | None = None
    arg_key: str = "input"

    def __post_init__(self) -> None:
        if self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if (self.call_id is None) != (self.name is None):
            raise ValueError("a function call needs both call_id and name")

    @property
    def is_function_call(self) -> bool:
        return self.call_id is not None


class Step(NamedTuple):
    """One decision: tokens to append (then compute), the visible delta, and whether the
    item is complete (the tokens then close it: no more logits are needed)."""

    tokens: list[int]
    delta: str
    done: bool


class CharMasks:
    """The allowed token ids of the sampled spans, per device (built once each)."""

    def __init__(self, tok: ChatTokenizer) -> None:
        self.text_ids = tok.ids_made_of(_TEXT_CHARS)
        self.text_stop_ids = [*self.text_ids, tok.im_end_id]
        self.arg_stop_ids = [*tok.ids_made_of(_ARG_CHARS), tok.im_end_id]
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def ids(self, name: str, device: torch.device) -> torch.Tensor:
        """int64 `[n]` allowed ids of the span `name` on `device`."""
        key = (name, str(device))
        t = self._cache.get(key)
        if t is None:
            t = torch.tensor(getattr(self, name), dtype=torch.int64, device=device)
            self._cache[key] = t
        return t


class OutputProgram:
    """The state of one output item being generated (see the module docstring).

    `allowed()` names the mask of the next sampled token (None: the next step is forced
    and the logits are not needed); `advance(token)` takes the sampled token (or None
    for a forced step) and returns the `Step`.
    """

    def __init__(self, spec: OutputSpec, tok: ChatTokenizer) -> None:
        self.spec = spec
        self.tok = tok
        self.sampled: list[int] = []  # the sampled characters (text or argument value)
        self.num_tokens = 0  # every token appended for the item after the header
        self.done = False
        self.hit_limit = False  # stopped at max_output_tokens rather than by choice
        self.steered = False  # cut short by `cut()` (a steer)
        self._started = False
        self.appended: list[int] = []  # every token appended for the item, in order

    def max_tokens(self) -> int:
        """The most tokens this item can append after the prompt: the forced header of a
        function call (its id, name and JSON-encoded key, as `_advance_call` encodes
        them), every sampled token, and the closing tokens."""
        spec = self.spec
        total = spec.max_output_tokens + len(self._close())
        if spec.is_function_call:
            opening = "{" + json.dumps(spec.arg_key) + ': "'
            header = self.tok.encode(f"{spec.call_id}\n{spec.name}\n{opening}")
            total += 1 + len(header) + len(self.tok.encode('"}'))
        return total

    def allowed(self) -> str | None:
        """Name of the `CharMasks` span for the next token, or None when it is forced."""
        if self.spec.is_function_call:
            return "arg_stop_ids" if self._started else None
        return "text_stop_ids" if self.sampled else "text_ids"

    def advance(self, token: int | None) -> Step:
        """Take the next token (sampled under `allowed()`, or None when forced)."""
        if self.done:
            raise RuntimeError("OutputProgram.advance: the item is already complete")
        step = (
            self._advance_call(token) if self.spec.is_function_call else self._advance_text(token)
        )
        self.num_tokens += len(step.tokens)
        self.appended += step.tokens
        self.done = step.done
        return step

    @property
    def can_cut(self) -> bool:
        """Whether `cut()` may end the item now: a message not yet complete. (A function
        call is never cut: its arguments would not be the JSON the client expects.)"""
        return not self.done and not self.spec.is_function_call

    def cut(self) -> Step:
        """End the message here, at a token boundary, which is always a safe one: every
        sampled token's text is whole printable ASCII characters, so the text so far is
        complete UTF-8. The closing tokens are forced, as when the item stops by choice."""
        if not self.can_cut:
            raise RuntimeError("OutputProgram.cut: only an unfinished message can be cut")
        self.steered = True
        self.done = True
        closing = self._close()
        self.num_tokens += len(closing)
        self.appended += closing
        return Step(closing, "", True)

    def _close(self) -> list[int]:
        return [self.tok.im_end_id, *self.tok.newline_ids]

    def _advance_text(self, token: int | None) -> Step:
        assert token is not None
        if token == self.tok.im_end_id:
            return Step(self._close(), "", True)
        self.sampled.append(token)
        done = len(self.sampled) >= self.spec.max_output_tokens
        self.hit_limit = done
        return Step([token, *self._close()] if done else [token], self.tok.piece(token), done)

    def _advance_call(self, token: int | None) -> Step:
        spec = self.spec
        if not self._started:  # the prompt's logits: force the header and `{"key": "`
            self._started = True
            opening = "{" + json.dumps(spec.arg_key) + ': "'
            header = self.tok.encode(f"{spec.call_id}\n{spec.name}\n{opening}")
            return Step([self.tok.tool_call_id, *header], opening, False)
        assert token is not None
        closing = self.tok.encode('"}')
        if token == self.tok.im_end_id:
            return Step([*closing, *self._close()], '"}', True)
        self.sampled.append(token)
        if len(self.sampled) >= spec.max_output_tokens:
            self.hit_limit = True
            piece = self.tok.piece(token)
            return Step([token, *closing, *self._close()], piece + '"}', True)
        return Step([token], self.tok.piece(token), False)

    @property
    def output_ids(self) -> tuple[int, ...]:
        """The sampled token ids (framing left out)."""
        return tuple(self.sampled)

    @property
    def text(self) -> str:
        """The sampled characters so far."""
        return "".join(self.tok.piece(t) for t in self.sampled)

    def item(self) -> Item:
        """The finished output item, exactly as it re-renders."""
        if not self.spec.is_function_call:
            return Message("assistant", self.text)
        assert self.spec.call_id is not None and self.spec.name is not None
        arguments = "{" + json.dumps(self.spec.arg_key) + ': "' + self.text + '"}'
        return FunctionCall(self.spec.call_id, self.spec.name, arguments)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSpec:
    """Free generation over the whole vocabulary (token ids in, token ids out): what an
    embedder driving a model through `Engine` directly asks for (no chat framing, no
    grammar mask).

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 is greedy; otherwise softmax sampling at this temperature.
        stop_token_ids: generation ends after any of these (it is kept in the output).
    """

    max_new_tokens: int
    temperature: float = 0.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be token ids >= 0, got {t!r}")


class TokenProgram:
    """The program of a `TokenSpec`: every token sampled from the full vocabulary (the
    mask "all"), none forced; the same surface as `OutputProgram` for the engine."""

    def __init__(self, spec: TokenSpec) -> None:
        self.spec = spec
        self.sampled: list[int] = []
        self.done = False
        self.hit_limit = False
        self.steered = False

    @property
    def num_tokens(self) -> int:
        return len(self.sampled)

    def max_tokens(self) -> int:
        return self.spec.max_new_tokens

    def allowed(self) -> str:
        return "all"

    def advance(self, token: int | None) -> Step:
        if self.done:
            raise RuntimeError("TokenProgram.advance: generation is already complete")
        assert token is not None
        self.sampled.append(token)
        self.hit_limit = len(self.sampled) >= self.spec.max_new_tokens
        self.done = self.hit_limit or token in self.spec.stop_token_ids
        if token in self.spec.stop_token_ids:
            self.hit_limit = False
        return Step([token], "", self.done)

    @property
    def can_cut(self) -> bool:
        return not self.done

    def cut(self) -> Step:
        if not self.can_cut:
            raise RuntimeError("TokenProgram.cut: generation is already complete")
        self.steered = self.done = True
        return Step([], "", True)

    def item(self) -> None:
        return None

    @property
    def output_ids(self) -> tuple[int, ...]:
        return tuple(self.sampled)


def make_program(spec: OutputSpec | TokenSpec, tok: ChatTokenizer) -> OutputProgram | TokenProgram:
    """The program that generates `spec`."""
    if isinstance(spec, TokenSpec):
        return TokenProgram(spec)
    return OutputProgram(spec, tok)


def sample_rows(
    logits: torch.Tensor,
    rows: list[int],
    allowed: torch.Tensor | None,
    temperatures: list[float],
    generator: torch.Generator,
) -> list[int]:
    """Sample one token per row among the `allowed` ids (greedy where temperature is 0).

    Args:
        logits: fp32 `[B, vocab]` on any device.
        rows: the rows to sample; allowed: int64 `[n]` ids on logits' device, or None
            for the whole vocabulary.
        temperatures: one per row.
        generator: a CPU generator (sampling runs on the host over n <= 100 ids).

    Returns:
        the chosen token id per row.
    """
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    sub = logits.index_select(0, index)
    if allowed is not None:
        sub = sub.index_select(1, allowed)
    sub = sub.float().cpu()  # [R, n]
    allowed_cpu = None if allowed is None else allowed.cpu()
    out: list[int] = []
    for r, temp in enumerate(temperatures):
        row = sub[r]
        j = int(torch.argmax(row))
        if temp > 0.0:
            # shifted so the best logit is 0: a tiny temperature sends the others to
            # -inf (probability 0) instead of overflowing to inf/NaN; a row that still
            # has no usable distribution is sampled greedily
            probs = torch.softmax((row - row.max()) / temp, dim=-1)
            if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0.0:
                j = int(torch.multinomial(probs, 1, generator=generator))
        out.append(j if allowed_cpu is None else int(allowed_cpu[j]))
    return out
