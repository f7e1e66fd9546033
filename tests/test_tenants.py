"""Tenants from API keys: no tenant hits or probes another's cache; 401s; the admin key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from pagedkv.serving.auth import ANONYMOUS_TENANT, Authenticator, AuthError, load_authenticator
from pagedkv.serving.testing import engine_check, read_response, tiny_server

KEYS = {"sk-alice-1": "alice", "sk-alice-2": "alice", "sk-bob": "bob"}
PROMPT = "You are a coding agent in a large repository. " * 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    auth = Authenticator.from_keys(KEYS, admin_keys=("sk-admin",))
    with tiny_server(auth=auth) as (srv, engine):
        yield srv, engine


def client(srv: Any, key: str) -> Any:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)


def http_cached(srv: Any, key: str, text: str) -> int:
    r = client(srv, key).responses.create(model="tiny", input=text, max_output_tokens=2)
    return int(r.usage.input_tokens_details.cached_tokens)


def ws_cached(srv: Any, key: str, text: str) -> int:
    with client(srv, key).responses.connect() as conn:
        conn.response.create(model="tiny", input=text, max_output_tokens=2, store=False)
        done = read_response(conn)[-1]
        assert done.type in ("response.completed", "response.incomplete"), done
        return int(done.response.usage.input_tokens_details.cached_tokens)


# -- isolation -------------------------------------------------------------------------


@pytest.mark.parametrize("via", [http_cached, ws_cached], ids=["http", "ws"])
def test_identical_prompts_are_cached_within_a_tenant_only(server: Any, via: Any) -> None:
    srv, engine = server
    text = via.__name__ + PROMPT
    assert via(srv, "sk-alice-1", text) == 0
    assert via(srv, "sk-bob", text) == 0  # another tenant: nothing to see
    assert via(srv, "sk-alice-2", text) > 0  # the same tenant through another key: shared
    assert via(srv, "sk-bob", text) > 0  # bob's own earlier request
    engine_check(engine)


def test_prompt_cache_key_sub_salts_within_a_tenant(server: Any) -> None:
    srv, engine = server
    text = "cache key " + PROMPT

    def cached(key: str, cache_key: str | None) -> int:
        extra = {} if cache_key is None else {"prompt_cache_key": cache_key}
        r = client(srv, key).responses.create(model="tiny", input=text, max_output_tokens=2,
                                              **extra)  # fmt: skip
        assert r.prompt_cache_key == cache_key
        return int(r.usage.input_tokens_details.cached_tokens)

    assert cached("sk-alice-1", "team-a") == 0
    assert cached("sk-alice-2", "team-a") > 0  # the same key within the tenant: shared
    assert cached("sk-alice-1", "team-b") == 0  # another key: its own chain
    assert cached("sk-alice-1", None) == 0  # no key is a chain of its own too
    assert cached("sk-bob", "team-a") == 0  # the same key in another tenant: nothing
    # over WebSocket, a turn that switches keys starts over under the new one
    with client(srv, "sk-alice-1").responses.connect() as conn:
        for key, expect_hit in (("team-b", True), ("team-c", False), ("team-c", True)):
            conn.response.create(model="tiny", input=text, max_output_tokens=2, store=False,
                                 prompt_cache_key=key)  # fmt: skip
            done = read_response(conn)[-1]
            got = int(done.response.usage.input_tokens_details.cached_tokens)
            assert (got > 0) == expect_hit, (key, got)
    with pytest.raises(openai.BadRequestError):
        client(srv, "sk-alice-1").responses.create(model="tiny", input="x",
                                                   prompt_cache_key="k" * 300)  # fmt: skip
    engine_check(engine)


def test_a_guessed_secret_teaches_another_tenant_nothing(server: Any) -> None:
    srv, _engine = server
    secret = 4711
    base = "probe " + PROMPT
    http_cached(srv, "sk-alice-1", f"{base} The vault PIN is {secret}. Never tell.")
    seen = {
        guess: http_cached(srv, "sk-bob", f"{base} The vault PIN is {guess}. Never tell.")
        for guess in (1234, secret, 9999)
    }
    # bob's first guess computes the shared prefix under bob's salt; after that every
    # guess hits only bob's own blocks, the same whatever the guess is
    assert seen[secret] == seen[9999]
    alice = http_cached(srv, "sk-alice-2", f"{base} The vault PIN is {secret}. Never tell.")
    assert alice > seen[secret]  # alice's own tenant does hit her secret's blocks


# -- refusals --------------------------------------------------------------------------


def test_unknown_or_missing_keys_get_401_as_the_sdk_expects(server: Any) -> None:
    srv, _engine = server
    with pytest.raises(openai.AuthenticationError) as err:
        client(srv, "sk-mallory").responses.create(model="tiny", input="hi")
    assert err.value.status_code == 401
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key"
    assert "sk-mallory" not in json.dumps(body)  # the key is not echoed
    r = httpx.post(f"{srv.base_url}/responses", json={"model": "tiny", "input": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(f"{srv.base_url}/responses", json={}, headers={"authorization": "Basic eA=="})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]


def test_a_websocket_without_a_valid_key_is_refused_at_the_handshake(server: Any) -> None:
    srv, engine = server
    for headers in ({}, {"Authorization": "Bearer sk-mallory"}):
        with pytest.raises(InvalidStatus) as err:
            connect(srv.ws_url, additional_headers=headers, open_timeout=10).close()
        assert err.value.response.status_code == 401
        assert json.loads(err.value.response.body)["error"]["type"] == "invalid_request_error"
    deadline = time.monotonic() + 10  # earlier tests' connections close asynchronously
    while engine_check(engine)["num_sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_check(engine)["num_sessions"] == 0  # a refused handshake opens nothing


def test_engine_stats_needs_the_admin_key(server: Any) -> None:
    srv, _engine = server
    url = f"{srv.base_url}/engine/stats"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer sk-alice-1"}).status_code == 401
    ok = httpx.get(url, headers={"authorization": "Bearer sk-admin"})
    assert ok.status_code == 200 and "scheduler" in ok.json()


def test_without_keys_each_token_is_its_own_tenant_and_stats_are_closed() -> None:
    with tiny_server() as (srv, _engine):
        text = "no keys " + PROMPT
        assert http_cached(srv, "token-a", text) == 0
        assert http_cached(srv, "token-b", text) == 0
        assert http_cached(srv, "token-a", text) > 0
        assert httpx.get(f"{srv.base_url}/engine/stats").status_code == 403


# -- the authenticator -----------------------------------------------------------------


def test_authenticator_rules() -> None:
    auth = Authenticator.from_keys(KEYS, admin_keys=("sk-admin",))
    assert auth.caller("Bearer sk-alice-1").tenant == "alice"
    assert auth.caller("bearer  sk-bob ").tenant == "bob"
    for header, code in ((None, "missing_api_key"), ("Bearer nope", "invalid_api_key"),
                         ("Token sk-bob", "invalid_api_key"), ("Bearer a b", "invalid_api_key"),
                         ("Bearer " + "x" * 600, "invalid_api_key")):  # fmt: skip
        with pytest.raises(AuthError) as err:
            auth.caller(header)
        assert err.value.code == code and err.value.status == 401
    auth.check_admin("Bearer sk-admin")
    with pytest.raises(AuthError):
        auth.check_admin("Bearer sk-alice-1")
    open_auth = Authenticator()
    assert open_auth.caller(None).tenant == ANONYMOUS_TENANT
    a, b = open_auth.caller("Bearer t1").tenant, open_auth.caller("Bearer t2").tenant
    assert a != b and a == open_auth.caller("Bearer t1").tenant and "t1" not in a
    with pytest.raises(AuthError) as err:
        open_auth.check_admin("Bearer t1")
    assert err.value.status == 403
    for bad in ({"k": "no spaces allowed"}, {"k": ""}, {"k": ANONYMOUS_TENANT}, {"": "t"}):
        with pytest.raises(ValueError):
            Authenticator.from_keys(bad)


def test_keys_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "sk-1", "tenant": "t1"},
                                         {"key": "sk-ops", "tenant": "ops", "admin": True}]}))  # fmt: skip
    auth = load_authenticator(path, environ={"PAGEDKV_API_KEYS": "sk-2=t2, sk-3=t1"})
    assert [auth.caller(f"Bearer sk-{k}").tenant for k in ("1", "2", "3", "ops")] == [
        "t1", "t2", "t1", "ops"
    ]  # fmt: skip
    auth.check_admin("Bearer sk-ops")
    env_admin = load_authenticator(environ={"PAGEDKV_ADMIN_KEY": "sk-root"})
    env_admin.check_admin("Bearer sk-root")
    assert not env_admin.requires_keys
    for text, message in (
        ("{", "not valid JSON"),
        ('{"keys": {}}', r'expected \{"keys": \[\.\.\.\]\}'),
        ('{"keys": [{"key": "sk-secret"}]}', "needs a string 'tenant'"),
        ('{"keys": [{"key": "sk-secret", "tenant": "a b"}]}', "tenant name"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            load_authenticator(path, environ={})
        assert "sk-secret" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read keys file"):
        load_authenticator(tmp_path / "missing.json", environ={})
    with pytest.raises(ValueError, match="entry 0 is not key=tenant"):
        load_authenticator(environ={"PAGEDKV_API_KEYS": "sk-lonely"})


def test_serve_refuses_a_bad_keys_file_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pagedkv.cli.main import main

    assert main(["serve", "--api-keys-file", "/nonexistent/keys.json"]) == 2
    err = capsys.readouterr().err
    assert "cannot read keys file /nonexistent/keys.json" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_serve_accepts_every_log_level_uvicorn_has() -> None:
    import argparse

    from pagedkv.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    for level in ("trace", "TRACE", "debug", "warning"):
        assert parser.parse_args(["serve", "--log-level", level]).log_level == level.lower()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-level", "verbose"])


def test_serve_wires_keys_file_limits_and_timeouts_into_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pagedkv serve` up to the point where uvicorn would start: `--log-level trace`
    starts, the keys file's limits reach the quotas and the scheduler, the timeouts the
    server config."""
    import uvicorn

    from pagedkv.cli.main import main

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({
        "keys": [{"key": "sk-a", "tenant": "acme"}],
        "default_limits": {"max_pinned_sessions": 3},
        "tenants": {"acme": {"max_connections": 7}},
    }))  # fmt: skip
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    code = main([
        "serve", "--model", "tiny", "--num-gpu-blocks", "64", "--api-keys-file", str(keys),
        "--log-level", "trace", "--send-timeout", "3", "--idle-timeout", "0",
        "--max-connections", "50", "--tenant-max-connections", "2", "--port", "0",
    ])  # fmt: skip
    assert code == 0 and seen["log_level"] == "trace"
    app = seen["app"]
    quotas = app.state.quotas
    assert quotas.max_connections == 50
    assert quotas.policy.limits("acme").max_connections == 7
    assert quotas.policy.limits("other").max_connections == 2
    sched = app.state.engine.config.scheduler
    assert sched.tenant_pinned_cap("acme") == 3 and sched.tenant_pinned_cap("x") == 3
    routes = {r.path: r for r in app.routes}
    assert "/metrics" in routes
    out = capsys.readouterr().out
    assert "at most 50 connections" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "must be 0-65535"),
        (["--send-timeout", "nan"], "finite number > 0"),
        (["--idle-timeout", "-1"], "finite number >= 0"),
        (["--max-connections", "0"], "must be >= 1"),
        (["--max-output-tokens-cap", "x"], "expected an integer"),
        (["--max-output-tokens", "64", "--max-output-tokens-cap", "32"], "exceeds"),
    ],
)
def test_serve_options_are_validated(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedkv.cli.main import main

    try:
        code = main(["serve", *argv])
    except SystemExit as exc:  # argparse's own exit
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
