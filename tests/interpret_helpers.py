"""Running a test module again under the Triton interpreter, in a child process.

Triton decides once, when `triton.language` is imported, whether it interprets; a test
module collected after another that imported the kernels without TRITON_INTERPRET=1
cannot switch it on for this process, so such a test re-runs its own file in a child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def interpreter_active() -> bool:
    import triton.language.standard as std

    return type(std.sigmoid).__name__ == "InterpretedFunction"


def rerun_interpreted(test_file: str, child_var: str) -> None:
    """Run `test_file` with TRITON_INTERPRET=1 in a child and assert it passes. The child
    has `child_var` set, so a child in which the interpreter still is not active fails
    instead of recursing."""
    assert not os.environ.get(child_var), "TRITON_INTERPRET=1 had no effect in the child"
    env = {**os.environ, "TRITON_INTERPRET": "1", child_var: "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
