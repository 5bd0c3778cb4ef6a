"""`fastdpo demo`: the README's first command.

    fastdpo demo          # DPO on a 2-core CPU in a few minutes: before/after table (run.py)
    fastdpo demo --op     # the fused head op against full logits: time, memory, agreement (op.py)

Files: task.py (the preference task and its judge), model.py (tokenizer and model built
locally), run.py (the flow and the report), op.py (the op comparison). Heavy imports stay in
the handlers, so building the command-line parser stays cheap.
"""

from __future__ import annotations

import argparse

from fastdpo.argtypes import positive_int
from fastdpo.demo.settings import DemoOptions, DemoSettings


def _run(args: argparse.Namespace) -> int:
    if args.op:
        from fastdpo.demo.op import run_demo

        options = DemoOptions(
            tokens=args.tokens,
            hidden=args.hidden,
            vocab=args.vocab,
            device=args.device,
            impl=args.impl,
            seed=args.seed,
        )
        return run_demo(options)

    from fastdpo.demo.run import run_demo

    make = DemoSettings.quick if args.quick else DemoSettings
    settings = make(
        output_dir=args.output_dir, seed=args.seed, device=args.device, progress=not args.quick
    )
    try:
        result = run_demo(settings)
    except FileExistsError as error:
        print(f"fastdpo demo: {error}")
        return 2
    return 0 if result.learned or args.quick else 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `fastdpo demo` (and `--op`) to the `fastdpo` command line."""
    op_defaults, defaults = DemoOptions(), DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="train a small model with DPO on the CPU in minutes and show what it learned",
        description=(
            "Builds a small Llama and tokenizer locally, warms it up with SFT on a task whose "
            "replies come in a polite and a curt style, then trains it with DPO to prefer the "
            "polite one. Prints held-out preference accuracy, reward margins and a judge's win "
            "rate of sampled replies, before and after DPO, and leaves the run directory. "
            "Exits 1 if DPO did not reach 90% held-out accuracy. With --op: compares the fused "
            "log-prob op with the naive full-logits path instead (time, memory, agreement)."
        ),
    )
    parser.add_argument(
        "--output-dir",
        default=defaults.output_dir,
        help="run directory; a previous demo run there is replaced (default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smaller, faster run (what the tests run); the 90%% target is not checked",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of data, split, model and sampling; --op: of the inputs (default %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=defaults.device,
        help="auto: CUDA when available (default %(default)s)",
    )
    op = parser.add_argument_group("--op: the fused head op against the naive full-logits path")
    op.add_argument(
        "--op", action="store_true", help="run the op comparison instead of the DPO demo"
    )
    op.add_argument(
        "--tokens", type=positive_int, default=op_defaults.tokens, help="N (default %(default)s)"
    )
    op.add_argument(
        "--hidden", type=positive_int, default=op_defaults.hidden, help="H (default %(default)s)"
    )
    op.add_argument(
        "--vocab", type=positive_int, default=op_defaults.vocab, help="V (default %(default)s)"
    )
    op.add_argument(
        "--impl",
        choices=["auto", "torch", "triton"],
        default=op_defaults.impl,
        help="fastdpo impl (auto: triton on CUDA, torch on the CPU)",
    )
    parser.set_defaults(handler=_run)
