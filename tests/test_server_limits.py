"""Input limits, over WebSocket and HTTP, against a real server: each refused request gets
the API's error (code, param, status), the connection stays usable where the API keeps
it open, replies never contain NaN/Infinity, and nothing a client sends puts a
traceback into the server log (each refusal is one structured line instead).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from ws_raw import OP_BINARY, RawWebSocket

from pagedkv.serving.protocol import (
    MAX_JSON_DEPTH,
    ProtocolError,
    check_encodable,
    decode_json,
    encode_json,
)
from pagedkv.serving.response_run import ServerConfig
from pagedkv.serving.testing import read_response, tiny_server, wait_released

DONE = ("response.completed", "response.incomplete")
LIMIT = 300 * 1024  # > OFF_LOOP_BYTES: large messages are parsed on a worker thread too


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()}"
            for r in self.records
            if r.exc_info or "Traceback" in r.getMessage()
        ]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Any, Any, Records]]:
    torch.set_num_threads(1)
    records = Records()
    pagedkv_logger = logging.getLogger("pagedkv")
    pagedkv_level = pagedkv_logger.level
    pagedkv_logger.setLevel(logging.INFO)
    config = ServerConfig(model_name="tiny", model_aliases=("tiny-alias",),
                          max_message_bytes=LIMIT, max_output_tokens_cap=64,
                          read_timeout_s=0.5)  # fmt: skip
    # the root logger sees pagedkv's records; uvicorn's do not propagate to it, and
    # uvicorn sets its loggers' handlers when it starts: add ours after that
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error")]
    try:
        with tiny_server(server=config) as (srv, engine):
            for lg in loggers:
                lg.addHandler(records)
            yield srv, engine, records
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        pagedkv_logger.setLevel(pagedkv_level)


def events(ws: ClientConnection, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    while True:
        text = ws.recv(timeout=timeout)
        assert isinstance(text, str)
        yield strict_json(text)


def create(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps({"type": "response.create", "model": "tiny", **fields}))


def ws_error(ws: ClientConnection, raw: str | bytes | None = None, **fields: Any) -> dict[str, Any]:
    if raw is not None:
        ws.send(raw)
    else:
        create(ws, **fields)
    got = read_response(events(ws))
    assert len(got) == 1 and got[0]["type"] == "error", got
    return got[0]


def http_error(srv: Any, body: bytes | str) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{srv.base_url}/responses", content=body,
                   headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    return r.status_code, strict_json(r.text)["error"]


def _no_constant(name: str) -> Any:
    raise AssertionError(f"the server sent {name}, which is not JSON")


def strict_json(text: str) -> Any:
    """Parse as strict clients do (JavaScript, Go, serde): NaN/Infinity are errors."""
    return json.loads(text, parse_constant=_no_constant)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# bodies refused with (code, param, status): each both over WebSocket and HTTP
BAD_BODIES: list[tuple[str, str, dict[str, Any] | str, tuple[str, str | None, int]]] = [
    ("nan", "metadata NaN", '{"model": "tiny", "input": "x", "metadata": {"a": NaN}}',
     ("invalid_json", None, 400)),
    ("infinity", "temperature Infinity", '{"model": "tiny", "input": "x", "temperature": Infinity}',
     ("invalid_json", None, 400)),
    ("huge-float", "top_p 1e999", '{"model": "tiny", "input": "x", "top_p": 1e999}',
     ("invalid_value", "top_p", 400)),
    ("huge-float-meta", "metadata 1e999", '{"model": "tiny", "input": "x", "metadata": {"a": 1e999}}',
     ("invalid_value", "metadata.a", 400)),
    ("huge-int", "a 5000-digit integer", '{"model": "tiny", "input": "x", "n": ' + "9" * 5000 + "}",
     ("invalid_json", None, 400)),
    ("depth", "nesting past the limit", '{"model": "tiny", "input": "x", "extra": '
     + nested(MAX_JSON_DEPTH + 5) + "}", ("invalid_json", "extra", 400)),
    ("deep-big", "980 deep inside a >256 KiB body", '{"model": "tiny", "input": "x", "pad": "'
     + "p" * (260 * 1024) + '", "metadata": ' + '{"a":' * 980 + '"v"' + "}" * 980 + "}",
     ("invalid_json", "metadata", 400)),
    ("meta-keys", "17 metadata keys", {"metadata": {f"k{i}": "v" for i in range(17)}},
     ("invalid_value", "metadata", 400)),
    ("meta-value", "a 600-character metadata value", {"metadata": {"a": "v" * 600}},
     ("invalid_value", "metadata.a", 400)),
    ("meta-key", "a 65-character metadata key", {"metadata": {"k" * 65: "v"}},
     ("invalid_value", "metadata", 400)),
    ("meta-type", "a metadata value that is not a string", {"metadata": {"a": {"b": 1}}},
     ("invalid_type", "metadata.a", 400)),
    ("call-id", "a function_call_output answering no call",
     {"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "42"}]},
     ("invalid_value", "input", 400)),
    ("dup-tools", "two tools with one name",
     {"tools": [{"type": "function", "name": "ls", "parameters": {"type": "object"}},
                {"type": "function", "name": "ls", "parameters": {"type": "object"}}]},
     ("invalid_value", "tools[1].name", 400)),
    ("cap", "max_output_tokens over the server's cap", {"max_output_tokens": 65},
     ("integer_above_max_value", "max_output_tokens", 400)),
    ("model", "an unknown model", {"model": "gpt-9"}, ("model_not_found", "model", 404)),
    ("long-id", "a 300-character previous_response_id", {"previous_response_id": "r" * 300},
     ("invalid_value", "previous_response_id", 400)),
]  # fmt: skip


def _body(spec: dict[str, Any] | str, *, websocket: bool) -> str:
    if isinstance(spec, str):
        body = spec
        if websocket:
            body = '{"type": "response.create", ' + body[1:]
        return body
    full = {"model": "tiny", "input": "x", **spec}
    if websocket:
        full = {"type": "response.create", **full}
    return json.dumps(full)


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_refused_over_websocket(server: Any, case: Any) -> None:
    srv, _engine, records = server
    _id, _what, spec, (code, param, status) = case
    with connect(srv.ws_url, max_size=None) as ws:
        err = ws_error(ws, _body(spec, websocket=True))
        assert (err["error"]["code"], err["error"]["param"], err["status"]) == (code, param, status)
        done = read_response(_run(ws, "still usable?"))
        assert done[-1]["type"] in DONE  # the connection stays usable
    assert not records.tracebacks()


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_refused_over_http(server: Any, case: Any) -> None:
    srv, _engine, records = server
    _id, _what, spec, (code, param, http_status) = case
    got_status, err = http_error(srv, _body(spec, websocket=False))
    assert (got_status, err["code"], err["param"]) == (http_status, code, param)
    assert not records.tracebacks()


def _run(ws: ClientConnection, text: str) -> Iterator[dict[str, Any]]:
    create(ws, input=text, max_output_tokens=2)
    return events(ws)


def test_model_alias_and_matched_call_id_are_accepted(server: Any) -> None:
    srv, _engine, _records = server
    call = {"type": "function_call", "call_id": "call_1", "name": "ls", "arguments": "{}"}
    out = {"type": "function_call_output", "call_id": "call_1", "output": "a b"}
    tool = {"type": "function", "name": "ls", "parameters": {"type": "object"}}
    with connect(srv.ws_url) as ws:
        create(ws, model="tiny-alias", input=[call, out], tools=[tool], max_output_tokens=2,
               metadata={f"k{i}": "v" * 512 for i in range(16)})  # fmt: skip
        got = read_response(events(ws))
        assert got[-1]["type"] in DONE
        response = got[-1]["response"]
        assert response["model"] == "tiny" and len(response["metadata"]) == 16


def test_binary_frames_and_invalid_utf8(server: Any) -> None:
    srv, _engine, records = server
    raw = RawWebSocket("127.0.0.1", srv.port)
    try:
        raw.send(b'{"type": "response.create", "input": "x"}', OP_BINARY)
        err = raw.recv_json()
        assert (err["type"], err["error"]["code"]) == ("error", "invalid_message")
        raw.send(b"\xff\xfe not utf-8", OP_BINARY)
        assert raw.recv_json()["error"]["code"] == "invalid_message"
        raw.send_json({"type": "response.create", "model": "tiny", "input": "ok",
                       "max_output_tokens": 2})  # fmt: skip
        assert raw.recv_json()["type"] == "response.created"  # still usable
        # a text frame that is not UTF-8 breaks the WebSocket protocol itself: the
        # connection fails with 1007 (RFC 6455 requires it), no traceback
        raw.send(b'{"type": "response.create", "input": "\xc3\x28"}')
        assert raw.close_code() == 1007
    finally:
        raw.close()
    status, err = http_error(srv, b'{"model": "tiny", "input": "\xc3\x28"}')
    assert (status, err["code"]) == (400, "invalid_json")
    assert "UTF-8" in err["message"]
    assert not records.tracebacks()


def test_a_message_too_large_gets_the_error_event_then_close_1009(server: Any) -> None:
    srv, _engine, _records = server
    with connect(srv.ws_url, max_size=None) as ws:
        create(ws, input="x" * (LIMIT + 10))
        err = json.loads(ws.recv(timeout=30))
        assert (err["type"], err["error"]["code"]) == ("error", "message_too_large")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    status, err = http_error(srv, "x" * (LIMIT + 10))
    assert (status, err["code"]) == (413, "message_too_large")


def test_refusals_are_logged_as_one_line_with_request_id_and_tenant(server: Any) -> None:
    srv, _engine, records = server
    before = len(records.records)
    with connect(srv.ws_url, additional_headers={"Authorization": "Bearer sk-someone"}) as ws:
        ws_error(ws, model="gpt-9")
    time.sleep(0.1)
    lines = [r.getMessage() for r in records.records[before:]
             if r.name == "pagedkv.server.refusals"]  # fmt: skip
    assert len(lines) == 1, lines
    assert "transport=ws" in lines[0] and "code=model_not_found" in lines[0]
    assert "request_id=ws_" in lines[0] and "tenant=key-" in lines[0]
    assert "sk-someone" not in lines[0]  # the key itself is never logged


def test_nothing_is_left_behind(server: Any) -> None:
    _srv, engine, _records = server
    stats = wait_released(engine)
    assert stats["num_sessions"] == 0 and stats["gpu_blocks"]["in_use"] == 0


# -- the parsing helpers, directly -------------------------------------------------------


def test_decode_and_encode_refuse_non_finite_numbers() -> None:
    for text in ('{"a": NaN}', '{"a": -Infinity}', "[Infinity]"):
        with pytest.raises(ProtocolError) as err:
            decode_json(text, "body")
        assert err.value.code == "invalid_json"
    with pytest.raises(ValueError):
        encode_json({"a": math.nan})
    assert encode_json({"a": "é", "b": [1, 2.5]}) == '{"a":"é","b":[1,2.5]}'


def test_check_encodable_bounds_depth_without_recursion() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    with pytest.raises(ProtocolError) as err:
        check_encodable({"x": deep})
    assert err.value.code == "invalid_json"
    ok: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH - 2):
        ok = {"k": ok}
    check_encodable({"x": ok})
    with pytest.raises(ProtocolError) as err:
        check_encodable({"x": [1.0, math.inf]})
    assert err.value.param is not None and err.value.param.startswith("x")


def test_server_config_is_validated() -> None:
    with pytest.raises(ValueError, match="exceeds max_output_tokens_cap"):
        ServerConfig(default_max_output_tokens=100, max_output_tokens_cap=10)
    with pytest.raises(ValueError, match="send_timeout_s"):
        ServerConfig(send_timeout_s=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        ServerConfig(idle_timeout_s=-1)
    with pytest.raises(ValueError, match="model_name"):
        ServerConfig(model_name="")


# -- regressions from the hostile review ---------------------------------------------------


def test_a_tiny_temperature_is_greedy_and_fails_nobody_else(server: Any) -> None:
    srv, _engine, records = server
    tool = {"type": "function", "name": "ls", "parameters": {"type": "object",
            "properties": {"path": {"type": "string"}}}}  # fmt: skip
    with connect(srv.ws_url, additional_headers={"Authorization": "Bearer sk-other"}) as ws:
        create(ws, input="list files", tools=[tool], tool_choice="required",
               max_output_tokens=40, temperature=1.0)  # fmt: skip
        assert next(events(ws))["type"] == "response.created"
        for temp in (1e-40, 5e-324, 1e-6):  # an attacker's request in the same batches
            r = httpx.post(f"{srv.base_url}/responses", timeout=30, json={
                "model": "tiny", "input": "x", "temperature": temp, "max_output_tokens": 4})  # fmt: skip
            assert r.status_code == 200, r.text
        assert read_response(events(ws))[-1]["type"] in DONE  # the other response survives
    assert not records.tracebacks()


def test_sampling_survives_degenerate_rows() -> None:
    from pagedkv.serving.generation import sample_rows

    logits = torch.tensor([[0.0, 3.0, 1.0], [float("-inf"), float("-inf"), float("-inf")]])
    allowed = torch.arange(3)
    gen = torch.Generator().manual_seed(0)
    assert sample_rows(logits, [0, 1], allowed, [1e-40, 1.0], gen)[0] == 1
    assert sample_rows(logits, [0], allowed, [5e-324], gen) == [1]


def test_lone_surrogates_in_names_are_refused_not_echoed(server: Any) -> None:
    srv, _engine, records = server
    bad = [
        '{"type": "response.create", "model": "tiny", "input": "hi", "x\\ud800": "\\udc00"}',
        '{"type": "response.create", "model": "tiny", "input": "hi", "stream_id": "\\ud800"}',
        '{"type": "response.create", "model": "tiny", "input": "hi", '
        '"metadata": {"k\\udfff": "v"}}',
        '{"type": "response.create", "model": "tiny", "input": "hi", '
        '"tools": [{"type": "function", "name": "\\ud800", "parameters": {}}]}',
    ]
    with connect(srv.ws_url) as ws:
        for raw in bad:
            err = ws_error(ws, raw)
            assert (err["status"], err["error"]["code"]) == (400, "invalid_value"), err
            assert "stream_id" not in err
        assert read_response(_run(ws, "still open"))[-1]["type"] in DONE
    for raw in bad:
        body = '{"model"' + raw[raw.index('"model"') + 7 :]
        status, err = http_error(srv, body)
        assert (status, err["code"]) == (400, "invalid_value")
    assert not records.tracebacks()


def test_a_huge_integer_number_is_refused(server: Any) -> None:
    srv, _engine, records = server
    for field in ("top_p", "temperature"):
        for sign in ("", "-"):
            status, err = http_error(
                srv, f'{{"model": "tiny", "input": "x", "{field}": {sign}1{"0" * 400}}}'
            )
            assert (status, err["code"], err["param"]) == (400, "invalid_value", field)
    with connect(srv.ws_url) as ws:
        err = ws_error(ws, '{"type": "response.create", "model": "tiny", "input": "x", '
                           f'"top_p": 1{"0" * 400}}}')  # fmt: skip
        assert err["error"]["param"] == "top_p"
    assert not records.tracebacks()


def _http_reply(sock: socket.socket) -> str:
    """One whole HTTP reply: the head, then as many body bytes as it declares (the body
    may arrive in a later segment than the head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_that_never_arrives_times_out_and_frees_its_slot(server: Any) -> None:
    srv, _engine, _records = server
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100\r\n\r\n{\"model\"")  # fmt: skip
        started = time.monotonic()
        reply = _http_reply(sock)
        assert time.monotonic() - started < 5.0
        assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
    finally:
        sock.close()
    quotas = srv._config.app.state.quotas
    assert quotas.snapshot()["http_requests"] == 0


def test_a_client_that_leaves_mid_body_leaves_no_traceback_and_no_slot(server: Any) -> None:
    srv, _engine, records = server
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"model\": \"tiny\", ")  # fmt: skip
        time.sleep(0.2)
        sock.close()
    quotas = srv._config.app.state.quotas
    deadline = time.monotonic() + 5.0
    while quotas.snapshot()["http_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert quotas.snapshot()["http_requests"] == 0
    assert not records.tracebacks()
    r = httpx.post(f"{srv.base_url}/responses", json={"model": "tiny", "input": "hi"})
    assert r.status_code == 200, r.text


def test_unknown_routes_get_a_json_error(server: Any) -> None:
    srv, _engine, _records = server
    r = httpx.get(f"http://127.0.0.1:{srv.port}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.delete(f"{srv.base_url}/responses")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
