"""`fastdpo iterate CONFIG.yaml --rounds R --judge J [--prompts P]`: sample, judge, train, again.

Each round samples from the current policy, judges the samples, turns them into pairs and
trains on them (a `TrainConfig` run from CONFIG.yaml) in `output_dir/round_<k>/`; the judge's
mean score of the policy's samples is printed per round and written with a plot to
`output_dir` (see `fastdpo.evaluation.iterate`). The options here are iterate's own; training
settings come from the config file.

Exit status: 0 done; 1 a round formed no pair, the judge raised or a run stopped; 2 a user
mistake (bad config, missing model, prompt file or judge): one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastdpo.evaluation.generate_pairs_command import (
    JUDGE_HELP,
    add_pairing_options,
    add_sampling_options,
    sampling_settings,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `iterate` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "iterate",
        help="rounds of sampling from the policy, judging, and DPO training on the pairs",
        description=(
            "Iterative DPO: each round samples from the current policy, scores the samples "
            "with --judge, pairs them, and trains on the pairs with CONFIG.yaml's settings, "
            "in output_dir/round_<k>/. Prints the judge's mean score per round."
        ),
    )
    parser.add_argument("config", help="YAML file of TrainConfig keys (model, training settings)")
    parser.add_argument("--rounds", type=int, required=True, help="rounds to run")
    parser.add_argument("--judge", required=True, help=JUDGE_HELP)
    parser.add_argument(
        "--prompts", default=None, help="prompts to sample on (default: the config's data)"
    )
    parser.add_argument(
        "--reference",
        choices=("round_start", "original"),
        default="round_start",
        help="each round's reference: the policy it starts from (default) or the original model",
    )
    parser.add_argument(
        "--output-dir", default=None, help="where the rounds go (default: config's output_dir)"
    )
    add_sampling_options(parser)
    add_pairing_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the rounds as `args` says; returns the exit status."""
    from fastdpo.data.validation import BadRowError
    from fastdpo.evaluation.iterate import IterateSettings, NoPairsError, run_iterate
    from fastdpo.evaluation.judges import JudgeError
    from fastdpo.reference_shards import ReferenceCacheError
    from fastdpo.train.config import ConfigError, TrainConfig
    from fastdpo.train.trainer import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.prompts is not None:  # the config's data is replaced by each round's pairs
        overrides["data"] = args.prompts
    try:
        config = TrainConfig.from_yaml(args.config, overrides)
        settings = IterateSettings(
            rounds=args.rounds,
            judge=args.judge,
            prompts=args.prompts,
            sampling=sampling_settings(args),
            pairing=args.pairing,
            min_score_gap=args.min_score_gap,
            on_judge_error=args.on_judge_error,
            reference=args.reference,
            judge_beta=args.judge_beta,
        )
        result = run_iterate(config, settings)
    except (JudgeError, NoPairsError, NonFiniteLossError) as error:
        print(f"fastdpo iterate: stopped: {error}", file=sys.stderr)
        return 1
    except (ConfigError, BadRowError, ReferenceCacheError, FileNotFoundError, ValueError) as error:
        print(f"fastdpo iterate: error: {error}", file=sys.stderr)
        return 2
    for line in result.table_lines():
        print(line)
    print(f"  results: {result.output_dir / 'iterate.json'}")
    if result.plot is not None:
        print(f"  plot: {result.plot}")
    return 0
