"""`fastdpo generate-pairs --model M --prompts P --num-samples K --judge J --out PAIRS.jsonl`.

Samples K responses per prompt, scores each with the judge and writes preference pairs that
`fastdpo train` reads (see `fastdpo.evaluation.pair_generation`). Prints the summary (pairs,
skips by reason, judge calls) and writes it beside the output.

Exit status: 0 pairs written; 1 no pair could be formed, or the judge raised; 2 a user
mistake (missing model or prompt file, empty prompt file, bad option): one line, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from fastdpo.data.ranking import PAIRING_POLICIES

if TYPE_CHECKING:
    from fastdpo.evaluation.sampling import SamplingSettings

JUDGE_HELP = (
    "what scores a response: 'module:function' (a Python function (prompt, response) -> "
    "float), a Hugging Face sequence-classification reward model (folder or Hub id), or "
    "'implicit:POLICY,REF' (DPO's implicit reward beta * (log pi - log pi_ref))"
)


def add_sampling_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--num-samples, --max-new-tokens, --temperature, --top-p, --seed, --batch-size
    (shared with `fastdpo iterate`)."""
    parser.add_argument(
        "--num-samples", type=int, default=4, metavar="K", help="responses per prompt (default 4)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="most tokens per response"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, metavar="X", help="0 decodes greedily"
    )
    parser.add_argument("--top-p", type=float, default=1.0, metavar="X", help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts per generate call"
    )


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    """The `SamplingSettings` that `add_sampling_options`' flags in `args` describe."""
    from fastdpo.evaluation.sampling import SamplingSettings  # torch: only when a command runs

    return SamplingSettings(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def add_pairing_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--pairing, --min-score-gap, --on-judge-error, --judge-beta (shared with iterate)."""
    parser.add_argument(
        "--pairing",
        choices=PAIRING_POLICIES,
        default="best_vs_worst",
        help="which pairs a prompt's scored samples give (default best_vs_worst)",
    )
    parser.add_argument(
        "--min-score-gap", type=float, default=0.0, metavar="X", help="smallest gap of a pair"
    )
    parser.add_argument(
        "--on-judge-error",
        choices=("error", "skip"),
        default="error",
        help="a judge that raises: stop naming the prompt (error), or count and skip it",
    )
    parser.add_argument(
        "--judge-beta",
        type=float,
        default=0.1,
        metavar="X",
        help="beta of the implicit-reward judge (default 0.1)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `generate-pairs` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "generate-pairs",
        help="sample responses, rate them with a judge, write preference pairs",
        description=(
            "Sample K responses per prompt from a model (transformers generate, seeded), score "
            "each with a judge, and write pairs (best vs worst by default) in the format "
            "`fastdpo train` reads, with the scores and sampling settings per row. Ties and "
            "NaN scores are skipped and counted in OUT's .summary.json."
        ),
    )
    parser.add_argument("--model", required=True, help="the model that samples (folder or Hub id)")
    parser.add_argument(
        "--prompts",
        required=True,
        help="prompts: a .txt file (one per line) or rows with a 'prompt' column",
    )
    parser.add_argument("--judge", required=True, help=JUDGE_HELP)
    parser.add_argument("--out", required=True, help="the JSONL file of pairs to write")
    add_sampling_options(parser)
    add_pairing_options(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate pairs as `args` says; returns the exit status."""
    from fastdpo.evaluation.judges import JudgeError, load_judge
    from fastdpo.evaluation.pair_generation import generate_pairs

    try:
        sampling = sampling_settings(args)
        judge = load_judge(args.judge, device=args.device, beta=args.judge_beta)
        result = generate_pairs(
            args.model,
            args.prompts,
            judge,
            out=args.out,
            sampling=sampling,
            pairing=args.pairing,
            min_score_gap=args.min_score_gap,
            on_judge_error=args.on_judge_error,
            device=args.device,
        )
    except JudgeError as error:
        print(f"fastdpo generate-pairs: judge failed: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as error:
        print(f"fastdpo generate-pairs: error: {error}", file=sys.stderr)
        return 2
    for line in result.summary.lines():
        print(line)
    if not result.rows:
        print(
            "fastdpo generate-pairs: no pair could be formed (see the skip counts); sample more "
            "per prompt, raise the temperature or use a judge that tells responses apart",
            file=sys.stderr,
        )
        return 1
    return 0
