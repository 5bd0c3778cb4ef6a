"""`fastdpo score`: the implicit reward of every row, so a DPO-trained policy ranks or filters.

    fastdpo score --model runs/a/final --ref base-or-cache --data rows.jsonl --out scores.jsonl

Rows are pairs (-> `reward_chosen`, `reward_rejected`, `margin`) or single responses, prompt +
completion (-> `reward`); each output line keeps the row's `id`, `source` and `row` index, in
data order. The output is written atomically. Exit status: 0 done, 2 a user mistake.
"""

from __future__ import annotations

import argparse
import logging

from fastdpo.evaluation.command_options import (
    add_data_options,
    add_pass_options,
    describe_counts,
    fail,
    pass_kwargs,
    user_errors,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `score` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "score",
        help="score responses with a policy's implicit reward beta * (log pi - log pi_ref)",
        description=(
            "The DPO implicit reward of every row of --data: pairs get reward_chosen, "
            "reward_rejected and margin, single responses (prompt + completion) get reward. "
            "--ref is the reference model or a reference cache built for these rows with the "
            "same tokenization. Writes one JSON line per row to --out."
        ),
    )
    parser.add_argument("--model", required=True, help="the policy: a model folder or Hub id")
    parser.add_argument(
        "--ref", required=True, help="reference: a model folder / Hub id, or a cache folder"
    )
    parser.add_argument("--out", required=True, help="scores .jsonl to write")
    add_data_options(parser, data_required=True)
    add_pass_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score as `args` says; returns the exit status."""
    from fastdpo.evaluation.files import write_jsonl_atomic
    from fastdpo.evaluation.implicit_reward import score_rows
    from fastdpo.evaluation.models import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        rows, counts = score_rows(
            args.model, args.ref, args.data, tokenizer=tokenizer, **pass_kwargs(args)
        )
    except user_errors() as error:
        return fail("score", error)
    path = write_jsonl_atomic(args.out, rows)
    print(describe_counts(counts))
    print(f"scored {len(rows)} rows: {path}")
    return 0
