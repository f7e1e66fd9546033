"""The CI skip policy (`skip_policy`): under CI a skip that is not a GPU skip fails the
run; GPU skips and xfails do not. Runs pytest in a subprocess on a scratch test file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = """
import pytest
from skip_policy import GPU_SKIP_REASON

@pytest.mark.gpu
@pytest.mark.skip(reason=GPU_SKIP_REASON)
def test_gpu():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    raise AssertionError

def test_ok():
    pass
"""


def _run(tmp_path: Path, body: str, *, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "skip_policy", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_case.py")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_gpu_skips_and_xfails_pass_under_ci(tmp_path: Path) -> None:
    r = _run(tmp_path, CASES, ci=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "extra",
    [
        "def test_missing():\n    pytest.importorskip('no_such_module_pagedkv')\n",
        "@pytest.mark.skip(reason='data missing')\ndef test_data():\n    pass\n",
        # a gpu-marked test skipped for another reason is not a GPU skip
        "@pytest.mark.gpu\ndef test_gpu_other():\n    pytest.skip('something else')\n",
    ],
)
def test_other_skips_fail_under_ci_only(tmp_path: Path, extra: str) -> None:
    r = _run(tmp_path, CASES + "\n" + extra, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skips that are not GPU skips" in r.stdout, r.stdout
    assert _run(tmp_path, CASES + "\n" + extra, ci=False).returncode == 0


def test_a_module_skipped_at_import_fails_under_ci(tmp_path: Path) -> None:
    body = (
        "import pytest\npytest.importorskip('no_such_module_pagedkv')\n\ndef test_x():\n    pass\n"
    )
    r = _run(tmp_path, body, ci=True)
    assert r.returncode == 1 and "no_such_module_pagedkv" in r.stdout, r.stdout + r.stderr
