"""`fastdpo ...` commands.

Each subcommand is one function `add_<name>(subparsers)` that adds its parser and sets
`handler` (args -> exit code); `SUBCOMMANDS` lists them. Adding a command is writing one such
function and appending it to `SUBCOMMANDS`. Heavy imports (transformers, datasets) belong in
the handlers, so one command's dependencies do not slow down the others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fastdpo.demo import add_parser as add_demo
from fastdpo.evaluation.eval_command import add_parser as add_eval
from fastdpo.evaluation.generate_pairs_command import add_parser as add_generate_pairs
from fastdpo.evaluation.iterate_command import add_parser as add_iterate
from fastdpo.evaluation.score_command import add_parser as add_score
from fastdpo.evaluation.sweep_command import add_parser as add_sweep
from fastdpo.precompute import add_parser as add_precompute_ref
from fastdpo.train.command import add_parser as add_train

SubcommandAdder = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


SUBCOMMANDS: list[SubcommandAdder] = [
    add_demo,
    add_train,
    add_precompute_ref,
    add_eval,
    add_score,
    add_sweep,
    add_generate_pairs,
    add_iterate,
]


class _OneLineErrors(argparse.ArgumentParser):
    """A usage mistake is one line on stderr (`fastdpo train: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `fastdpo` parser with every subcommand in `SUBCOMMANDS`."""
    parser = _OneLineErrors(
        prog="fastdpo",
        description="Direct Preference Optimization without [tokens, vocab] logits.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_OneLineErrors
    )
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastdpo` console script; returns the process exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        hint = getattr(args, "unknown_option_hint", None)
        options = [u for u in unknown if u.startswith("--")]
        if hint is not None and options:
            parser.exit(2, f"{parser.prog} {args.command}: error: {hint(options[0])}\n")
        parser.error(message)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
