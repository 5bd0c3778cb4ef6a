"""Compile every Triton kernel of fastdpo for Hopper (sm_90) and Ampere (sm_80), on a machine
with no GPU, and report what the compiler can tell: registers, spills, shared memory, wgmma.

    python benchmarks/kernel_compile_report.py            # markdown table; exit 1 on a problem
    python benchmarks/kernel_compile_report.py --json out.json

Triton compiles for a named `GPUTarget` without a device: this script puts a stand-in driver in
front of Triton that names the target, and compiles each kernel through its own JIT entry
(`kernel.warmup`, so arguments are specialized exactly as at a launch) with the arguments its
launcher passes for the benchmark shapes, on meta tensors (16-byte aligned, as real
allocations are). Registers, stack frame and local memory come from `cuobjdump
--dump-resource-usage` of the cubin (Triton ships cuobjdump); shared memory is Triton's
dynamic allocation plus the cubin's static one; wgmma is a grep of the PTX.

A row has a problem when the kernel does not compile, uses more shared memory than a block can
have on the target (232,448 bytes on H100/H200, 166,912 on A100), spills (stack frame or local
memory beyond SPILL_TOLERANCE: none on sm_90), or is a matmul kernel whose PTX lacks `wgmma`
on sm_90 (`mma.sync` on sm_80). The exit status is 1 when a row has a problem or a kernel has
no spec.

Adding a kernel: every `@triton.jit` kernel in kernels/ (one no other kernel calls) needs an
entry in SPECS, one line: a name, the configuration it shows, and a function returning the
`Launch` its launcher would make at the benchmark shape. tests/test_kernel_compile.py fails
for a kernel without one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastdpo.kernels
import torch
import triton
from fastdpo.kernels import linear_logprobs as head
from fastdpo.kernels import logits_fold as fold
from fastdpo.kernels import preference_loss as seqloss
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

TARGETS: dict[str, tuple[GPUTarget, int]] = {
    # name: (target, shared memory one block may use, bytes: CUDA's sharedMemPerBlockOptin)
    "sm_90": (GPUTarget("cuda", 90, 32), 232448),
    "sm_80": (GPUTarget("cuda", 80, 32), 166912),
}
MATMUL_INSTRUCTION = {"sm_90": "wgmma", "sm_80": "mma.sync"}
"""The tensor-core instruction a bf16 tl.dot must become on each target."""
SPILL_TOLERANCE = {"sm_90": 0, "sm_80": 32}
"""Spilled bytes per thread a kernel may have. fastdpo picks one tile configuration for every
CUDA device, chosen for sm_90; on sm_80 triton 3.9 spills 16 B (head forward) and 24 B (dW+db
with softcap) at 255 registers, triton 3.6 none (2026-12-03): tolerated there, not tuned yet."""

HEAD_SHAPE = (16384, 4096, 128256)
"""(N tokens, H hidden, V vocabulary): benchmarks/bench_linear_logprobs.py's GPU shape."""
PROGRAMS_WANTED = 2 * 132
"""The launchers' two programs per SM on an H100/H200 (132 SMs): sets the V splits."""
FOLD_TILE = (4096, 32768)
"""[rows, vocabulary columns] of one logits tile of the cuBLAS head (TRL's chunk sizes)."""
SEQLOSS_SHAPE = (64, 65536)
"""(P pairs, M completion tokens) of a large DPO micro-batch."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher makes it (the grid does not matter to the compiler)."""

    kernel: JITFunction
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    """"<kernels/ file>.<kernel role>", e.g. "linear_logprobs.fwd"."""
    config: str
    """What the table shows of the configuration (tiles, warps, stages, flags)."""
    launch: Callable[[], Launch]
    matmul: bool = False
    """A bf16/fp16 tl.dot kernel: must use wgmma on sm_90 (mma.sync on sm_80)."""


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A tensor with no storage: the compiler needs only its dtype and alignment."""
    return torch.empty(*shape, dtype=dtype, device="meta")


# --------------------------------------------------------------------------------------------
# Launches, as kernels/linear_logprobs.py's launchers make them at HEAD_SHAPE in bf16


def _head_tensors(bias: bool):
    rows, width, vocab = HEAD_SHAPE
    hidden, weight = meta(rows, width), meta(vocab, width)
    return rows, width, vocab, hidden, weight, meta(vocab) if bias else None


def _head_splits(rows: int, vocab: int, config: head.TileConfig, max_splits: int) -> int:
    """tiles_per_split that the launcher's _v_splits picks on an H100/H200."""
    row_tiles = math.ceil(rows / config.block_n)
    v_tiles = math.ceil(vocab / config.block_v)
    wanted = max(1, min(math.ceil(PROGRAMS_WANTED / row_tiles), v_tiles, max_splits))
    return math.ceil(v_tiles / wanted)


def head_forward(
    *, bias: bool = False, softcap: float | None = None, stats: bool = False
) -> Launch:
    """The forward kernel; with `stats`, computing every per-token statistic (head.STATS)."""
    rows, width, vocab, hidden, weight, b = _head_tensors(bias)
    config = head.default_config(torch.bfloat16, backward=False, stats=stats)
    tiles = _head_splits(rows, vocab, config, max_splits=1 << 30)
    splits = math.ceil(math.ceil(vocab / config.block_v) / tiles)
    partial = meta(splits, rows, dtype=torch.float32)
    stat_partials = (partial, partial, partial, partial, meta(splits, rows, dtype=torch.int32))
    return Launch(
        head._linear_logprobs_fwd_kernel,
        (hidden, weight, b if bias else hidden, meta(rows, dtype=torch.int64), partial, partial,
         *stat_partials, rows, vocab, width),
        dict(tiles_per_split=tiles, **head._common_args(hidden, weight, softcap, 1.0),
             **head._constexprs(hidden, b, softcap, config),
             ENTROPY=stats, SUM_P2=stats, MEAN_LOGIT=stats, TOP1=stats),
    )  # fmt: skip


def _row_vectors(rows: int) -> tuple[torch.Tensor, ...]:
    """targets, lse, grad_target, grad_softmax, entropy, grad_entropy."""
    targets = meta(rows, dtype=torch.int64)
    return (targets, *(meta(rows, dtype=torch.float32) for _ in range(5)))


def head_backward_hidden(
    *, bias: bool = False, softcap: float | None = None, entropy_grad: bool = False
) -> Launch:
    rows, width, vocab, hidden, weight, b = _head_tensors(bias)
    config = head.default_config(torch.bfloat16, backward=True)
    max_splits = max(1, config.max_split_hidden_bytes // (4 * rows * width))
    tiles = _head_splits(rows, vocab, config, max_splits)
    splits = math.ceil(math.ceil(vocab / config.block_v) / tiles)
    return Launch(
        head._linear_logprobs_bwd_hidden_kernel,
        (hidden, weight, b if bias else hidden, *_row_vectors(rows),
         meta(splits, rows, width, dtype=torch.float32), rows, vocab, width),
        dict(tiles_per_split=tiles, **head._common_args(hidden, weight, softcap, 1.0),
             **head._constexprs(hidden, b, softcap, config), HAS_ENTROPY_GRAD=entropy_grad),
    )  # fmt: skip


def head_backward_weight(
    *, bias: bool = False, softcap: float | None = None, entropy_grad: bool = False
) -> Launch:
    rows, width, vocab, hidden, weight, b = _head_tensors(bias)
    config = head.default_config(torch.bfloat16, backward=True)
    slab = PROGRAMS_WANTED * config.block_v  # bf16 weights: the fp32 slab of 2 programs per SM
    return Launch(
        head._linear_logprobs_bwd_weight_kernel,
        (hidden, weight, b if bias else hidden, *_row_vectors(rows),
         meta(slab, width, dtype=torch.float32), meta(vocab, dtype=torch.float32),
         rows, slab, 2 * slab, width),
        dict(HAS_DW=True, HAS_DB=bias, **head._common_args(hidden, weight, softcap, 1.0),
             **head._constexprs(hidden, b, softcap, config), HAS_ENTROPY_GRAD=entropy_grad),
    )  # fmt: skip


def _tiles(config: head.TileConfig) -> str:
    return (
        f"bf16 {config.block_n}x{config.block_v}x{config.block_h} "
        f"w{config.num_warps} s{config.num_stages}"
    )


_FWD = _tiles(head.default_config(torch.bfloat16, backward=False))
_FWD_STATS = _tiles(head.default_config(torch.bfloat16, backward=False, stats=True))
_BWD = _tiles(head.default_config(torch.bfloat16, backward=True))

# --------------------------------------------------------------------------------------------
# Launches, as kernels/preference_loss.py's launchers make them at SEQLOSS_SHAPE


def seqloss_forward(loss: str, masked: bool) -> Launch:
    pairs, tokens = SEQLOSS_SHAPE
    logps, cu = meta(tokens, dtype=torch.float32), meta(2 * pairs + 1, dtype=torch.int32)
    per_pair, per_seq = meta(pairs, dtype=torch.float32), meta(2 * pairs, dtype=torch.float32)
    return Launch(
        seqloss._preference_loss_fwd_kernel,
        (logps, meta(tokens, dtype=torch.int8), cu, per_pair, per_pair, per_seq,
         meta(2 * pairs, dtype=torch.int32), per_seq, meta(3, pairs, dtype=torch.float32),
         pairs, 0.1, 0.0, 0.0),
        dict(LOSS=seqloss._LOSS_CODES[loss], NORMALIZE=loss in seqloss.LENGTH_NORMALIZED,
             HAS_REF=loss not in seqloss.REFERENCE_FREE, HAS_MASK=masked,
             BLOCK=seqloss._BLOCK_TOKENS),
    )  # fmt: skip


def seqloss_finalize() -> Launch:
    pairs, _ = SEQLOSS_SHAPE
    return Launch(
        seqloss._preference_loss_finalize_kernel,
        (meta(3, pairs, dtype=torch.float32), meta(2 * pairs, dtype=torch.float32),
         meta(seqloss.NUM_METRICS, dtype=torch.float32), pairs, 1.0 / pairs),
        dict(BLOCK=seqloss._BLOCK_PAIRS),
    )  # fmt: skip


def seqloss_backward(*, masked: bool) -> Launch:
    pairs, tokens = SEQLOSS_SHAPE
    return Launch(
        seqloss._preference_loss_bwd_kernel,
        (meta((), dtype=torch.float32), meta(2 * pairs, dtype=torch.float32),
         meta(2 * pairs + 1, dtype=torch.int32), meta(tokens, dtype=torch.int8),
         meta(tokens, dtype=torch.float32), 1.0 / pairs),
        dict(HAS_MASK=masked, BLOCK=seqloss._BLOCK_TOKENS),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launches, as kernels/logits_fold.py's launchers make them on one FOLD_TILE tile


def fold_forward(tile_dtype: torch.dtype) -> Launch:
    rows, columns = FOLD_TILE
    tile, config = meta(rows, columns, dtype=tile_dtype), fold.default_config(backward=False)
    stats = [meta(rows, dtype=torch.float32) for _ in range(3)]
    return Launch(
        fold._logits_fold_fwd_kernel,
        kwargs=dict(tile_ptr=tile, bias_ptr=tile, targets_ptr=meta(rows, dtype=torch.int64),
                    running_max_ptr=stats[0], sum_exp_ptr=stats[1], target_logit_ptr=stats[2],
                    **fold._launch_scalars(tile, rows, columns, 0, None, 1.0),
                    HAS_BIAS=False, HAS_SOFTCAP=False, BLOCK_R=config.block_rows,
                    BLOCK_C=config.block_columns, num_warps=config.num_warps),
    )  # fmt: skip


def fold_backward(tile_dtype: torch.dtype) -> Launch:
    rows, columns = FOLD_TILE
    tile, config = meta(rows, columns, dtype=tile_dtype), fold.default_config(backward=True)
    vectors = [meta(rows, dtype=torch.float32) for _ in range(3)]
    return Launch(
        fold._logits_fold_bwd_kernel,
        (tile, tile.stride(0), meta(rows, columns), columns, tile, meta(rows, dtype=torch.int64),
         *vectors),
        dict(**{k: v for k, v in fold._launch_scalars(tile, rows, columns, 0, None, 1.0).items()
                if k != "stride_tile"},
             HAS_BIAS=False, HAS_SOFTCAP=False, BLOCK_R=config.block_rows,
             BLOCK_C=config.block_columns, BF16_BY_BITS=False, num_warps=config.num_warps),
    )  # fmt: skip


# One line per kernel configuration. The head runs at the benchmark shape with the tiles
# `impl="auto"` picks on a GPU (default_config), plain and with Gemma's bias-free softcap.
SPECS: list[KernelSpec] = [
    KernelSpec("linear_logprobs.fwd", _FWD, head_forward, matmul=True),
    KernelSpec("linear_logprobs.fwd", f"{_FWD} softcap", lambda: head_forward(softcap=30.0), True),
    KernelSpec(
        "linear_logprobs.fwd",
        f"{_FWD_STATS} softcap + all stats",
        lambda: head_forward(softcap=30.0, stats=True),
        matmul=True,
    ),
    KernelSpec("linear_logprobs.bwd_hidden", _BWD, head_backward_hidden, matmul=True),
    KernelSpec(
        "linear_logprobs.bwd_hidden",
        f"{_BWD} softcap",
        lambda: head_backward_hidden(softcap=30.0),
        True,
    ),
    KernelSpec(
        "linear_logprobs.bwd_hidden",
        f"{_BWD} softcap + entropy grad",
        lambda: head_backward_hidden(softcap=30.0, entropy_grad=True),
        matmul=True,
    ),
    KernelSpec("linear_logprobs.bwd_weight", f"{_BWD} dW", head_backward_weight, matmul=True),
    KernelSpec(
        "linear_logprobs.bwd_weight",
        f"{_BWD} dW softcap + entropy grad",
        lambda: head_backward_weight(softcap=30.0, entropy_grad=True),
        matmul=True,
    ),
    KernelSpec(
        "linear_logprobs.bwd_weight",
        f"{_BWD} dW+db bias softcap",
        lambda: head_backward_weight(bias=True, softcap=30.0),
        matmul=True,
    ),
    KernelSpec("logits_fold.fwd", "fp32 tile", lambda: fold_forward(torch.float32)),
    KernelSpec("logits_fold.fwd", "bf16 tile", lambda: fold_forward(torch.bfloat16)),
    KernelSpec("logits_fold.bwd", "fp32 tile -> bf16 G", lambda: fold_backward(torch.float32)),
    KernelSpec("preference_loss.fwd", "sigmoid masked", lambda: seqloss_forward("sigmoid", True)),
    KernelSpec("preference_loss.fwd", "simpo", lambda: seqloss_forward("simpo", False)),
    KernelSpec("preference_loss.finalize", "", seqloss_finalize),
    KernelSpec("preference_loss.bwd", "masked", lambda: seqloss_backward(masked=True)),
]


# --------------------------------------------------------------------------------------------
# Compiling without a GPU


class _TargetDriver:
    """What Triton's JIT asks the active driver for on the way to compiling, for one target.
    The device id is the target's capability, so each target gets its own JIT cache."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return int(self.target.arch)

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass
class Row:
    kernel: str
    config: str
    target: str
    registers: int | None = None
    spill_bytes: int | None = None
    """Stack frame plus local memory per thread, bytes: where spilled registers go."""
    shared_bytes: int | None = None
    matmul_instruction: bool | None = None
    """None for kernels without a matmul."""
    compile_s: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes, static shared bytes) of the cubin's one kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", file.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = _RESOURCES.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel in cuobjdump's resource usage, got:\n{out}")
    registers, stack, shared, local = map(int, found[0])
    return registers, stack + local, shared


def problems(row: Row, shared_limit: int) -> list[str]:
    """What is wrong with one compiled kernel (empty when nothing is)."""
    if row.error is not None:
        return [f"does not compile: {row.error}"]
    found = []
    if row.shared_bytes > shared_limit:
        found.append(f"shared memory {row.shared_bytes} B > the {shared_limit} B a block can have")
    if row.spill_bytes > SPILL_TOLERANCE[row.target]:
        found.append(
            f"spills {row.spill_bytes} B of stack/local memory per thread (tolerated: "
            f"{SPILL_TOLERANCE[row.target]} B)"
        )
    if row.matmul_instruction is False:
        found.append(f"matmul tiles do not use {MATMUL_INSTRUCTION[row.target]}")
    return found


def compile_spec(spec: KernelSpec, target_name: str) -> Row:
    target, shared_limit = TARGETS[target_name]
    row = Row(spec.name, spec.config, target_name)
    saved = driver._active  # set_active/reset_active would create the default (CUDA) driver
    driver._active = _TargetDriver(target)
    start = time.perf_counter()
    try:
        launch = spec.launch()
        compiled = launch.kernel.warmup(*launch.args, grid=(1,), **launch.kwargs)
        row.registers, row.spill_bytes, static_shared = _resource_usage(compiled.asm["cubin"])
        row.shared_bytes = compiled.metadata.shared + static_shared
        if spec.matmul:
            row.matmul_instruction = MATMUL_INSTRUCTION[target_name] in compiled.asm["ptx"]
    except Exception as error:  # a kernel that does not compile is a row of the report
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    finally:
        driver._active = saved
    row.compile_s = time.perf_counter() - start
    row.problems = problems(row, shared_limit)
    return row


def jit_kernels() -> dict[str, JITFunction]:
    """Every @triton.jit kernel of fastdpo.kernels that no other kernel calls, by
    "<module>.<function>" (helpers such as _tanh are called from kernels, not launched)."""
    functions: dict[str, JITFunction] = {}
    for info in pkgutil.iter_modules(fastdpo.kernels.__path__):
        module = importlib.import_module(f"fastdpo.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                functions[f"{info.name}.{name}"] = value
    sources = {key: function.src for key, function in functions.items()}
    return {
        key: function
        for key, function in functions.items()
        if not any(
            re.search(rf"\b{function.__name__}\(", src) for other, src in sources.items()
            if other != key
        )
    }  # fmt: skip


def kernels_without_spec() -> list[str]:
    """Launched kernels that no entry of SPECS compiles."""
    covered = {id(spec.launch().kernel) for spec in SPECS}
    return sorted(key for key, kernel in jit_kernels().items() if id(kernel) not in covered)


def table(rows: list[Row]) -> str:
    lines = [
        f"Triton {triton.__version__} kernels compiled for "
        f"{', '.join(TARGETS)} (no GPU; see benchmarks/kernel_compile_report.py)",
        "",
        "| kernel | config | target | registers | spills (B) | shared (KiB) | tensor-core mma |"
        " compile (s) | problems |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in rows:
        mma = "-" if row.matmul_instruction is None else (
            MATMUL_INSTRUCTION[row.target] if row.matmul_instruction else "MISSING"
        )  # fmt: skip
        shared = "-" if row.shared_bytes is None else f"{row.shared_bytes / 1024:.1f}"
        lines.append(
            f"| {row.kernel} | {row.config} | {row.target} | {row.registers or '-'} | "
            f"{'-' if row.spill_bytes is None else row.spill_bytes} | {shared} | {mma} | "
            f"{row.compile_s:.1f} | {'; '.join(row.problems) or 'ok'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows (and coverage) here")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {list(TARGETS)}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # triton.jit decided at import to build interpreted functions, which do not compile.
        parser.error("unset TRITON_INTERPRET: the kernels must compile, not run interpreted")
    targets = [name for name in args.targets.split(",") if name]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"--targets: unknown {unknown}; known: {list(TARGETS)}")
    rows = [compile_spec(spec, target) for spec in SPECS for target in targets]
    missing = kernels_without_spec()
    print(table(rows))
    for key in missing:
        print(f"NO COMPILE SPEC: kernels/{key.replace('.', '.py: ', 1)}: add a line to SPECS")
    if args.json:
        payload = {
            "triton": triton.__version__,
            "rows": [asdict(row) for row in rows],
            "kernels_without_spec": missing,
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 1 if missing or any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
