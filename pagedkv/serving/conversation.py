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
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pagedkv.model.tokenizer import ByteTokenizer, ChatTokenizer

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
    """The token ids generated items were generated as, by (scope, item), bounded.

    The scope is the tenant's hash salt (and `prompt_cache_key`), so a tenant can only
    ever get back the ids of its own outputs. Bounded by entries and by bytes (4 per id
    plus the item's text); ids are stored packed (`array("i")`). Over a bound the oldest
    entry of the scope holding the most bytes goes first, so one tenant that floods it
    evicts its own entries, not everyone's. Thread-safe (written on the engine thread,
    read where requests are rendered).
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._scopes: dict[bytes, OrderedDict[Item, array[int]]] = {}
        self._scope_bytes: dict[bytes, int] = {}
        self._entries = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._entries

    @property
    def num_bytes(self) -> int:
        return self._bytes

    @staticmethod
    def _cost(item: Item, ids: array[int]) -> int:
        text = sum(len(v) for v in vars_of(item))
        return 4 * len(ids) + text + 64

    def put(self, scope: bytes, item: Item, ids: Sequence[int]) -> None:
        value = array("i", ids)
        cost = self._cost(item, value)
        if cost > self.max_bytes:
            return
        with self._lock:
            entries = self._scopes.setdefault(scope, OrderedDict())
            old = entries.pop(item, None)
            if old is not None:
                self._drop_cost(scope, self._cost(item, old))
            entries[item] = value
            self._entries += 1
            self._bytes += cost
            self._scope_bytes[scope] = self._scope_bytes.get(scope, 0) + cost
            while self._entries > self.max_entries or self._bytes > self.max_bytes:
                victim = max(self._scope_bytes, key=self._scope_bytes.__getitem__)
                dropped_item, dropped = self._scopes[victim].popitem(last=False)
                self._drop_cost(victim, self._cost(dropped_item, dropped))

    def _drop_cost(self, scope: bytes, cost: int) -> None:
        self._entries -= 1
        self._bytes -= cost
        left = self._scope_bytes[scope] - cost
        if self._scopes[scope]:
            self._scope_bytes[scope] = left
        else:
            del self._scope_bytes[scope], self._scopes[scope]

    def get(self, scope: bytes, item: Item) -> list[int] | None:
        with self._lock:
            entries = self._scopes.get(scope)
            value = None if entries is None else entries.get(item)
            if value is None:
                return None
            entries.move_to_end(item)  # type: ignore[union-attr]
            return value.tolist()


def vars_of(item: Item) -> list[str]:
    """The text fields of an item (what a memo entry costs besides its ids)."""
    if isinstance(item, Message):
        return [item.role, item.text]
    if isinstance(item, FunctionCall):
        return [item.call_id, item.name, item.arguments]
    return [item.call_id, item.output]


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
    max_tokens: int | None = None,
) -> list[int]:
    """`<|bos|>`, the system item (if any), every item, then the assistant header.

    Without `generation_prompt` (a `generate: false` warm-up) the header is left off, so
    the next turn's prompt extends these tokens exactly. With `max_tokens` the result is
    the first `max_tokens` ids of that render, and no item after the one that reaches
    it is taken from `items` (the router's bounded look at a prompt's prefix); with the
    byte tokenizer (and no `memo`) the text of the item that reaches it is also cut to
    the budget left before it is encoded (`cut_to_budget`), which leaves those ids as
    they are and bounds the work by `max_tokens`, not by the text's length.
    """
    cut = max_tokens is not None and memo is None and isinstance(tok, ByteTokenizer)
    ids = list(tok.prefix_ids)
    system = system_text(instructions, tools)
    if system is not None:
        if cut:
            assert max_tokens is not None
            system = system[: max(max_tokens - len(ids), 0)]
        ids += tok.render_item("system", system)
    if max_tokens is not None and len(ids) >= max_tokens:
        return ids[:max_tokens]
    for item in items:
        if cut:
            assert max_tokens is not None
            item = cut_to_budget(item, max_tokens - len(ids))
        ids += render_item(tok, item, memo, scope)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    if generation_prompt:
        ids += tok.render_generation_prompt("assistant")
    return ids if max_tokens is None else ids[:max_tokens]


def cut_to_budget(item: Item, budget: int) -> Item:
    """`item` with its free text (message text, call arguments, call output) cut to
    `budget` characters. With a byte-level tokenizer (`ByteTokenizer`: every character
    is one to four ids, and a text's prefix encodes to a prefix of its ids) the first
    `budget` ids of the cut item's render are those of the whole item's: the text comes
    after a non-empty header, and `budget` characters give at least `budget` ids."""
    budget = max(budget, 0)
    if isinstance(item, Message):
        return item if len(item.text) <= budget else Message(item.role, item.text[:budget])
    if isinstance(item, FunctionCall):
        if len(item.arguments) <= budget:
            return item
        return FunctionCall(item.call_id, item.name, item.arguments[:budget])
    if isinstance(item, FunctionCallOutput):
        if len(item.output) <= budget:
            return item
        return FunctionCallOutput(item.call_id, item.output[:budget])
    return item


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
