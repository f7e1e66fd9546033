"""The built wheel installs one import package, `pagedkv`, and works beside the
distributions whose top-level names once collided with ours.

Regression test for the break of 2026-12: the newest `transformers` depends on Hugging
Face's `kernels`, whose top-level `kernels` module shadowed ours. Builds the wheel,
installs it into a fresh virtual environment together with `kernels` and the newest
`transformers` (unconstrained: this is the test that notices the next such release),
and runs the console script from outside the repository. Needs the package index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("kernels", "cache", "tiers", "scheduler", "sim", "model", "serving", "cli")

CHECK = """
import importlib, importlib.metadata as md, pathlib, sys
import pagedkv
here = pathlib.Path(pagedkv.__file__).resolve().parent
assert "site-packages" in str(here), f"pagedkv imported from {{here}}, not the wheel"
for name in {subpackages!r}:
    module = importlib.import_module("pagedkv." + name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"pagedkv.{{name}}.__all__ names missing: {{missing}}"
import kernels  # Hugging Face's, beside ours
assert here not in pathlib.Path(kernels.__file__).resolve().parents, kernels.__file__
import transformers
files = md.distribution("pagedkv").files or []
tops = sorted({{f.parts[0] for f in files if not f.parts[0].endswith(".dist-info")
               and f.parts[0] not in ("..", "__pycache__")}})
assert tops == ["pagedkv"], f"the wheel installs top-level {{tops}}"
print("ok", transformers.__version__, md.version("kernels"), md.version("torch"))
"""


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
def test_wheel_installs_beside_hf_kernels_and_newest_transformers(tmp_path: Path) -> None:
    import torch

    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
          str(ROOT)], cwd=tmp_path, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("pagedkv-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    # the torch build already in use (the CPU build on CI), then everything else newest
    torch_version = torch.__version__.split("+")[0]
    _run([py, "-m", "pip", "install", "--quiet", f"torch=={torch_version}"], tmp_path, 900)
    _run([py, "-m", "pip", "install", "--quiet", f"{wheel}[serving,sim]", "kernels",
          "transformers"], cwd=tmp_path, timeout=900)  # fmt: skip
    out = _run([py, "-c", CHECK.format(subpackages=SUBPACKAGES)], cwd=tmp_path, timeout=300)
    assert out.stdout.startswith("ok"), out.stdout
    script = str(env_dir / "bin" / "pagedkv")
    top = _run([script, "--help"], cwd=tmp_path, timeout=120).stdout
    assert all(c in top for c in ("demo", "serve", "simulate")), top
    sim = _run([script, "simulate", "--help"], cwd=tmp_path, timeout=120).stdout
    assert "--trace" in sim and "--policies" in sim, sim
