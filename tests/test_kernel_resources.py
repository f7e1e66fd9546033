"""Every Triton kernel compiles for sm_80 and sm_90 at its planners' configurations with no
register spill and shared memory within the architecture's limit (no GPU needed: the real
ptxas of the Triton wheel, `benchmarks/kernel_resources.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "kernel_resources.py"


def _backend() -> tuple[bool, str]:
    # the same check the tool makes, without importing it here (it must own its process:
    # the kernels are JIT functions only when TRITON_INTERPRET is unset at import)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kernel_resources as k; "
        "ok, why = k.has_cuda_backend(); print(why); sys.exit(0 if ok else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(TOOL.parent)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return done.returncode == 0, done.stdout.strip() or done.stderr.strip()


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    ok, why = _backend()
    if not ok:
        pytest.skip(f"this Triton wheel cannot compile for CUDA: {why}")
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=3000,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rows: list[dict[str, object]] = json.loads(out.read_text())
    return rows


@pytest.mark.slow
def test_no_spill_and_shared_memory_fits_at_every_planner_configuration(
    table: list[dict[str, object]],
) -> None:
    kernels = {r["kernel"] for r in table}
    assert kernels == {"paged_decode", "decode_merge", "paged_prefill", "store_kv", "copy_blocks"}
    assert {r["arch"] for r in table} == {80, 90}
    assert {(r["head_dim"], r["dtype"], r["gqa"], r["block_size"]) for r in table} >= {
        (h, d, g, b)
        for h in (64, 128, 256)
        for d in ("bf16", "fp16", "fp32")
        for g in (1, 4, 8)
        for b in (16, 32, 64)
    }
    limit = {80: 166_912, 90: 232_448}
    for r in table:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["static_smem"] + r["dynamic_smem"] <= limit[r["arch"]], r  # type: ignore[operator]
        assert 0 < r["registers"] <= 255, r  # type: ignore[operator]


@pytest.mark.slow
def test_decode_leaves_room_for_four_programs_per_sm(table: list[dict[str, object]]) -> None:
    # bf16/fp16 at head_dim <= 128: <= 128 registers at 4 warps, >= 4 programs per SM
    rows = [r for r in table if r["kernel"] == "paged_decode" and r["dtype"] != "fp32"
            and r["head_dim"] <= 128]  # type: ignore[operator]  # fmt: skip
    assert rows
    for r in rows:
        assert r["num_warps"] == 4 and r["registers"] <= 128, r  # type: ignore[operator]
        assert r["programs_per_sm"] >= 4, r  # type: ignore[operator]
