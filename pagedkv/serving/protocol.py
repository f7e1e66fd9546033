"""The Responses API request subset: parse and check a `response.create` body.

Accepted fields (unknown ones are ignored, as the API does): `model`, `input` (a string
or a list of items: `message` with a string or text parts, replayed `function_call`,
`function_call_output`), `instructions`, function `tools`, `tool_choice`,
`previous_response_id` (nullable), `store`, `generate` (WebSocket: False warms the cache
without output), `max_output_tokens`, `temperature`, `top_p`, `metadata`, `stream` (HTTP
only), `stream_id` (WebSocket only: the lane; echoed on every event of that response),
`prompt_cache_key` (a
sub-salt within the tenant: only requests with the same key share cached blocks).
`background: true` is refused. Anything malformed raises `ProtocolError`, which the server sends as the `error`
envelope.

Bounds (the API's where it has them): NaN/Infinity refused, nesting at most
`MAX_JSON_DEPTH` levels anywhere in the body, `metadata` at most 16 string pairs (keys
up to 64 characters, values up to 512), at most 128 tools with unique names, ids
(call ids, tool names, `previous_response_id`, `stream_id`, `prompt_cache_key`) 1-256
characters. Replies
are written with `encode_json` (never NaN). Checks that need the server's configuration
(model name, the `max_output_tokens` cap) or the whole conversation (call ids) are in
`pagedkv.serving.response_run.check_request`.

`parse_steer` checks a `response.steer` event (WebSocket only): exactly `type`,
`previous_response_id` and `input` (a string or a non-empty list of user messages).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedkv.serving.conversation import (
    ROLES,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    Item,
    Message,
)

TEXT_PART_TYPES = ("input_text", "output_text", "text")

# Bounds every parsed body is held to (the API's metadata rules; nesting as deep as any
# real JSON schema in `tools[].parameters` goes, far below what would exhaust the stack
# when a reply is encoded).
MAX_JSON_DEPTH = 64
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_TOOLS = 128
MAX_ID_CHARS = 256  # call ids, tool names, previous_response_id, stream_id


class ProtocolError(Exception):
    """A request the server refuses; becomes an `error` event or an HTTP error body.

    Attributes:
        status: the HTTP status it maps to (400 bad request, 503 over capacity ...).
        type: the error type ("invalid_request_error", "server_error").
        code: a machine-readable code ("previous_response_not_found", "invalid_type" ...).
        param: the offending field, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status = status
        self.type = type
        self.stream_id: str | None = None  # WebSocket: the lane of the refused request

    def to_json(self) -> dict[str, Any]:
        """The `error` object: type, code, message, param."""
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolChoice:
    """ "auto" (text), "none" (text), "required" (call the first tool) or a named function."""

    mode: str = "auto"
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRequest:
    """A checked `response.create` body (see the module docstring)."""

    model: str | None = None
    items: tuple[Item, ...] = ()
    instructions: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    previous_response_id: str | None = None
    store: bool = True
    generate: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    stream_id: str | None = None
    prompt_cache_key: str | None = None

    def forced_tool(self) -> FunctionTool | None:
        """The tool a function call must be made to, or None for a text answer.

        `tool_choice: "required"` picks the first tool, a named choice picks that one.
        This is the documented hook that makes the engine emit a function call (the
        random-weight model never chooses one by itself).

        Raises:
            ProtocolError: the choice names a tool the request does not define, or
                requires a call with no tools.
        """
        choice = self.tool_choice
        if choice.mode in ("auto", "none"):
            return None
        if not self.tools:
            raise ProtocolError(
                f"tool_choice {choice.mode!r} needs at least one function tool, got none",
                code="invalid_value",
                param="tool_choice",
            )
        if choice.mode == "required":
            return self.tools[0]
        for tool in self.tools:
            if tool.name == choice.name:
                return tool
        raise ProtocolError(
            f"tool_choice names function {choice.name!r}, which is not in tools "
            f"{[t.name for t in self.tools]}",
            code="invalid_value",
            param="tool_choice",
        )


def _type_error(param: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(
        f"invalid type for {param!r}: expected {expected}, got {type(value).__name__}",
        code="invalid_type",
        param=param,
    )


def _opt(body: Mapping[str, Any], key: str, types: tuple[type, ...], expected: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise _type_error(key, expected, value)
    if not isinstance(value, types):
        raise _type_error(key, expected, value)
    return value


def _opt_number(body: Mapping[str, Any], key: str) -> float | None:
    """An optional number as a float (an integer too large for a float is refused)."""
    value = _opt(body, key, (int, float), "a number")
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(f"{key} is out of range", code="invalid_value", param=key) from None


def printable(text: str) -> str:
    """`text` safe to echo: lone surrogates (and only they) as `\\udXXX` escapes, so
    a reply that quotes a client's key or field name can always be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _str_field(obj: Mapping[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    return value


def _single_line(value: str, param: str) -> str:
    if not value or "\n" in value or len(value) > MAX_ID_CHARS:
        raise ProtocolError(
            f"{param!r} must be a non-empty string of at most {MAX_ID_CHARS} characters "
            f"without newlines, got {value[:MAX_ID_CHARS]!r}",
            code="invalid_value",
            param=param,
        )
    return value


def _text_of(content: object, param: str) -> str:
    """A message content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(param, "a string or a list of content parts", content)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise _type_error(where, "an object", part)
        kind = part.get("type")
        if kind not in TEXT_PART_TYPES:
            raise ProtocolError(
                f"unsupported content part type {kind!r} at {where}; this server accepts "
                f"{list(TEXT_PART_TYPES)}",
                code="unsupported_value",
                param=f"{where}.type",
            )
        texts.append(_str_field(part, "text", f"{where}.text"))
    return "".join(texts)


def parse_item(obj: object, index: int) -> Item:
    """One input item (message, function_call, function_call_output)."""
    param = f"input[{index}]"
    if not isinstance(obj, Mapping):
        raise _type_error(param, "an object", obj)
    kind = obj.get("type", "message" if "role" in obj else None)
    if kind == "message":
        role = obj.get("role")
        if role not in ROLES:
            raise ProtocolError(
                f"invalid role {role!r} at {param}; expected one of {list(ROLES)}",
                code="invalid_value",
                param=f"{param}.role",
            )
        return Message(role, _text_of(obj.get("content"), f"{param}.content"))
    if kind == "function_call":
        return FunctionCall(
            _single_line(_str_field(obj, "call_id", f"{param}.call_id"), f"{param}.call_id"),
            _single_line(_str_field(obj, "name", f"{param}.name"), f"{param}.name"),
            _str_field(obj, "arguments", f"{param}.arguments"),
        )
    if kind == "function_call_output":
        call_id = _single_line(_str_field(obj, "call_id", f"{param}.call_id"), f"{param}.call_id")
        return FunctionCallOutput(call_id, _text_of(obj.get("output"), f"{param}.output"))
    raise ProtocolError(
        f"unsupported item type {kind!r} at {param}; this server accepts message, "
        "function_call and function_call_output",
        code="unsupported_value",
        param=f"{param}.type",
    )


def _parse_tools(value: object) -> tuple[FunctionTool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _type_error("tools", "a list", value)
    if len(value) > MAX_TOOLS:
        raise ProtocolError(f"tools has {len(value)} entries; at most {MAX_TOOLS} are allowed",
                            code="invalid_value", param="tools")  # fmt: skip
    tools: list[FunctionTool] = []
    names: set[str] = set()
    for i, t in enumerate(value):
        if not isinstance(t, Mapping):
            raise _type_error(f"tools[{i}]", "an object", t)
        if t.get("type") != "function":
            raise ProtocolError(
                f"unsupported tool type {t.get('type')!r} at tools[{i}]; only function tools",
                code="unsupported_value",
                param=f"tools[{i}].type",
            )
        name = _single_line(_str_field(t, "name", f"tools[{i}].name"), f"tools[{i}].name")
        if name in names:
            raise ProtocolError(
                f"tools[{i}].name {name!r} is already the name of another tool; tool names "
                "must be unique",
                code="invalid_value",
                param=f"tools[{i}].name",
            )
        names.add(name)
        desc = t.get("description")
        if desc is not None and not isinstance(desc, str):
            raise _type_error(f"tools[{i}].description", "a string", desc)
        params = t.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise _type_error(f"tools[{i}].parameters", "an object", params)
        tools.append(FunctionTool(name, desc, params))
    return tuple(tools)


def _parse_tool_choice(value: object) -> ToolChoice:
    if value is None:
        return ToolChoice()
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise ProtocolError(
                f"invalid tool_choice {value!r}; expected 'auto', 'none', 'required' or a function",
                code="invalid_value",
                param="tool_choice",
            )
        return ToolChoice(mode=value)
    if isinstance(value, Mapping) and value.get("type") == "function":
        return ToolChoice(mode="function", name=_str_field(value, "name", "tool_choice.name"))
    raise _type_error("tool_choice", "'auto', 'none', 'required' or a function object", value)


def _no_constant(name: str) -> Any:
    raise ProtocolError(
        f"{name} is not a JSON number; send finite numbers only", code="invalid_json"
    )


def decode_json(data: str | bytes, what: str) -> Any:
    """`json.loads` with every failure mapped to a ProtocolError ("invalid_json"): a
    syntax error, bytes that are not UTF-8, NaN/Infinity (not JSON, and rejected by
    most clients' parsers), a number with too many digits, or nesting too deep for the
    parser. Depth below that is bounded by `check_encodable`."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}",
                            code="invalid_json") from None  # fmt: skip
    except ValueError as exc:  # JSONDecodeError, or an integer beyond int_max_str_digits
        raise ProtocolError(f"{what} is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ProtocolError(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
        ) from None


def encode_json(obj: object) -> str:
    """The one way the server writes JSON: compact, UTF-8 text, and never NaN or
    Infinity (`allow_nan=False`: a non-finite float is a server bug, raised as
    ValueError rather than sent as something clients cannot parse); a lone surrogate,
    which no UTF-8 text can carry, raises ValueError too."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if not text.isascii():
        text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    return text


def check_encodable(obj: object, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what cannot be echoed safely: nesting deeper than `max_depth` (a reply
    that encodes it could exhaust the stack), non-finite floats, and strings that are
    not UTF-8 text (lone surrogates such as "\\ud800" are valid JSON escapes but not
    text). Iterative: a hostile depth cannot exhaust the stack here.

    Raises:
        ProtocolError: code "invalid_value" (or "invalid_json" for depth), naming the field.
    """
    # (value, its path for messages, its depth, the top-level field it is under)
    stack: list[tuple[object, str, int, str | None]] = [(obj, "body", 0, None)]
    while stack:
        value, path, depth, top = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(
                    f"{path} contains a lone surrogate; strings must be valid Unicode text",
                    code="invalid_value",
                    param=path,
                ) from None
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ProtocolError(f"{path} is {value}; send finite numbers only",
                                    code="invalid_value", param=path)  # fmt: skip
        elif isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise ProtocolError(
                    f"{top or 'body'} is nested more than {max_depth} levels deep",
                    code="invalid_json",
                    param=top,
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, path, depth, top))
                    name = printable(str(key)[:200])  # paths are echoed in errors
                    where = f"{path}.{name}" if path != "body" else name
                    stack.append((item, where[:200], depth + 1, top or name))
            else:
                stack.extend(
                    (item, f"{path}[{i}]"[:200], depth + 1, top) for i, item in enumerate(value)
                )


def _parse_metadata(value: object) -> dict[str, str]:
    """The API's metadata rules: up to 16 pairs, keys up to 64 characters, values
    strings up to 512 characters."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _type_error("metadata", "an object", value)
    if len(value) > MAX_METADATA_KEYS:
        raise ProtocolError(
            f"metadata has {len(value)} keys; at most {MAX_METADATA_KEYS} are allowed",
            code="invalid_value",
            param="metadata",
        )
    out: dict[str, str] = {}
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ProtocolError(
                f"metadata key {key[:MAX_METADATA_KEY_CHARS]!r}... has {len(key)} characters; "
                f"at most {MAX_METADATA_KEY_CHARS} are allowed",
                code="invalid_value",
                param="metadata",
            )
        if not isinstance(item, str):
            raise _type_error(f"metadata.{key}", "a string", item)
        if len(item) > MAX_METADATA_VALUE_CHARS:
            raise ProtocolError(
                f"metadata.{key} has {len(item)} characters; at most "
                f"{MAX_METADATA_VALUE_CHARS} are allowed",
                code="invalid_value",
                param=f"metadata.{key}",
            )
        out[key] = item
    return out


_STREAM_ID = re.compile(r"[A-Za-z0-9_.\-]{1,256}")


def valid_stream_id(value: object) -> bool:
    """A WebSocket lane id as the API allows: 1-256 of `[A-Za-z0-9_.-]`."""
    return isinstance(value, str) and _STREAM_ID.fullmatch(value) is not None


def _check_id(value: str | None, param: str) -> str | None:
    if value is not None and not 1 <= len(value) <= MAX_ID_CHARS:
        raise ProtocolError(
            f"{param!r} must have 1 to {MAX_ID_CHARS} characters, got {len(value)}",
            code="invalid_value",
            param=param,
        )
    return value


def check_call_outputs(items: Sequence[Item]) -> None:
    """Every `function_call_output` answers a `function_call` earlier in the
    conversation, as the API requires.

    Raises:
        ProtocolError: "invalid_value" on `input`, naming the call id.
    """
    calls: set[str] = set()
    for item in items:
        if isinstance(item, FunctionCall):
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutput) and item.call_id not in calls:
            raise ProtocolError(
                f"no tool call found for function call output with call_id "
                f"{item.call_id[:MAX_ID_CHARS]!r}",
                code="invalid_value",
                param="input",
            )


def parse_create(body: object, *, websocket: bool) -> CreateRequest:
    """Check a `response.create` body (the event itself on a WebSocket, the POST body
    over HTTP) and return it normalised.

    Raises:
        ProtocolError: a field of the wrong type or value (code "invalid_type",
            "invalid_value", "unsupported_value").
    """
    if not isinstance(body, Mapping):
        raise _type_error("body", "a JSON object", body)
    check_encodable(body)
    raw_input = body.get("input")
    if raw_input is None:
        items: tuple[Item, ...] = ()
    elif isinstance(raw_input, str):
        items = (Message("user", raw_input),)
    elif isinstance(raw_input, list):
        items = tuple(parse_item(obj, i) for i, obj in enumerate(raw_input))
    else:
        raise _type_error("input", "a string or a list of items", raw_input)
    max_out = _opt(body, "max_output_tokens", (int,), "an integer")
    if max_out is not None and max_out < 1:
        raise ProtocolError(
            f"max_output_tokens must be >= 1, got {max_out}",
            code="invalid_value",
            param="max_output_tokens",
        )
    temperature = _opt_number(body, "temperature")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise ProtocolError(
            f"temperature must be in [0, 2], got {temperature}",
            code="invalid_value",
            param="temperature",
        )
    top_p = _opt_number(body, "top_p")
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ProtocolError(
            f"top_p must be a finite number in (0, 1], got {top_p}",
            code="invalid_value",
            param="top_p",
        )
    metadata = _parse_metadata(body.get("metadata"))
    generate = _opt(body, "generate", (bool,), "a boolean")
    store = _opt(body, "store", (bool,), "a boolean")
    stream = _opt(body, "stream", (bool,), "a boolean")
    if _opt(body, "background", (bool,), "a boolean"):
        raise ProtocolError(
            "background responses are not supported by this server; omit background",
            code="unsupported_value",
            param="background",
        )
    # WebSocket only: the lane (its requests run in order, lanes run side by side)
    stream_id = _opt(body, "stream_id", (str,), "a string") if websocket else None
    if stream_id is not None and not valid_stream_id(stream_id):
        raise ProtocolError(
            "The 'stream_id' field must be a non-empty string with at most 256 characters "
            "and may only contain letters, numbers, underscores, hyphens, and periods.",
            code="invalid_stream_id",
            param="stream_id",
        )
    cache_key = _check_id(_opt(body, "prompt_cache_key", (str,), "a string"), "prompt_cache_key")
    return CreateRequest(
        model=_opt(body, "model", (str,), "a string"),
        items=items,
        instructions=_opt(body, "instructions", (str,), "a string"),
        tools=_parse_tools(body.get("tools")),
        tool_choice=_parse_tool_choice(body.get("tool_choice")),
        previous_response_id=_check_id(
            _opt(body, "previous_response_id", (str,), "a string"), "previous_response_id"
        ),
        store=True if store is None else store,
        generate=True if (generate is None or not websocket) else generate,
        max_output_tokens=max_out,
        temperature=temperature,
        top_p=top_p,
        metadata=metadata,
        stream=bool(stream) and not websocket,
        stream_id=stream_id,
        prompt_cache_key=cache_key,
    )


def parse_prompt_fields(body: object, *, websocket: bool) -> tuple[CreateRequest, Iterator[Item]]:
    """What a `response.create` body's prompt renders from, looking at nothing else:
    `instructions`, `tools`, `generate`, `previous_response_id` and `prompt_cache_key`
    parsed as `parse_create` parses them (every other field of the request left at its
    default, `items` empty), and an iterator that parses the input items one at a time
    as they are taken. For the router's bounded look at a prompt's prefix: its work is
    what the consumer takes, not the body's size.

    For a body `parse_create` accepts, the fields equal its and the iterator yields its
    items; a body it refuses may raise `ProtocolError` here or from the iterator, or
    parse to anything (none of the body-wide checks run: `check_encodable`, metadata,
    sampling fields). The replica that serves the request still checks it whole.

    Raises:
        ProtocolError: a field above of the wrong type or value.
    """
    if not isinstance(body, Mapping):
        raise _type_error("body", "a JSON object", body)
    raw_input = body.get("input")
    items: Iterator[Item]
    if raw_input is None:
        items = iter(())
    elif isinstance(raw_input, str):
        items = iter((Message("user", raw_input),))
    elif isinstance(raw_input, list):
        items = (parse_item(obj, i) for i, obj in enumerate(raw_input))
    else:
        raise _type_error("input", "a string or a list of items", raw_input)
    generate = _opt(body, "generate", (bool,), "a boolean")
    cache_key = _check_id(_opt(body, "prompt_cache_key", (str,), "a string"), "prompt_cache_key")
    req = CreateRequest(
        instructions=_opt(body, "instructions", (str,), "a string"),
        tools=_parse_tools(body.get("tools")),
        previous_response_id=_check_id(
            _opt(body, "previous_response_id", (str,), "a string"), "previous_response_id"
        ),
        generate=True if (generate is None or not websocket) else generate,
        prompt_cache_key=cache_key,
    )
    return req, items


STEER_FIELDS = ("type", "previous_response_id", "input")
MAX_STEER_MESSAGES = 64
MAX_STEER_CHARS = 256 * 1024  # text of one steer: pending steers are held in memory


@dataclass(frozen=True, slots=True)
class SteerRequest:
    """A checked `response.steer` event: the response it steers and the user messages
    it queues; `raw_input` is the input as sent (a refusal echoes it back)."""

    previous_response_id: str
    items: tuple[Message, ...]
    raw_input: str | list[Any]


def _steer_error(message: str, param: str) -> ProtocolError:
    return ProtocolError(message, code="invalid_input", param=param)


def parse_steer(body: Mapping[str, Any]) -> SteerRequest:
    """Check a `response.steer` event (already decoded, depth-checked JSON).

    The API accepts only `type`, `previous_response_id` and `input`; steering input is a
    string or a non-empty list of `user` messages, each with only `type` ("message"),
    `role` and `content` (a string or text parts; this server has no image or file
    input).

    Raises:
        ProtocolError: code "invalid_input", naming the field.
    """
    try:
        check_encodable(body)
    except ProtocolError as err:
        raise _steer_error(err.message, err.param or "input") from None
    for key in body:
        if key not in STEER_FIELDS:
            shown = printable(str(key)[:64])
            hint = " (the target response determines the lane)" if key == "stream_id" else ""
            raise _steer_error(
                f"response.steer accepts only {list(STEER_FIELDS)}; got {shown!r}{hint}", shown
            )
    prev = body.get("previous_response_id")
    if not isinstance(prev, str) or not 1 <= len(prev) <= MAX_ID_CHARS:
        raise _steer_error(
            f"previous_response_id must be a string of 1 to {MAX_ID_CHARS} characters",
            "previous_response_id",
        )
    raw = body.get("input")
    if isinstance(raw, str):
        if not raw:
            raise _steer_error("input must not be empty", "input")
        _check_steer_size(len(raw))
        return SteerRequest(prev, (Message("user", raw),), raw)
    if not isinstance(raw, list) or not raw:
        raise _steer_error("input must be a string or a non-empty list of user messages", "input")
    if len(raw) > MAX_STEER_MESSAGES:
        raise _steer_error(
            f"input has {len(raw)} messages; a steer takes at most {MAX_STEER_MESSAGES}", "input"
        )
    items: list[Message] = []
    for i, obj in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(obj, Mapping):
            raise _steer_error(f"{where} must be an object", where)
        for key in obj:
            if key not in ("type", "role", "content"):
                shown = printable(str(key)[:64])
                raise _steer_error(
                    f"a steering message may contain only type, role and content; {where} "
                    f"has {shown!r}",
                    f"{where}.{shown}",
                )
        if obj.get("type", "message") != "message":
            raise _steer_error(
                f"{where} is not a message: steering accepts only user messages (no tool "
                "outputs or other items)",
                f"{where}.type",
            )
        if obj.get("role") != "user":
            raise _steer_error(f"{where} must have role 'user'", f"{where}.role")
        try:
            text = _text_of(obj.get("content"), f"{where}.content")
        except ProtocolError as err:
            raise _steer_error(err.message, err.param or f"{where}.content") from None
        items.append(Message("user", text))
    _check_steer_size(sum(len(m.text) for m in items))
    return SteerRequest(prev, tuple(items), raw)


def _check_steer_size(chars: int) -> None:
    if chars > MAX_STEER_CHARS:
        raise _steer_error(
            f"steering input of {chars} characters exceeds the limit of {MAX_STEER_CHARS}",
            "input",
        )
