"""ChatMLTokenizer: a checkpoint's own tokenizer (`tokenizer.json`) behind the server.

The server renders conversations ChatML style (`pagedkv.model.tokenizer`): each item
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, tool calls after a tool-call token, tool
results after a tool-result token. A checkpoint's tokenizer serves when it has these as
single special tokens: `<|im_start|>` and `<|im_end|>`, and `<|tool_call|>` or
`<tool_call>`, and `<|tool_result|>` or `<tool_response>` (the Qwen2/2.5/3 family has
them all). Otherwise loading fails naming what is missing: a different chat framing
would need the model's own template, which pagedkv does not guess.

Client text never becomes a special token (`encode_special_tokens`): a user who writes
`<|im_end|>` gets the characters, not the framing. Generated text is sampled from
tokens whose text on its own (`piece`) is made of the allowed characters, so every delta
is whole characters; because BPE merges differently when the text is re-encoded, the
engine remembers the ids each item was generated as (`exact_render` is False, see
`pagedkv.serving.conversation.RenderMemo`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pagedkv.integrations.hf_model import UnsupportedModelError

_SPECIALS: dict[str, tuple[str, ...]] = {
    "im_start": ("<|im_start|>",),
    "im_end": ("<|im_end|>",),
    "tool_call": ("<|tool_call|>", "<tool_call>"),
    "tool_result": ("<|tool_result|>", "<tool_response>"),
}


def _check_text(op: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(value).__name__}")
    return value


def _check_role(op: str, value: object, field: str = "role") -> None:
    text = _check_text(op, field, value)
    if not text or "\n" in text:
        raise ValueError(f"{op}: {field} must be non-empty without newlines, got {text!r}")


class ChatMLTokenizer:
    """A `tokenizers.Tokenizer` with ChatML special tokens, as a `ChatTokenizer`.

    Args:
        tokenizer: the loaded tokenizer (copied: the caller's is not changed).
        bos_token: the beginning-of-sequence token to start every conversation with, if
            the checkpoint uses one (None: no prefix).

    Raises:
        UnsupportedModelError: a required special token is missing (named).
    """

    exact_render = False

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str | None = None) -> None:
        # every added token becomes special, then `encode_special_tokens` makes client
        # text never turn into any of them: Qwen's own file marks <tool_call> and
        # <tool_response> non-special, which would let a user forge the framing
        spec = json.loads(tokenizer.to_str())
        for entry in spec.get("added_tokens") or ():
            entry["special"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.encode_special_tokens = True
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        ids: dict[str, int] = {}
        missing: list[str] = []
        for name, candidates in _SPECIALS.items():
            found = [tok.token_to_id(c) for c in candidates]
            hit = next((i for i in found if i is not None), None)
            if hit is None:
                missing.append(" or ".join(candidates))
            else:
                ids[name] = hit
        if missing:
            raise UnsupportedModelError(
                f"the tokenizer lacks the chat tokens {missing}; pagedkv's server renders "
                "ChatML and needs each as one special token"
            )
        self.im_start_id = ids["im_start"]
        self.im_end_id = ids["im_end"]
        self.tool_call_id = ids["tool_call"]
        self.tool_result_id = ids["tool_result"]
        bos = None if bos_token is None else tok.token_to_id(bos_token)
        if bos_token is not None and bos is None:
            raise UnsupportedModelError(f"the bos token {bos_token!r} is not in the vocabulary")
        self.prefix_ids: tuple[int, ...] = () if bos is None else (bos,)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._special |= set(ids.values())
        self.newline_ids: tuple[int, ...] = tuple(self.encode("\n"))
        self._pieces = self._all_pieces()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatMLTokenizer:
        """The tokenizer of a checkpoint directory (`tokenizer.json`, and the bos token
        from `tokenizer_config.json` when it adds one).

        Raises:
            FileNotFoundError: no tokenizer.json.
            UnsupportedModelError: as the constructor.
        """
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json (a fast tokenizer file)")
        bos: str | None = None
        config_file = root / "tokenizer_config.json"
        if config_file.is_file():
            config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
            token = config.get("bos_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and config.get("add_bos_token", False):
                bos = token
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # the binding raises a bare Exception on a bad file
            raise UnsupportedModelError(f"{file}: not a tokenizers file: {err}") from None
        return cls(tokenizer, bos_token=bos)

    def _all_pieces(self) -> list[str]:
        """Each token's text on its own, read after an anchor token so tokenizers that
        drop a leading space at the start of a text (metaspace) keep it here."""
        anchor = self._tok.encode("a", add_special_tokens=False).ids[-1:] or [0]
        head = self._tok.decode(anchor, skip_special_tokens=False)
        seqs = [[*anchor, t] for t in range(self.vocab_size)]
        texts = self._tok.decode_batch(seqs, skip_special_tokens=False)
        pieces = [t[len(head) :] if t.startswith(head) else "\ufffd" for t in texts]
        for t in self._special:
            pieces[t] = self._tok.id_to_token(t) or ""
        return pieces

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """The ids of `text` (special-token text stays text)."""
        _check_text("encode", "text", text)
        try:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        except TypeError:  # the binding refuses a str it cannot encode as UTF-8
            raise ValueError("encode: text holds a lone surrogate (not valid Unicode)") from None

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (U+FFFD for a partial character)."""
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else "\ufffd"

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def ids_made_of(self, chars: str) -> list[int]:
        """The ids of the non-special tokens whose whole text is made of `chars`."""
        allowed = set(chars)
        return [
            t
            for t, p in enumerate(self._pieces)
            if p and t not in self._special and all(c in allowed for c in p)
        ]

    # ------------------------------------------------------------------ chat items
    def render_item(self, role: str, content: str) -> list[int]:
        _check_role("render_item", role)
        _check_text("render_item", "content", content)
        return [
            *self.render_generation_prompt(role),
            *self.encode(content),
            self.im_end_id,
            *self.newline_ids,
        ]

    def render_function_call(self, call_id: str, name: str, arguments: str) -> list[int]:
        for field, value in (("call_id", call_id), ("name", name)):
            _check_role("render_function_call", value, field)
        _check_text("render_function_call", "arguments", arguments)
        return [
            *self.render_generation_prompt("assistant"),
            self.tool_call_id,
            *self.encode(f"{call_id}\n{name}\n{arguments}"),
            self.im_end_id,
            *self.newline_ids,
        ]

    def render_function_call_output(self, call_id: str, output: str) -> list[int]:
        _check_role("render_function_call_output", call_id, "call_id")
        _check_text("render_function_call_output", "output", output)
        return [
            *self.render_generation_prompt("tool"),
            self.tool_result_id,
            *self.encode(f"{call_id}\n{output}"),
            self.im_end_id,
            *self.newline_ids,
        ]

    def render_generation_prompt(self, role: str = "assistant") -> list[int]:
        _check_role("render_generation_prompt", role)
        return [self.im_start_id, *self.encode(role), *self.newline_ids]
