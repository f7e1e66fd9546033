"""Conversation items and their deterministic token rendering.

A conversation is the request's `instructions` and function `tools` (one system item)
followed by its items in order: messages, function calls and function call outputs.
Each item renders to tokens by a pure function of its own fields (see
`pagedkv.model.tokenizer`), so the same conversation gives the same token ids whether it
arrives as `previous_response_id` + new items on an open connection or as a full
replayed history on a new one; a reconnecting client therefore hashes to the same
blocks.

The model's own output renders with the same functions the engine uses while it
generates: an assistant message is `<|im_start|>assistant\\n{text}<|im_end|>\\n`, and the
prompt ends with the `<|im_start|>assistant\\n` header, so the tokens a session holds after
a turn equal the render of the conversation that the next turn will present.

With a merging tokenizer (a checkpoint's BPE, `exact_render` False) the generated ids
are not what re-encoding the text gives; the engine then remembers, per tenant, the ids
each item was generated as (`RenderMemo`), and rendering uses them, so a re-sent history
still renders to the tokens the session holds.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pagedkv.model.tokenizer import ChatTokenizer

ROLES = ("user", "assistant", "system", "developer")


@dataclass(frozen=True, slots=True)
class Message:
    """A message item: `role` in ROLES, its text parts joined."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The model's call of a function tool; `arguments` is a JSON string."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class FunctionCallOutput:
    """The client's result for a function call."""

    call_id: str
    output: str


Item = Message | FunctionCall | FunctionCallOutput


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function tool the model may call (`parameters` is a JSON schema or None)."""

    name: str
    description: str | None
    parameters: Mapping[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters) if self.parameters is not None else None,
        }

    def first_string_property(self) -> str | None:
        """The first property of the parameters schema whose type is "string", if any."""
        props = (self.parameters or {}).get("properties")
        if isinstance(props, Mapping):
            for key, schema in props.items():
                if isinstance(schema, Mapping) and schema.get("type") == "string":
                    return str(key)
        return None


def system_text(instructions: str | None, tools: Sequence[FunctionTool]) -> str | None:
    """The system item's text: the instructions, then the tools as canonical JSON.

    Canonical JSON (sorted keys, no spaces) makes the same tool list always give the
    same bytes, whatever key order the client sent.
    """
    parts: list[str] = []
    if instructions:
        parts.append(instructions)
    if tools:
        payload = json.dumps(
            [t.to_json() for t in tools], sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        parts.append(f"<tools>{payload}</tools>")
    return "\n\n".join(parts) if parts else None


class RenderMemo:
    """The token ids generated items were generated as, by (scope, item), bounded LRU.

    The scope is the tenant's hash salt (and `prompt_cache_key`), so a tenant can only
    ever get back the ids of its own outputs. Bounded by entries and by total ids; the
    oldest go first. Thread-safe (written on the engine thread, read where requests are
    rendered).
    """

    def __init__(self, max_entries: int = 4096, max_tokens: int = 4_000_000) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._items: OrderedDict[tuple[bytes, Item], tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, scope: bytes, item: Item, ids: Sequence[int]) -> None:
        key = (scope, item)
        value = tuple(ids)
        if len(value) > self.max_tokens:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._tokens -= len(old)
            self._items[key] = value
            self._tokens += len(value)
            while len(self._items) > self.max_entries or self._tokens > self.max_tokens:
                _, dropped = self._items.popitem(last=False)
                self._tokens -= len(dropped)

    def get(self, scope: bytes, item: Item) -> tuple[int, ...] | None:
        with self._lock:
            value = self._items.get((scope, item))
            if value is not None:
                self._items.move_to_end((scope, item))
            return value


def render_item(
    tok: ChatTokenizer, item: Item, memo: RenderMemo | None = None, scope: bytes = b""
) -> list[int]:
    """Token ids of one item (a pure function of its fields, and of what `memo` holds
    for it in `scope`: the ids it was generated as)."""
    if memo is not None:
        known = memo.get(scope, item)
        if known is not None:
            return list(known)
    if isinstance(item, Message):
        return tok.render_item(item.role, item.text)
    if isinstance(item, FunctionCall):
        return tok.render_function_call(item.call_id, item.name, item.arguments)
    if isinstance(item, FunctionCallOutput):
        return tok.render_function_call_output(item.call_id, item.output)
    raise TypeError(f"render_item: expected a conversation item, got {type(item).__name__}")


def render_prompt(
    tok: ChatTokenizer,
    *,
    instructions: str | None,
    tools: Sequence[FunctionTool],
    items: Iterable[Item],
    generation_prompt: bool = True,
    memo: RenderMemo | None = None,
    scope: bytes = b"",
) -> list[int]:
    """`<|bos|>`, the system item (if any), every item, then the assistant header.

    Without `generation_prompt` (a `generate: false` warm-up) the header is left off, so
    the next turn's prompt extends these tokens exactly.
    """
    ids = list(tok.prefix_ids)
    system = system_text(instructions, tools)
    if system is not None:
        ids += tok.render_item("system", system)
    for item in items:
        ids += render_item(tok, item, memo, scope)
    if generation_prompt:
        ids += tok.render_generation_prompt("assistant")
    return ids


def item_to_json(item: Item, *, item_id: str, status: str = "completed") -> dict[str, Any]:
    """An output item as the Responses API writes it (`message` or `function_call`)."""
    if isinstance(item, Message):
        return {
            "id": item_id,
            "type": "message",
            "role": item.role,
            "status": status,
            "content": [
                {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
            ],
        }
    if isinstance(item, FunctionCall):
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
        }
    raise TypeError(f"item_to_json: only model output items, got {type(item).__name__}")
