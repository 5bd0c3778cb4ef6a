"""`fastdpo sweep CONFIG.yaml --beta 0.01,0.1,0.5 [--loss sigmoid,ipo]`: one run per combination.

Each run trains in `output_dir/<name>/` on the same reference cache (computed once), is
measured on the held-out pairs, and the table (reward accuracy, margins, drift from the
reference) is printed with the best run by the stated rule; `sweep.json` and `sweep.png` are
written to `output_dir` (see `fastdpo.evaluation.sweep`).

Exit status: 0 done; 1 a run stopped (non-finite loss); 2 a user mistake (bad config, list or
file): one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `sweep` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "sweep",
        help="train one run per beta x loss on one reference cache and compare them held out",
        description=(
            "Train one run per combination of --beta and --loss from CONFIG.yaml (TrainConfig "
            "keys; held-out data required: eval_data or eval_fraction), each in "
            "output_dir/<name>/, all reading one reference cache; print held-out reward "
            "accuracy, margins and drift per run and name the best (highest reward accuracy, "
            "ties: least drift)."
        ),
    )
    parser.add_argument("config", help="YAML file of TrainConfig keys (the sweep's base run)")
    parser.add_argument(
        "--beta", default=None, metavar="B,B,...", help="betas, comma-separated (default: config's)"
    )
    parser.add_argument(
        "--loss", default=None, metavar="L,L,...", help="loss names (default: config's loss)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="the sweep's folder (default: config's output_dir)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep as `args` says; returns the exit status."""
    from fastdpo.data.validation import BadRowError
    from fastdpo.evaluation.sweep import parse_list, run_sweep
    from fastdpo.reference_shards import ReferenceCacheError
    from fastdpo.train.config import ConfigError, TrainConfig
    from fastdpo.train.trainer import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    try:
        betas = parse_list(args.beta, float, "beta") if args.beta is not None else None
        losses = parse_list(args.loss, str, "loss") if args.loss is not None else None
        config = TrainConfig.from_yaml(args.config, overrides)
        result = run_sweep(config, betas=betas, losses=losses)
    except (ConfigError, BadRowError, ReferenceCacheError, FileNotFoundError, ValueError) as error:
        print(f"fastdpo sweep: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"fastdpo sweep: a run stopped: {error}", file=sys.stderr)
        return 1
    for line in result.table_lines():
        print(line)
    print(f"  results: {result.output_dir / 'sweep.json'}")
    if result.plot is not None:
        print(f"  plot: {result.plot}")
    return 0
