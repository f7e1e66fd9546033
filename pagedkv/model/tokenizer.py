"""ByteTokenizer: a deterministic byte-level tokenizer with chat special tokens.

Ids 0..255 are the UTF-8 bytes of the text; ids 256..271 are special tokens (`<|bos|>`,
`<|eos|>`, `<|im_start|>`, `<|im_end|>`, `<|tool|>`, ... and reserved slots), so the
vocabulary (272) fits `LlamaConfig.tiny()` and `demo()` (288). There is no merge table:
`encode` is a pure function of the text, and text never turns into a special token
(`encode("<|im_end|>")` is ten byte tokens), so user content cannot forge chat markup.

Conversations are rendered item by item, each item a pure function of its own fields,
ChatML style:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

so a client that re-sends its history re-tokenizes to the same ids, block for block,
and the prefix cache finds them by content hash.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from numbers import Integral
from typing import Protocol

NUM_BYTE_TOKENS = 256
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool|>",
    "<|tool_call|>",
    "<|tool_result|>",
    *(f"<|reserved_{i}|>" for i in range(8, 16)),
)
VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)  # 272

_NEWLINE = [ord("\n")]


class ChatTokenizer(Protocol):
    """What the serving layer needs of a tokenizer: `ByteTokenizer`, or a checkpoint's
    own (`pagedkv.integrations.hf_tokenizer.ChatMLTokenizer`).

    Conversations render ChatML style, item by item (`render_*`, each a pure function
    of the item's fields); generated text is sampled only from tokens whose `piece` is
    made of allowed characters (`ids_made_of`). `exact_render` says whether a generated
    item re-renders to exactly the tokens it was generated as (always true for bytes;
    for a merging tokenizer the server remembers the generated ids instead).
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def im_end_id(self) -> int: ...
    @property
    def tool_call_id(self) -> int: ...
    @property
    def prefix_ids(self) -> tuple[int, ...]: ...
    @property
    def newline_ids(self) -> tuple[int, ...]: ...
    @property
    def exact_render(self) -> bool: ...
    def encode(self, text: str) -> list[int]: ...
    def piece(self, token_id: int) -> str: ...
    def ids_made_of(self, chars: str) -> list[int]: ...
    def render_item(self, role: str, content: str) -> list[int]: ...
    def render_function_call(self, call_id: str, name: str, arguments: str) -> list[int]: ...
    def render_function_call_output(self, call_id: str, output: str) -> list[int]: ...
    def render_generation_prompt(self, role: str = "assistant") -> list[int]: ...


def _check_text(op: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(value).__name__}")
    return value


class ByteTokenizer:
    """UTF-8 bytes plus 16 special tokens; stateless, so every instance is the same.

    Attributes (ids): `bos_id`, `eos_id`, `pad_id`, `im_start_id`, `im_end_id`, `tool_id`,
    `tool_call_id`, `tool_result_id`; `vocab_size` (272); `special_tokens` (names in id
    order, starting at 256).
    """

    __slots__ = ()

    vocab_size = VOCAB_SIZE
    special_tokens = SPECIAL_TOKENS
    bos_id = NUM_BYTE_TOKENS + 0
    eos_id = NUM_BYTE_TOKENS + 1
    pad_id = NUM_BYTE_TOKENS + 2
    im_start_id = NUM_BYTE_TOKENS + 3
    im_end_id = NUM_BYTE_TOKENS + 4
    tool_id = NUM_BYTE_TOKENS + 5
    tool_call_id = NUM_BYTE_TOKENS + 6
    tool_result_id = NUM_BYTE_TOKENS + 7

    exact_render = True  # one byte, one token: every text re-encodes to its own ids
    prefix_ids = (NUM_BYTE_TOKENS + 0,)  # <|bos|>
    newline_ids = (ord("\n"),)

    def piece(self, token_id: int) -> str:
        """The text of one token on its own: the character of an ASCII byte, the name of
        a special token, U+FFFD for a byte that is not a character alone."""
        if 0 <= token_id < 128:
            return chr(token_id)
        if self.is_special(token_id):
            return SPECIAL_TOKENS[token_id - NUM_BYTE_TOKENS]
        return "\ufffd"

    def ids_made_of(self, chars: str) -> list[int]:
        """The ids of the (one-character) tokens whose text is one of `chars`."""
        return sorted({ord(c) for c in chars if ord(c) < 128})

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids 0..255 (special-token text stays bytes).

        A lone surrogate (not valid Unicode text, but a JSON string may carry one) is
        encoded as its 3 bytes (`surrogatepass`), which decode to U+FFFD.

        Raises:
            TypeError: `text` is not a str.
        """
        return list(_check_text("encode", "text", text).encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`: bytes decoded as UTF-8 (an invalid or cut sequence becomes
        U+FFFD, never an error), special tokens as their names unless `skip_special`.

        Raises:
            ValueError: an id outside `[0, vocab_size)`.
        """
        ids = self._check_ids("decode", ids)
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if i < NUM_BYTE_TOKENS:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special:
                parts.append(SPECIAL_TOKENS[i - NUM_BYTE_TOKENS])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        """True for a special token id (256..271)."""
        return NUM_BYTE_TOKENS <= token_id < VOCAB_SIZE

    def token_id(self, name: str) -> int:
        """The id of a special token by name, e.g. `"<|im_end|>"`.

        Raises:
            ValueError: not a special token name.
        """
        try:
            return NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(name)
        except ValueError:
            raise ValueError(
                f"unknown special token {name!r}; expected one of {list(SPECIAL_TOKENS)}"
            ) from None

    def stream_decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        """A decoder for generated ids arriving one at a time (see `StreamDecoder`)."""
        return StreamDecoder(skip_special=skip_special)

    # ------------------------------------------------------------------ chat items
    def render_item(self, role: str, content: str) -> list[int]:
        """`<|im_start|>{role}\\n{content}<|im_end|>\\n` as ids: one conversation item.

        A pure function of (role, content): the same item always gives the same ids,
        whatever came before it.

        Raises:
            TypeError: role or content is not a str.
            ValueError: role is empty or holds a newline (it would change the framing).
        """
        self._check_role("render_item", role)
        _check_text("render_item", "content", content)
        return [
            self.im_start_id,
            *self.encode(role),
            *_NEWLINE,
            *self.encode(content),
            self.im_end_id,
            *_NEWLINE,
        ]

    def render_function_call(self, call_id: str, name: str, arguments: str) -> list[int]:
        """An assistant tool call: `<|im_start|>assistant\\n<|tool_call|>{call_id}\\n{name}\\n
        {arguments}<|im_end|>\\n`. Pure function of its fields.

        Raises:
            TypeError: a field is not a str.
            ValueError: call_id or name is empty or holds a newline.
        """
        for field, value in (("call_id", call_id), ("name", name)):
            self._check_role("render_function_call", value, field=field)
        _check_text("render_function_call", "arguments", arguments)
        return [
            *self.render_generation_prompt("assistant"),
            self.tool_call_id,
            *self.encode(f"{call_id}\n{name}\n{arguments}"),
            self.im_end_id,
            *_NEWLINE,
        ]

    def render_function_call_output(self, call_id: str, output: str) -> list[int]:
        """A tool result: `<|im_start|>tool\\n<|tool_result|>{call_id}\\n{output}<|im_end|>\\n`.

        Raises:
            TypeError: a field is not a str.
            ValueError: call_id is empty or holds a newline.
        """
        self._check_role("render_function_call_output", call_id, field="call_id")
        _check_text("render_function_call_output", "output", output)
        return [
            *self.render_generation_prompt("tool"),
            self.tool_result_id,
            *self.encode(f"{call_id}\n{output}"),
            self.im_end_id,
            *_NEWLINE,
        ]

    def render_generation_prompt(self, role: str = "assistant") -> list[int]:
        """`<|im_start|>{role}\\n`: the header the model continues from.

        Raises:
            TypeError, ValueError: as `render_item` for the role.
        """
        self._check_role("render_generation_prompt", role)
        return [self.im_start_id, *self.encode(role), *_NEWLINE]

    def render_conversation(
        self, items: Iterable[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """`<|bos|>`, then each (role, content) item rendered by `render_item`, then the
        assistant header if `add_generation_prompt`.

        Raises:
            TypeError, ValueError: as `render_item`.
        """
        ids = [self.bos_id]
        for role, content in items:
            ids += self.render_item(role, content)
        if add_generation_prompt:
            ids += self.render_generation_prompt()
        return ids

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_role(op: str, value: object, *, field: str = "role") -> None:
        text = _check_text(op, field, value)
        if not text or "\n" in text:
            raise ValueError(f"{op}: {field} must be non-empty without newlines, got {text!r}")

    @staticmethod
    def _check_ids(op: str, ids: Iterable[int]) -> list[int]:
        """`ids` as a list of Python ints (NumPy or torch integers and arrays accepted)."""
        if hasattr(ids, "tolist"):  # a torch tensor or NumPy array: plain ints at once
            ids = ids.tolist()
        if not isinstance(ids, Iterable):
            raise TypeError(f"{op}: ids must be an iterable of ints, got {type(ids).__name__}")
        out: list[int] = []
        for pos, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"{op}: ids[{pos}]={i!r} is not a token id in [0, {VOCAB_SIZE})")
            out.append(int(i))
        return out


class StreamDecoder:
    """Turns generated ids, one at a time, into text deltas.

    A multi-byte character split across tokens is held back until complete, so each
    delta is valid text (an invalid byte becomes U+FFFD). The only state is the held-back
    bytes; `flush()` emits them (as U+FFFD) at the end of a stream.
    """

    __slots__ = ("_decoder", "_skip_special")

    def __init__(self, *, skip_special: bool = True) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip_special = skip_special

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes (possibly empty).

        Raises:
            ValueError: an id outside `[0, vocab_size)`.
        """
        ByteTokenizer._check_ids("StreamDecoder.push", [token_id])
        if token_id < NUM_BYTE_TOKENS:
            return self._decoder.decode(bytes((token_id,)))
        held = self._decoder.decode(b"", final=True)  # a special token ends a partial char
        self._decoder.reset()
        return held if self._skip_special else held + SPECIAL_TOKENS[token_id - NUM_BYTE_TOKENS]

    def flush(self) -> str:
        """Any held-back partial character, as U+FFFD; the decoder is then empty."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
