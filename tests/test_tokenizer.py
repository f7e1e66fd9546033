"""ByteTokenizer: round trips, partial UTF-8, special tokens, and item rendering."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv.model.config import LlamaConfig
from pagedkv.model.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, ByteTokenizer

tok = ByteTokenizer()
ids_strategy = st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=64)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
items = st.lists(st.tuples(roles, st.text(max_size=40)), max_size=6)


@given(st.text())
def test_text_round_trip(text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text) == ids  # deterministic


@given(ids_strategy)
def test_decode_never_fails_and_streams_the_same(ids: list[int]) -> None:
    """Any ids decode (cut or invalid UTF-8 becomes U+FFFD); streaming them one at a
    time and flushing gives the same text."""
    for skip in (False, True):
        text = tok.decode(ids, skip_special=skip)
        stream = tok.stream_decoder(skip_special=skip)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == text


@given(st.text(min_size=1))
def test_stream_deltas_are_whole_characters(text: str) -> None:
    stream, deltas = tok.stream_decoder(), []
    for i in tok.encode(text):
        deltas.append(stream.push(i))
    assert "".join(deltas) == text and stream.flush() == ""
    assert "\ufffd" not in "".join(deltas) or "\ufffd" in text


def test_partial_utf8() -> None:
    ids = tok.encode("é🌍")  # 2 + 4 bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids[:4]) == "é\ufffd"
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids[2:]] == ["", "", "", "🌍"]
    stream.push(ids[2])
    assert stream.flush() == "\ufffd"


def test_special_tokens() -> None:
    assert VOCAB_SIZE == 272 <= LlamaConfig.tiny().vocab_size
    assert LlamaConfig.demo().vocab_size >= VOCAB_SIZE
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS) == 16
    named = {
        "<|bos|>": tok.bos_id,
        "<|eos|>": tok.eos_id,
        "<|pad|>": tok.pad_id,
        "<|im_start|>": tok.im_start_id,
        "<|im_end|>": tok.im_end_id,
        "<|tool|>": tok.tool_id,
        "<|tool_call|>": tok.tool_call_id,
        "<|tool_result|>": tok.tool_result_id,
    }
    for name, i in named.items():
        assert tok.token_id(name) == i and tok.is_special(i)
        assert tok.decode([i]) == name and tok.decode([i], skip_special=True) == ""
    assert not tok.is_special(255)
    # special-token text stays bytes: user content cannot forge chat markup
    assert tok.encode("<|im_end|>") == list(b"<|im_end|>")
    assert tok.decode([104, tok.eos_id, 105]) == "h<|eos|>i"


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"ids\[1\]=272 is not a token id in \[0, 272\)"):
        tok.decode([1, 272])
    with pytest.raises(ValueError, match=r"ids\[0\]=-1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown special token"):
        tok.token_id("<|nope|>")
    with pytest.raises(ValueError, match="role must be non-empty without newlines"):
        tok.render_item("us\ner", "x")
    with pytest.raises(ValueError, match="role must be non-empty"):
        tok.render_item("", "x")
    with pytest.raises(TypeError, match="content must be a str, got NoneType"):
        tok.render_item("user", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="call_id must be non-empty"):
        tok.render_function_call_output("", "out")


def test_render_item_layout() -> None:
    ids = tok.render_item("user", "hi")
    assert ids == [tok.im_start_id, *b"user\n", *b"hi", tok.im_end_id, *b"\n"]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.render_generation_prompt() == [tok.im_start_id, *b"assistant\n"]
    call = tok.decode(tok.render_function_call("c1", "ls", '{"dir": "."}'))
    assert call == '<|im_start|>assistant\n<|tool_call|>c1\nls\n{"dir": "."}<|im_end|>\n'
    out = tok.decode(tok.render_function_call_output("c1", "a.py"))
    assert out == "<|im_start|>tool\n<|tool_result|>c1\na.py<|im_end|>\n"


@given(items, roles, st.text(max_size=40))
def test_rendering_is_itemwise_and_prefix_stable(
    history: list[tuple[str, str]], role: str, content: str
) -> None:
    """Re-sending the history plus one item re-tokenizes the history to identical ids,
    so the earlier turns' blocks hash the same."""
    before = tok.render_conversation(history, add_generation_prompt=False)
    after = tok.render_conversation([*history, (role, content)], add_generation_prompt=False)
    assert after[: len(before)] == before
    assert after[len(before) :] == tok.render_item(role, content)
    assert tok.render_item(role, content) == tok.render_item(role, content)
    body = tok.render_item(role, content)[1:-2]
    assert all(i < 256 for i in body)  # content never yields special tokens
