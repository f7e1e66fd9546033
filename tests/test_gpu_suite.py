"""The GPU suite's dry run works on a CPU machine (arguments, install, paths, imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STAGES = ("resources", "kernel-tests", "kernel-bench", "model", "offload", "agent", "hf")


def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SUITE), *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_dry_run_installs_the_package_and_checks_every_stage(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_suite --dry-run: ok" in done.stdout
    for stage in STAGES:
        assert f"would run [{stage}]" in done.stdout, stage
    # every command runs against the installed copy, not the checkout
    assert "-P benchmarks/kernel_resources.py --check" in done.stdout
    collected = (tmp_path / "out" / "dry_kernel-tests.txt").read_text()
    assert "tests collected" in collected or "test" in collected


def test_dry_run_refuses_an_unknown_stage(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "--dry-run", "kernal")
    assert done.returncode == 2
    assert "unknown argument 'kernal'" in done.stderr
