"""`pagedkv simulate`: help, a small run writing JSON and a PNG, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedkv.cli.main import main

SMALL = ["simulate", "--sessions", "3", "--no-progress", "--jobs", "1"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: --help and usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_and_explains_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "simulate" in out and "compare KV-cache policies" in out
    code, out, _ = run_cli(["simulate", "--help"], capsys)
    assert code == 0
    for option in (
        "--trace",
        "--gpu-kv-gb",
        "--gpu-fraction-of-peak",
        "--host-gb",
        "--max-pinned",
        "--policies",
        "--seed",
        "--json",
        "--plot",
        "--sweep",
    ):
        assert option in out
    code, _, err = run_cli([], capsys)
    assert code == 2 and "simulate" in err


def test_console_script_runs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pagedkv.cli.main import main; sys.exit(main())",
            "-h",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "simulate" in proc.stdout


def test_small_run_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, _ = run_cli(
        [
            *SMALL,
            "--gpu-fraction-of-peak",
            "0.5",
            "--policies",
            "all",
            "--sweep",
            "3",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ],
        capsys,
    )
    assert code == 0
    for name in ("stateless", "prefix", "prefix+host", "ours", "pinned", "ideal"):
        assert f"\n{name} " in out
    report = json.loads(out_json.read_text())
    assert [p["policy"] for p in report["policies"]][-1] == "ideal"
    assert report["workload"]["sessions"] == 3
    assert report["settings"]["gpu_fraction_of_peak"] == pytest.approx(0.5, abs=0.01)
    ideal = report["policies"][-1]
    assert ideal["hit_ratio"]["vs_ideal"] == 1.0
    assert ideal["hit_ratio"]["total"] == pytest.approx(
        report["workload"]["ideal_hit_ratio"], abs=1e-6
    )
    assert {r["policy"] for r in report["sweep"]} == {
        "prefix",
        "prefix+host",
        "ours",
        "pinned",
        "ours-off",
        "ours-layerwise",
        "ours-split",
    }
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_a_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [
        {"tokens_per_block": 4, "arrival_s": 0.0, "session_id": "a", "input_len": 9,
         "output_len": 2, "block_keys": [1, 2, 3]},
        {"arrival_s": 5.0, "session_id": "a", "input_len": 14, "output_len": 2,
         "block_keys": [1, 2, 4, 5]},
    ]  # fmt: skip
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, _ = run_cli(
        ["simulate", "--trace", str(trace), "--gpu-kv-gb", "0.1", "--no-progress", "--jobs", "1"],
        capsys,
    )
    assert code == 0 and "workload t: 2 requests, 1 sessions" in out


def test_agent_workload_with_rewrites(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--sessions", "4", "--compact-at", "5000", "--subagent-rate", "0.3",
            "--tokens-per-block", "64", "--policies", "prefix,ours,ideal", "--no-progress"]  # fmt: skip
    code, out, _err = run_cli(args, capsys)
    assert code == 0 and "64 tokens/block" in out
    sessions = int(out.split(" sessions,")[0].rsplit(" ", 1)[1])
    assert sessions > 4  # the subagents are sessions of their own


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-kv-gb", "abc"], "argument --gpu-kv-gb: expected a number > 0, got 'abc'"),
        (["--gpu-kv-gb", "-3"], "expected a number > 0, got '-3'"),
        (["--gpu-kv-gb", "1", "--gpu-fraction-of-peak", "0.2"], "not allowed with argument"),
        (["--policies", "ours,lru"], "--policies: unknown policy 'lru'"),
        (["--max-pinned", "0"], "expected an int >= 1, got '0'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--trace", "/nonexistent/x.jsonl"], "cannot read trace '/nonexistent/x.jsonl'"),
        (["--json", "/nonexistent/dir/r.json"], "does not exist"),
        (["--trace", "x.jsonl", "--sessions", "4"], "drop it with --trace"),
        (["--trace", "x.jsonl", "--compact-at", "400"], "--compact-at shapes the built-in"),
        (["--subagent-rate", "2"], "expected a probability in [0, 1], got '2'"),
        (["--tokens-per-block", "0"], "expected an int >= 1, got '0'"),
    ],
)
def test_bad_options_give_one_line_and_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["simulate", *args, "--no-progress"], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("pagedkv simulate: error: ")
    assert "Traceback" not in err and out == ""


def test_malformed_trace_line_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.jsonl"
    good = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
    bad = {**good, "timestamp": 5, "input_length": "600"}
    trace.write_text("".join(json.dumps(x) + "\n" for x in (good, good, bad)))
    code, out, err = run_cli(["simulate", "--trace", str(trace), "--no-progress"], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"pagedkv simulate: error: {trace}:3: field 'input_length' must be an int >= 1, got '600'\n"
    )
