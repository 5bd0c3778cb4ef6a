"""Benchmark: fastdpo.linear_logprobs against the usual ways of getting per-token log-probs.

Forward (under no_grad) and forward+backward (gradients of hidden and weight), median and
p20/p80 time, peak memory and effective TFLOP/s (2NHV forward, 8NHV forward+backward, counted
the same for every implementation whatever it really does: fastdpo-triton does 10NHV, naive
6NHV), each case in a fresh subprocess. Implementations:

  fastdpo-torch   linear_logprobs(impl="torch"): blocks of rows x vocabulary, logits recomputed
                  in backward
  fastdpo-triton  linear_logprobs(impl="triton"): the Triton kernels (CUDA only here)
  fastdpo-cublas  linear_logprobs(impl="cublas"): cuBLAS GEMMs on logits tiles + Triton folds;
                  on the CPU its folds run under the Triton interpreter (larger interpreter
                  blocks, N*V <= 2**24 only): a check that it runs, not a speed of the design
  trl             TRL's chunked log-prob head (trl.kernels.chunked_logprob, TRL >= 1.16: the
                  one its trainers use), [4096 tokens x 32768 vocabulary] tiles, log-probs only
                  (outputs=()); its folds are torch ops off CUDA
  naive           full [N, V] logits, fp32 log-softmax, gather
  naive-compile   the same under torch.compile
  liger           Liger-Kernel's fused linear cross-entropy, reduction="none" (logp = -loss)
  cce             cut-cross-entropy, exact gradients ("cce_exact", or "cce" with
                  filter_eps=None on releases without it); its torch_compile impl on the CPU

Baselines that are not installed or cannot run on the device are skipped with a note (install
them with `pip install -e '.[bench]'`; trl with `pip install trl`, or run the script with a
Python that has it). Before each shape's cases the run measures the ceiling: the plain GEMM of
that shape in the benchmark's dtype, [N, H] @ [H, V] -> [N, V] (`torch.mm`, the "matmul" row,
2NHV); every row's "of matmul" column is its TFLOP/s as a fraction of its shape's ceiling.
`--matmul-size S` measures one square [S, S] @ [S, S] product instead, the ceiling of every
shape.

    python benchmarks/bench_linear_logprobs.py                       # CUDA, bf16, the big shapes
    python benchmarks/bench_linear_logprobs.py --device cuda --dtype bf16 --shapes 16384,4096,128256
    python benchmarks/bench_linear_logprobs.py --device cpu --small  # CPU, fp32, small shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import harness
import torch

from fastdpo.demo.op import naive_logprobs

SCRIPT = Path(__file__).resolve()

GPU_SHAPES = [(8192, 4096, 128256), (16384, 2048, 151936), (4096, 4096, 32000)]
SMALL_SHAPES = [(2048, 512, 32000), (1024, 2048, 16384)]
IMPLS = (
    "fastdpo-torch",
    "fastdpo-triton",
    "fastdpo-cublas",
    "trl",
    "naive",
    "naive-compile",
    "liger",
    "cce",
)
MODES = ("fwd", "fwd+bwd")
MATMUL = "matmul"
"""The ceiling row: [N, H] @ [H, V] in the benchmark's dtype per shape, or one square product."""
CPU_INTERPRETER_MAX_LOGITS = 2**24
"""fastdpo-cublas on the CPU (Triton interpreter): larger N * V is skipped (2048 x 32000 took
7 s forward, 22 s forward+backward on the 2-core CPU, 2026-12-03)."""
TRL_VOCAB_CHUNK = 32768
"""trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16: the vocabulary width of its tiles."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LogprobsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(hidden [N, H], weight [V, H], targets [N] int64) -> logp [N] fp32."""


# --------------------------------------------------------------------------------------------
# implementations


def _fastdpo(impl: str, device: torch.device) -> tuple[LogprobsFn, str]:
    from fastdpo.ops.linear_logprobs import linear_logprobs

    if impl == "cublas" and device.type == "cpu":
        # Its folds run under the interpreter on the CPU, which must be chosen before the kernel
        # module is imported; larger blocks than the tests' keep the interpreter's per-step
        # overhead down (numpy on [64, 1024] blocks).
        if "fastdpo.kernels.logits_fold" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        from fastdpo.kernels import logits_fold

        if not logits_fold.is_interpreted():
            raise harness.Unavailable("fold kernels imported without TRITON_INTERPRET=1")
        logits_fold.INTERPRETER_CONFIG = logits_fold.FoldConfig(
            block_rows=64, block_columns=1024, num_warps=1
        )
        note = "CPU: folds under the Triton interpreter, not a speed of the design"
    elif impl == "cublas":
        from fastdpo.ops.linear_logprobs_cublas import unavailable_reason

        reason = unavailable_reason(device)
        if reason is not None:
            raise harness.Unavailable(reason)
        note = ""
    else:
        note = ""
    if impl == "triton":
        if device.type != "cuda":
            raise harness.Unavailable("Triton kernels benchmarked on CUDA only (CPU interpreter)")
        try:
            import fastdpo.kernels.linear_logprobs  # noqa: F401
        except ImportError as error:
            raise harness.Unavailable(
                f"fastdpo's Triton kernels cannot be imported: {error}"
            ) from error

    def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        return linear_logprobs(hidden, weight, targets, impl=impl)

    return logprobs, note


def _trl(device: torch.device) -> tuple[LogprobsFn, str]:
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction
    except ImportError as error:
        raise harness.Unavailable(
            f"trl's chunked head cannot be imported ({error}): needs trl >= 1.16"
        ) from error

    def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        logp, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ()
        )
        return logp

    where = "Triton folds" if device.type == "cuda" else "torch folds (no Triton off CUDA)"
    return logprobs, f"[{TOKEN_CHUNK_SIZE} x {TRL_VOCAB_CHUNK}] tiles, {where}"


def _naive_compiled(device: torch.device) -> tuple[LogprobsFn, str]:
    return torch.compile(naive_logprobs), "torch.compile default mode"


def _liger(device: torch.device) -> tuple[LogprobsFn, str]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        raise harness.Unavailable(f"liger-kernel not installed ({error})") from error
    if device.type != "cuda":
        raise harness.Unavailable("Liger's fused linear cross-entropy is Triton-only: needs CUDA")
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        return -loss_fn(weight, hidden, targets).float()

    return logprobs, "reduction='none'"


def _cce(device: torch.device) -> tuple[LogprobsFn, str]:
    try:
        from cut_cross_entropy import LinearCrossEntropyImpl, linear_cross_entropy
    except ImportError as error:
        raise harness.Unavailable(f"cut-cross-entropy not installed ({error})") from error
    options: dict = {}
    if device.type != "cuda":
        options["impl"] = "torch_compile"  # its Triton kernels need CUDA
    elif "CCE_EXACT" in LinearCrossEntropyImpl.__members__:
        options["impl"] = "cce_exact"
    else:  # releases before cce_exact: filter_eps=None turns gradient filtering off
        options.update(impl="cce", filter_eps=None)

    def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        return -linear_cross_entropy(hidden, weight, targets, reduction="none", **options).float()

    note = ", ".join(f"{key}={value}" for key, value in options.items())
    return logprobs, note


def build_impl(name: str, device: torch.device) -> tuple[LogprobsFn, str]:
    """The implementation called `name` on `device` and a note on how it is configured.

    Raises harness.Unavailable when it is not installed or cannot run on the device.
    """
    if name == "fastdpo-torch":
        return _fastdpo("torch", device)
    if name == "fastdpo-triton":
        return _fastdpo("triton", device)
    if name == "fastdpo-cublas":
        return _fastdpo("cublas", device)
    if name == "trl":
        return _trl(device)
    if name == "naive":
        return naive_logprobs, "fp32 log-softmax"
    if name == "naive-compile":
        return _naive_compiled(device)
    if name == "liger":
        return _liger(device)
    if name == "cce":
        return _cce(device)
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")


# --------------------------------------------------------------------------------------------
# one case (runs in the worker subprocess)


def run_matmul_case(case: dict) -> dict:
    """The device's matmul rate in the case's dtype: [N, H] @ [H, V] -> [N, V] (the head's
    projection, weight transposed as a head holds it), or [S, S] @ [S, S] with case["square"]."""
    device = torch.device(case["device"])
    n, h, v = case["n"], case["h"], case["v"]
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    left = torch.randn(n, h, generator=generator).to(device, dtype)
    right = torch.randn(v, h, generator=generator).to(device, dtype)
    right = right if case.get("square") else right.T
    out = torch.empty(n, v, dtype=dtype, device=device)

    def call() -> None:
        torch.mm(left, right, out=out)

    peak, timing = harness.measure(
        call, device=device, warmup=case["warmup"], repeats=case["repeats"]
    )
    return {
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "cpu_median_ms": timing.cpu_median_ms,
        "tflops": harness.tflops(2 * n * h * v, timing.median_ms),
        "peak_mib": peak / 2**20,
        "note": f"ceiling: [{n}, {h}] @ [{h}, {v}] torch.mm",
    }


def run_case(case: dict) -> dict:
    """Measures one (impl, mode, shape, dtype, device) case; returns the measured fields."""
    if case["impl"] == MATMUL:
        return run_matmul_case(case)
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    n, h, v = case["n"], case["h"], case["v"]
    cpu_cublas = case["impl"] == "fastdpo-cublas" and device.type == "cpu"
    if cpu_cublas and n * v > CPU_INTERPRETER_MAX_LOGITS:
        raise harness.Unavailable(
            f"CPU: N*V = {n * v:,} > {CPU_INTERPRETER_MAX_LOGITS:,}, too slow for the Triton "
            "interpreter (pass smaller --shapes)"
        )
    logprobs, note = build_impl(case["impl"], device)

    generator = torch.Generator().manual_seed(case["seed"])
    hidden = torch.randn(n, h, generator=generator).to(device, dtype)
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=generator).to(device)
    grad_logp = torch.randn(n, generator=generator).to(device)

    if case["mode"] == "fwd":

        def call() -> None:
            with torch.no_grad():
                logprobs(hidden, weight, targets)

    else:
        hidden.requires_grad_()
        weight.requires_grad_()

        def call() -> None:
            logprobs(hidden, weight, targets).backward(grad_logp)
            # Dropped here, not at the start of the next call: the measured call starts without
            # them and its peak includes them.
            hidden.grad = None
            weight.grad = None

    peak, timing = harness.measure(
        call, device=device, warmup=case["warmup"], repeats=case["repeats"]
    )
    with torch.no_grad():
        logp_sum = logprobs(hidden, weight, targets).double().sum().item()

    flop = (2 if case["mode"] == "fwd" else 8) * n * h * v
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    return {
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "cpu_median_ms": timing.cpu_median_ms,
        "tflops": harness.tflops(flop, timing.median_ms),
        "peak_mib": peak / 2**20,
        "grads_mib": grad_bytes / 2**20 if case["mode"] != "fwd" else 0.0,
        "logp_sum": logp_sum,
        "note": note,
    }


# --------------------------------------------------------------------------------------------
# command line


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'N,H,V;N,H,V' -> [(N, H, V), ...]."""
    shapes = []
    for item in text.split(";"):
        parts = item.split(",")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not N,H,V (three integers)")
        n, h, v = (int(part) for part in parts)
        shapes.append((n, h, v))
    return shapes


def add_value_check(rows: list[dict]) -> None:
    """Sets 'logp_rel_diff': each ok row's sum of logp against the naive row of its shape."""
    reference = {
        (row["n"], row["h"], row["v"], row["mode"]): row["logp_sum"]
        for row in rows
        if row["impl"] == "naive" and row["status"] == "ok"
    }
    for row in rows:
        ref = reference.get((row["n"], row["h"], row["v"], row["mode"]))
        if row["status"] == "ok" and ref is not None:
            row["logp_rel_diff"] = abs(row["logp_sum"] - ref) / max(abs(ref), 1e-30)


def add_matmul_fraction(rows: list[dict]) -> None:
    """Sets 'of_matmul': each ok row's TFLOP/s over its ceiling's (same run, same dtype): the
    square matmul row if there is one, else the matmul row of the row's shape."""
    ceilings = {
        (row["n"], row["h"], row["v"]): row["tflops"]
        for row in rows
        if row["impl"] == MATMUL and row["status"] == "ok"
    }
    square = next(
        (row["tflops"] for row in rows if row["impl"] == MATMUL and row.get("square")), None
    )
    for row in rows:
        ceiling = square or ceilings.get((row["n"], row["h"], row["v"]))
        if row["status"] == "ok" and row["impl"] != MATMUL and ceiling:
            row["of_matmul"] = row["tflops"] / ceiling


def render(rows: list[dict]) -> str:
    """The markdown table of one run."""
    columns: list[harness.Column] = [
        ("N, H, V", lambda r: f"{r['n']}, {r['h']}, {r['v']}"),
        ("dtype", lambda r: r["dtype"]),
        ("mode", lambda r: r["mode"]),
        ("impl", lambda r: r["impl"]),
        ("median ms", lambda r: harness.fmt(r.get("median_ms"))),
        ("p20-p80 ms", lambda r: _range(r)),
        ("TFLOP/s", lambda r: harness.fmt(r.get("tflops"), ".3f")),
        ("of matmul", lambda r: _percent(r.get("of_matmul"))),
        ("peak MiB", lambda r: harness.fmt(r.get("peak_mib"), ",.0f")),
        ("grads MiB", lambda r: harness.fmt(r.get("grads_mib") or None, ",.0f")),
        ("sum logp vs naive", lambda r: harness.fmt(r.get("logp_rel_diff"), ".1e")),
        ("note", lambda r: r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"),
    ]
    return harness.markdown_table(rows, columns)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _range(row: dict) -> str:
    if row.get("p20_ms") is None:
        return "-"
    return f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_arguments(parser, default_csv=harness.RESULTS_DIR / "linear_logprobs.csv")
    parser.add_argument("--small", action="store_true", help=f"shapes {SMALL_SHAPES}")
    parser.add_argument("--shapes", type=parse_shapes, help="'N,H,V;N,H,V' (overrides --small)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument(
        "--matmul-size",
        type=int,
        help="side S of one square [S, S] @ [S, S] ceiling matmul for every shape (default: the "
        "GEMM of each shape, [N, H] @ [H, V]; 0 skips the ceiling)",
    )
    args = parser.parse_args(argv)
    if args.worker is not None:
        harness.worker_main(run_case, args.worker)
        return

    impls = [name.strip() for name in args.impls.split(",")]
    modes = [name.strip() for name in args.modes.split(",")]
    for name, allowed in (*((i, IMPLS) for i in impls), *((m, MODES) for m in modes)):
        if name not in allowed:
            parser.error(f"unknown choice {name!r}: choose from {', '.join(allowed)}")
    shapes = args.shapes or (SMALL_SHAPES if args.small else GPU_SHAPES)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    common = {"dtype": dtype, **harness.run_settings(args)}
    if args.matmul_size is not None and args.matmul_size < 0:
        parser.error(f"--matmul-size must be >= 0, got {args.matmul_size}")
    cases = []
    if args.matmul_size:
        size = args.matmul_size
        square = {"impl": MATMUL, "mode": "mm", "n": size, "h": size, "v": size, "square": True}
        cases.append({**square, **common})
    for n, h, v in shapes:
        if args.matmul_size is None:
            cases.append({"impl": MATMUL, "mode": "mm", "n": n, "h": h, "v": v, **common})
        cases += [
            {"impl": impl, "mode": mode, "n": n, "h": h, "v": v, **common}
            for mode in modes
            for impl in impls
        ]
    rows = harness.run_cases(SCRIPT, cases, timeout_s=args.timeout, rounds=args.rounds)
    add_value_check(rows)
    add_matmul_fraction(rows)
    harness.finish(
        rows,
        bench="linear_logprobs",
        args=args,
        device=torch.device(args.device),
        table=render(rows),
    )


if __name__ == "__main__":
    main()
