"""The package tree is the architecture: each layer of `pagedkv` imports only the layers
below it, and the project owns exactly one top-level import name, `pagedkv`.

Walks every import statement of every module (including imports inside functions and
`TYPE_CHECKING` blocks: a lazy upward import is still an upward dependency).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pagedkv"

# layer -> the layers it may import (besides itself). Two stacks share the bottom:
# kernels < cache < tiers < scheduler < sim, and kernels < cache < tiers < model < serving
# < integrations; cli sits on both. sim and model never import each other.
ALLOWED: dict[str, frozenset[str]] = {
    "kernels": frozenset(),
    "cache": frozenset(),  # plain ints and bytes: no torch, so no kernels either
    "tiers": frozenset({"kernels", "cache"}),
    "scheduler": frozenset({"cache", "tiers"}),  # never touches tensors (no kernels)
    "sim": frozenset({"kernels", "cache", "tiers", "scheduler"}),
    "model": frozenset({"kernels", "cache", "tiers"}),
    "serving": frozenset({"kernels", "cache", "tiers", "scheduler", "model"}),
    "integrations": frozenset({"kernels", "cache", "tiers", "scheduler", "model", "serving"}),
    "cli": frozenset(
        {"kernels", "cache", "tiers", "scheduler", "sim", "model", "serving", "integrations"}
    ),
}

# third-party import names the package may use; each is also a distribution declared in
# pyproject.toml under the same name, `-` read as `_` (checked below)
THIRD_PARTY = frozenset(
    {"torch", "numpy", "xxhash", "triton", "safetensors", "starlette", "uvicorn",
     "websockets", "openai", "matplotlib", "tqdm", "prometheus_client", "h11",
     "transformers", "tokenizers", "redis", "httpx"}
)  # fmt: skip


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else None  # None: pagedkv/__init__.py itself


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module == "pagedkv":  # `from pagedkv import kernels`
                found.extend((node.lineno, f"pagedkv.{a.name}") for a in node.names)
            else:
                assert node.module is not None
                found.append((node.lineno, node.module))
    return found


def test_every_subpackage_is_a_known_layer() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(ALLOWED), (
        f"subpackages {sorted(subpackages)} != layers {sorted(ALLOWED)}: "
        "add a new package to ALLOWED with the layers it may use"
    )
    stray = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not stray, f"modules directly under pagedkv/ belong to no layer: {stray}"


def test_imports_follow_the_layering() -> None:
    stdlib = sys.stdlib_module_names
    bad: list[str] = []
    for path in _modules():
        layer = _layer(path)
        rel = path.relative_to(ROOT)
        for line, name in _imports(path):
            where = f"{rel}:{line}: imports {name}"
            if name.startswith("."):
                bad.append(f"{where} (relative; use the absolute pagedkv.* name)")
                continue
            top = name.split(".")[0]
            if top == "pagedkv":
                parts = name.split(".")
                if len(parts) == 1:
                    bad.append(f"{where} (the root package: import the layer you need)")
                    continue
                target = parts[1]
                if target not in ALLOWED:
                    bad.append(f"{where} (no such layer)")
                elif layer is None:
                    bad.append(f"{where} (pagedkv/__init__ stays import-free)")
                elif target != layer and target not in ALLOWED[layer]:
                    allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing"
                    bad.append(f"{where} ({layer} may import only {allowed})")
            elif top not in stdlib and top not in THIRD_PARTY:
                bad.append(f"{where} (not pagedkv, the standard library or a declared dependency)")
    assert not bad, "\n".join(bad)


def test_only_top_level_name_is_pagedkv() -> None:
    """The distribution installs one import package; nothing else at the top."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["pagedkv*"], include
    top = {
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests"
    }
    assert top == {"pagedkv"}, f"top-level packages in the repository: {sorted(top)}"
    script = config["project"]["scripts"]["pagedkv"]
    assert script.startswith("pagedkv."), script


def test_declared_dependencies_cover_third_party_imports() -> None:
    """Every third-party name the layering test accepts is a declared dependency."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = config["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.extend(extra)
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_") for d in declared}
    missing = sorted(THIRD_PARTY - names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


@pytest.mark.parametrize("layer", ["cache", "scheduler", "sim"])
def test_tensor_free_layers_import_without_torch(layer: str) -> None:
    """cache, scheduler and sim model an 80 GB GPU without allocating it: importing them
    (and the layers they use) loads no torch. Runs in a fresh interpreter."""
    code = (
        "import sys\n"
        f"import pagedkv.{layer}\n"
        "loaded = sorted(m for m in ('torch', 'triton') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"import pagedkv.{layer} loaded {out.stdout.strip()}"


def test_command_line_help_loads_no_heavy_stack() -> None:
    """`pagedkv --help` builds every subcommand's parser without loading torch or the
    serving stack (fast, and it works on an install without the extras)."""
    code = (
        "import sys\n"
        "from pagedkv.cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = ('torch', 'triton', 'starlette', 'uvicorn', 'openai', 'matplotlib')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"building the parser loaded {out.stdout.strip()}"
