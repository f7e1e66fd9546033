"""Registers, spills and shared memory of every Triton kernel, compiled for sm_80 and sm_90
without a GPU (prints a table; `--check` exits 1 on a spill or shared memory over the
architecture's limit).

    python benchmarks/kernel_resources.py [--arch 80,90] [--quick] [--check] [--json PATH]
        [--markdown PATH] [--jobs N]

How: each kernel is launched through its real launcher (`paged_decode`, `paged_prefill`,
`store_kv`, `copy_blocks`) on small CPU tensors laid out as the engine lays them out,
with the launch itself captured instead of run, and the planners answering as they do
on a CUDA device (the target's SM count, the CUDA tile configs). Each captured launch is
specialised exactly as Triton's JIT specialises it (ints equal to 1 become constants,
16-divisible ints and pointers get divisibility hints) and compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, which runs the real
ptxas that ships in the Triton wheel; `cuobjdump --dump-resource-usage` (also shipped)
reads registers, stack and static shared memory from the cubin, Triton's own `ptxas -v`
log (TRITON_DUMP_PTXAS_LOG) gives the spill stores and loads, and Triton's metadata the
dynamic shared memory. Programs per SM follow from the register file
(65,536 per SM, allocated per warp in units of 256), shared memory (per SM, less 1 KB
reserved per block), 2,048 threads and 32 blocks per SM.

Configurations: head_dim 64/128/256 x bf16/fp16/fp32 x GQA 1/4/8 x block_size 16/32/64;
decode both as one split (large batch) and split-KV with its merge (batch 1, long
context). `--quick`: head_dim 128, bf16 and fp32, GQA 1 and 8, block_size 16.

Must run without TRITON_INTERPRET (it is removed from the environment on start, before
Triton is imported). Needs only the Triton wheel's CUDA backend, no GPU, no CUDA driver.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, said out loud
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton's own `ptxas -v` output: the spill counts
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would not run ptxas again

import argparse
import contextlib
import io
import itertools
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# architecture limits (CUDA C Programming Guide, compute capabilities 8.0 and 9.0)
ARCHS: dict[int, dict[str, int]] = {
    80: {"sms": 108, "smem_per_sm": 167_936, "smem_per_block": 166_912},
    90: {"sms": 132, "smem_per_sm": 233_472, "smem_per_block": 232_448},
}
REGS_PER_SM = 65_536
REG_UNIT = 256  # registers are allocated per warp in units of 256
MAX_THREADS_PER_SM = 2_048
MAX_BLOCKS_PER_SM = 32
SMEM_RESERVED_PER_BLOCK = 1_024

HEAD_DIMS = (64, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GQAS = (1, 4, 8)
BLOCK_SIZES = (16, 32, 64)
NUM_Q_HEADS = 32


@dataclass(frozen=True, slots=True)
class Config:
    """One library configuration whose launches are compiled."""

    head_dim: int
    dtype: str
    gqa: int
    block_size: int


@dataclass(frozen=True, slots=True)
class Launch:
    """A captured launch: the kernel's name, what it was launched for, and its args."""

    kernel: str
    variant: str
    config: Config
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources of one compiled launch on one architecture."""

    kernel: str
    variant: str
    arch: int
    head_dim: int
    dtype: str
    gqa: int
    block_size: int
    constexprs: str  # the tile constants, e.g. "BLOCK_N=64"
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int  # stack frame per thread (spills, and the odd ptxas scratch slot)
    spill_store_bytes: int  # ptxas -v: bytes of register spill stores per thread
    spill_load_bytes: int
    static_smem: int
    dynamic_smem: int
    programs_per_sm: int
    limited_by: str  # "registers", "shared memory", "threads" or "blocks"

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem

    def problems(self) -> list[str]:
        out = []
        if self.spill_store_bytes or self.spill_load_bytes:
            out.append(
                f"{self.spill_store_bytes} B of spill stores, {self.spill_load_bytes} B of loads"
            )
        limit = ARCHS[self.arch]["smem_per_block"]
        if self.smem > limit:
            out.append(f"{self.smem} B of shared memory > the {limit} B sm_{self.arch} allows")
        return out


# -- capturing launches ------------------------------------------------------------------


class _Capture:
    """Stands in for a JITFunction: `kernel[grid](...)` records the call."""

    def __init__(self, name: str, sink: list[tuple[str, tuple[Any, ...], dict[str, Any]]]):
        self.name = name
        self.sink = sink

    def __getitem__(self, grid: object) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append((self.name, args, kwargs))

        return launch


@contextlib.contextmanager
def _capturing(arch: int) -> Iterator[list[tuple[str, tuple[Any, ...], dict[str, Any]]]]:
    """Launchers run their CUDA branch on CPU tensors and record their kernel launches."""
    from pagedkv.kernels import (
        copy,
        copy_kernel,
        decode,
        decode_kernel,
        prefill,
        prefill_kernel,
        store,
        store_kernel,
    )

    cuda = torch.device("cuda")
    sink: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    kernels = [
        (decode_kernel, "_paged_decode_kernel"),
        (decode_kernel, "_decode_merge_kernel"),
        (prefill_kernel, "_paged_prefill_kernel"),
        (store_kernel, "_store_kv_kernel"),
        (copy_kernel, "_copy_blocks_kernel"),
    ]
    saved: list[tuple[Any, str, Any]] = [(mod, name, getattr(mod, name)) for mod, name in kernels]
    plan_prefill, copy_chunk = prefill.prefill_config, copy.copy_chunk
    patches: list[tuple[Any, str, Any]] = [
        (decode, "num_sms", lambda device: ARCHS[arch]["sms"]),
        (prefill, "prefill_config", lambda h, dt, device: plan_prefill(h, dt, cuda)),
        (prefill, "cuda_capability", lambda device: arch),
        (copy, "copy_chunk", lambda device: copy_chunk(cuda)),
    ]
    for mod in (decode, prefill, store, copy):
        patches += [
            (mod, "resolve_backend", lambda op, backend, device: "triton"),
            (mod, "check_kernel_runnable", lambda op, kernel, device: None),
        ]
    saved += [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name in kernels:
            setattr(mod, name, _Capture(name, sink))
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield sink
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def configs(quick: bool) -> list[Config]:
    if quick:
        return [Config(128, d, g, 16) for d in ("bf16", "fp32") for g in (1, 8)]
    return [
        Config(h, d, g, b) for h, d, g, b in itertools.product(HEAD_DIMS, DTYPES, GQAS, BLOCK_SIZES)
    ]


def capture(cfg: Config, arch: int) -> list[Launch]:
    """The launches the library makes for `cfg` (engine layouts, CUDA planner choices)."""
    from pagedkv.kernels import copy_blocks, paged_decode, paged_prefill, store_kv

    dt = DTYPES[cfg.dtype]
    hkv = NUM_Q_HEADS // cfg.gqa
    bs, d = cfg.block_size, cfg.head_dim
    num_blocks, layers = 8, 2
    # the KVStore layout: [blocks, layers, 2 (k/v), block_size, Hkv, D]; views per layer
    kv = torch.zeros(num_blocks, layers, 2, bs, hkv, d, dtype=dt)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    out: list[Launch] = []
    with _capturing(arch) as sink:

        def take(variant: str) -> None:
            for name, args, kwargs in sink:
                out.append(Launch(name, variant, cfg, args, kwargs))
            sink.clear()

        # decode, one split: a batch large enough to fill the GPU
        batch = 4 * ARCHS[arch]["sms"]
        q = torch.zeros(batch, NUM_Q_HEADS, d, dtype=dt)
        tables = torch.zeros(batch, 4, dtype=torch.int32)
        lens = torch.full((batch,), 4 * bs, dtype=torch.int32)
        paged_decode(q, k_cache, v_cache, tables, lens, backend="triton")
        take("one split")
        # decode, split-KV then merge: one long sequence
        q1 = torch.zeros(1, NUM_Q_HEADS, d, dtype=dt)
        long_tables = torch.zeros(1, 32_768 // bs, dtype=torch.int32)
        paged_decode(q1, k_cache, v_cache, long_tables, torch.ones(1, dtype=torch.int32),
                     backend="triton")  # fmt: skip
        take("split-KV")
        # prefill: two sequences of new tokens
        qp = torch.zeros(96, NUM_Q_HEADS, d, dtype=dt)
        qsl = torch.tensor([0, 64, 96], dtype=torch.int32)
        paged_prefill(qp, k_cache, v_cache, torch.zeros(2, 8, dtype=torch.int32), qsl,
                      torch.tensor([64, 96], dtype=torch.int32), backend="triton")  # fmt: skip
        take("prefill")
        # storing new tokens' K/V
        k_new = torch.zeros(96, hkv, d, dtype=dt)
        store_kv(k_new, k_new.clone(), k_cache, v_cache, torch.arange(96, dtype=torch.int64),
                 backend="triton")  # fmt: skip
        take("store")
        if cfg.gqa == 1 and cfg.head_dim == 128:  # the copy sees only bytes: once per dtype/bs
            dst = torch.zeros_like(kv)
            copy_blocks(kv, dst, [0, 1], [2, 3], backend="triton")
            take("copy")
    return out


# -- compiling -------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def has_cuda_backend() -> tuple[bool, str]:
    """Whether this Triton wheel can compile for CUDA targets here (and why not)."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"triton does not import: {type(exc).__name__}: {exc}"
    if "nvidia" not in backends:
        return False, f"triton {triton.__version__} has no CUDA (nvidia) backend"
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(_tool(tool), os.X_OK):
            return False, f"triton {triton.__version__} ships no {tool} ({_tool(tool)})"
    return True, ""


def _signature(fn: Any, launch: Launch, backend: Any) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as Triton's JIT derives them for these args."""
    from triton._C.libtriton import native_specialize_impl

    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    positional = iter(launch.args)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = launch.kwargs[p.name]
            continue
        value = next(positional)
        ty, attr = native_specialize_impl(type(backend), value, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _occupancy(arch: int, regs: int, warps: int, smem: int) -> tuple[int, str]:
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    limits = {
        "registers": (REGS_PER_SM // per_warp) // warps if per_warp else MAX_BLOCKS_PER_SM,
        "shared memory": ARCHS[arch]["smem_per_sm"] // (smem + SMEM_RESERVED_PER_BLOCK),
        "threads": MAX_THREADS_PER_SM // (32 * warps),
        "blocks": MAX_BLOCKS_PER_SM,
    }
    which = min(limits, key=lambda k: limits[k])
    return limits[which], which


def compile_one(launch: Launch, arch: int) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from pagedkv.kernels import (
        copy_kernel,
        decode_kernel,
        prefill_kernel,
        store_kernel,
    )

    fn = next(
        getattr(m, launch.kernel)
        for m in (decode_kernel, prefill_kernel, store_kernel, copy_kernel)
        if hasattr(m, launch.kernel)
    )
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs = _signature(fn, launch, backend)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v, exactly as Triton ran it
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options)  # fmt: skip
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if spills is None:
        raise RuntimeError(f"no ptxas -v report for {launch.kernel}: {log.getvalue()[-2000:]!r}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", dump.split("Function", 1)[1]))
    regs, stack, static = int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"])
    md = compiled.metadata
    dynamic = int(md.shared)
    warps = int(md.num_warps)
    programs, limited = _occupancy(arch, regs, warps, static + dynamic)
    tiles = ",".join(
        f"{k}={v}" for k, v in launch.kwargs.items() if k.startswith("BLOCK") or k == "CHUNK"
    )
    c = launch.config
    return Usage(
        kernel=launch.kernel.strip("_").removesuffix("_kernel"),
        variant=launch.variant,
        arch=arch,
        head_dim=c.head_dim,
        dtype=c.dtype,
        gqa=c.gqa,
        block_size=c.block_size,
        constexprs=tiles,
        num_warps=warps,
        num_stages=int(getattr(md, "num_stages", options.get("num_stages", 0))),
        registers=regs,
        stack_bytes=stack,
        spill_store_bytes=int(spills.group(1)),
        spill_load_bytes=int(spills.group(2)),
        static_smem=static,
        dynamic_smem=dynamic,
        programs_per_sm=programs,
        limited_by=limited,
    )


def _work(item: tuple[Config, int]) -> list[Usage]:
    cfg, arch = item
    return [compile_one(launch, arch) for launch in capture(cfg, arch)]


def measure(archs: list[int], quick: bool, jobs: int) -> list[Usage]:
    items = [(c, a) for a in archs for c in configs(quick)]
    if jobs <= 1:
        return [u for item in items for u in _work(item)]
    with ProcessPoolExecutor(jobs) as pool:
        return [u for chunk in pool.map(_work, items) for u in chunk]


# -- output ----------------------------------------------------------------------------

HEAD = ("kernel", "variant", "sm", "dtype", "D", "GQA", "bs", "tiles", "warps", "stages",
        "regs", "spill B", "stack B", "smem KB", "prog/SM", "limit")  # fmt: skip


def _cells(u: Usage) -> tuple[str, ...]:
    return (u.kernel, u.variant, str(u.arch), u.dtype, str(u.head_dim), str(u.gqa),
            str(u.block_size), u.constexprs, str(u.num_warps), str(u.num_stages),
            str(u.registers), str(u.spill_store_bytes), str(u.stack_bytes), f"{u.smem / 1024:.1f}",
            str(u.programs_per_sm), u.limited_by)  # fmt: skip


def table(usages: list[Usage]) -> str:
    rows = [HEAD, *(_cells(u) for u in usages)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(usages: list[Usage]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_cells(u)) + " |" for u in usages]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--check", action="store_true", help="exit 1 on a spill or smem overflow")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument(
        "--markdown", help="write the table as Markdown here ({arch} in it: one file per arch)"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = ap.parse_args(argv)
    ok, why = has_cuda_backend()
    if not ok:
        print(f"kernel_resources: cannot compile for CUDA here: {why}", file=sys.stderr)
        return 3
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        ap.error(f"--arch: expected comma-separated ints, got {args.arch!r}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"--arch: unknown compute capability {unknown[0]}; known: {sorted(ARCHS)}")
    usages = measure(archs, args.quick, args.jobs)
    print(table(usages))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(u) for u in usages], indent=1) + "\n")
    if args.markdown:  # "{arch}" in the path: one file per architecture
        for arch in archs if "{arch}" in args.markdown else [None]:
            rows = [u for u in usages if arch is None or u.arch == arch]
            Path(args.markdown.format(arch=arch)).write_text(markdown(rows))
    bad = [(u, p) for u in usages for p in u.problems()]
    for u, p in bad:
        print(f"PROBLEM {u.kernel} ({u.variant}) sm_{u.arch} {u.dtype} D={u.head_dim} "
              f"GQA={u.gqa} bs={u.block_size}: {p}", file=sys.stderr)  # fmt: skip
    print(f"{len(usages)} compiled launches, {len(bad)} problems", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
