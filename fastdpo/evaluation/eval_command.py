"""`fastdpo eval`: rank models on preference pairs (or, with --generate, by what they generate).

    fastdpo eval --model A --model B --data heldout.jsonl [--ref MODEL_OR_CACHE] [--beta 0.1]
                 [--report report.json]
    fastdpo eval --generate --model A --model B --prompts prompts.jsonl --judge JUDGE

On pairs: `fastdpo.evaluate` (one model in memory at a time), a table best first, and the JSON
report written atomically. With --generate: each model answers every prompt, the judge scores
every answer once (`fastdpo.evaluation.generation_compare.compare_generations`).

Exit status: 0 done, 2 a user mistake (missing model or data, a cache built for other data:
one message, no traceback).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fastdpo.argtypes import positive_int
from fastdpo.evaluation.command_options import (
    add_data_options,
    add_pass_options,
    describe_counts,
    fail,
    pass_kwargs,
    user_errors,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `eval` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "eval",
        help="rank models on held-out preference pairs (accuracy, implicit reward, 95%% CI)",
        description=(
            "For each --model, on the same pairs: preference accuracy by summed and by "
            "length-normalized log-prob margin; with --ref (a model or a reference cache) the "
            "implicit-reward accuracy, mean reward margin and DPO loss. 95% intervals by a "
            "seeded bootstrap over pairs; a pair whose margin is exactly 0 counts half. Prints "
            "the ranking and writes it as JSON (--report). With --generate the models are "
            "compared by a judge's scores of their answers to --prompts instead."
        ),
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model folder or Hub id; repeat for each model to rank",
    )
    parser.add_argument(
        "--ref", help="reference: a model folder / Hub id, or a reference cache folder"
    )
    parser.add_argument("--report", help="write the JSON report here (atomically)")
    add_data_options(parser, data_required=False)
    add_pass_options(parser)
    stats = parser.add_argument_group("confidence intervals")
    stats.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    stats.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="bootstrap resamples over pairs (0: no intervals; default %(default)s)",
    )
    generate = parser.add_argument_group("--generate: compare what the models generate")
    generate.add_argument("--generate", action="store_true", help="compare generations")
    generate.add_argument("--prompts", help="prompts file (one prompt per row)")
    generate.add_argument(
        "--judge", help="module:function, a reward-model folder, or implicit:POLICY,REF"
    )
    generate.add_argument("--num-samples", type=positive_int, help="answers per prompt")
    generate.add_argument("--max-new-tokens", type=positive_int, help="longest answer")
    generate.add_argument("--temperature", type=float, help="sampling temperature")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate as `args` says; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.generate:
        return _run_generate(args)
    if args.data is None:
        return fail("eval", ValueError("--data is required (or --generate with --prompts)"))
    from fastdpo.evaluation.files import write_json_atomic
    from fastdpo.evaluation.ranking import evaluate, format_table

    try:
        report = evaluate(
            args.model,
            args.data,
            ref=args.ref,
            tokenizer=_tokenizer(args),
            seed=args.seed,
            n_boot=args.n_boot,
            **pass_kwargs(args),
        )
    except user_errors() as error:
        return fail("eval", error)
    print(describe_counts(report["data"]))
    print(format_table(report))
    if args.report:
        print(f"report: {write_json_atomic(args.report, report)}")
    return 0


def _tokenizer(args: argparse.Namespace) -> Any:
    if args.tokenizer is None:
        return None
    from fastdpo.evaluation.models import load_tokenizer

    return load_tokenizer(args.tokenizer)


def _run_generate(args: argparse.Namespace) -> int:
    if args.prompts is None or args.judge is None:
        return fail("eval", ValueError("--generate needs --prompts and --judge"))
    if args.data is not None:
        return fail("eval", ValueError("--generate compares generations: drop --data"))
    try:
        from fastdpo.evaluation.generation_compare import compare_generations
    except ImportError as error:
        return fail("eval", ValueError(f"--generate is not available here: {error}"))
    from fastdpo.evaluation.files import write_json_atomic

    sampling = {
        name: getattr(args, name)
        for name in ("num_samples", "max_new_tokens", "temperature", "top_p")
        if getattr(args, name) is not None
    }
    device = None if args.device == "auto" else args.device
    try:
        report = compare_generations(
            args.model, args.prompts, args.judge, seed=args.seed, device=device, **sampling
        )
    except user_errors() as error:
        return fail("eval", error)
    for position, entry in enumerate(report["ranking"], start=1):
        print(
            f"{position}  {entry['model']}  mean score {entry['mean_score']:.4f}  "
            f"Bradley-Terry {entry['bt_score']:.4f}"
        )
    print(f"judge calls: {report['judge_calls']}")
    if args.report:
        print(f"report: {write_json_atomic(args.report, report)}")
    return 0
