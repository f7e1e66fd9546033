"""`pagedkv demo` and `pagedkv serve` through their `add_parser` / `run` entry points."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedkv.cli import demo as cli_demo
from pagedkv.cli import serve as cli_serve
from pagedkv.serving.testing import read_response

ROOT = Path(__file__).resolve().parents[1]


def parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagedkv")
    module.add_parser(parser.add_subparsers(dest="command"))  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_demo_prints_the_per_turn_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        cli_demo,
        ["demo", "--model", "tiny", "--turns", "4", "--system-tokens", "200",
         "--tool-tokens", "20", "40", "--max-output-tokens", "3", "--threads", "1"],
    )  # fmt: skip
    assert args.func is cli_demo.run
    assert cli_demo.run(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    for row in rows[1:]:  # turn, context | pinned cached, TTFT | stateless cached, TTFT
        context, pinned_cached, stateless_cached = int(row[1]), int(row[3]), int(row[6])
        assert 0 < pinned_cached < context and stateless_cached == 0
    assert "TTFT turn 4 / turn 2" in out and "prefill FLOPs turn 4 / turn 2" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--tool-tokens", "50", "10"], "tool_min_tokens <= tool_max_tokens"),
        (["--block-size", "0"], "block_size must be an int >= 1"),
        (["--num-gpu-blocks", "1"], "over_capacity"),  # refused by the server: one line too
    ],
)
def test_demo_bad_options_get_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedkv.cli.main import main

    code = main(["demo", "--model", "tiny", "--turns", "2", "--repeats", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pagedkv demo: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_prefill_flops_count_dense_layers_and_attention_over_the_context() -> None:
    from pagedkv.model.config import LlamaConfig
    from pagedkv.serving.agent_loop import TurnTiming, flop_growth, prefill_flops

    cfg = LlamaConfig.demo()
    width = cfg.num_heads * cfg.head_dim
    embedding = cfg.vocab_size * cfg.hidden_size  # tied: a lookup, and the head once
    dense = 2.0 * (cfg.num_params - embedding) * 100 + 2.0 * embedding
    assert prefill_flops(cfg, 100, 0) == pytest.approx(
        dense + 4 * cfg.num_layers * width * 100 * 50
    )
    assert prefill_flops(cfg, 100, 10_000) - prefill_flops(cfg, 100, 0) == pytest.approx(
        4 * cfg.num_layers * width * 100 * 10_000
    )

    def turn(i: int, prompt: int, cached: int) -> TurnTiming:
        return TurnTiming(i, prompt, cached, 1.0, None, 1.0)

    # the same 500 new tokens after 3k and after 20k cached ones
    timings = [turn(1, 3000, 0), turn(2, 3500, 3000), turn(3, 20_500, 20_000)]
    want = prefill_flops(cfg, 500, 20_000) / prefill_flops(cfg, 500, 3000)
    assert flop_growth(cfg, timings) == pytest.approx(want) and want > 2


def test_serve_options_map_to_the_engine_config() -> None:
    args = parse(
        cli_serve,
        ["serve", "--model", "tiny", "--num-gpu-blocks", "64", "--num-host-blocks", "0",
         "--no-prefix-cache", "--max-pinned-sessions", "3", "--max-batch-tokens", "128"],
    )  # fmt: skip
    assert args.func is cli_serve.run
    model = cli_serve.build_model_from_args(args)
    config = cli_serve.engine_config_from_args(args, model)
    assert (config.num_gpu_blocks, config.num_host_blocks) == (64, 0)
    assert config.max_batch_tokens == config.prefill_chunk_tokens == 128
    assert config.scheduler.max_pinned_sessions == 3 and not config.scheduler.reuse_prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_the_openai_sdk() -> None:
    import openai

    port = free_port()
    code = (
        "import argparse, sys; from pagedkv.cli import serve as cli_serve; "
        "p = argparse.ArgumentParser(); cli_serve.add_parser(p.add_subparsers()); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    cmd = [sys.executable, "-c", code, "serve", "--model", "tiny", "--port", str(port),
           "--num-gpu-blocks", "128", "--threads", "1", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert client.models.list().data[0].id == "tiny"
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "pagedkv serve did not start"
                time.sleep(0.2)
        response = client.responses.create(model="tiny", input="hello", max_output_tokens=4)
        assert response.status in ("completed", "incomplete") and response.usage.output_tokens >= 1
        with client.responses.connect() as conn:
            conn.response.create(model="tiny", input="hi", max_output_tokens=2)
            kinds = [event.type for event in read_response(conn)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "response.completed" in kinds or "response.incomplete" in kinds
