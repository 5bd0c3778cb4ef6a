"""Options `fastdpo eval` and `fastdpo score` share: data, tokenization (training's), the pass.

The tokenization options are `fastdpo train`'s own (`add_config_options` over
`TOKENIZATION_FIELDS`, TrainConfig's defaults), so pairs are tokenized here exactly as training
and `fastdpo precompute-ref` tokenized them and a reference cache built there matches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastdpo.argtypes import positive_int
from fastdpo.evaluation.models import DTYPES


def add_data_options(parser: argparse.ArgumentParser, *, data_required: bool) -> None:
    """--data, --split, --tokenizer, --on-bad-row and the tokenization group."""
    from fastdpo.train.command import TOKENIZATION_FIELDS, add_config_options

    parser.add_argument(
        "--data",
        required=data_required,
        help="rows: a .jsonl/.json/.parquet file, a folder or a Hub name",
    )
    parser.add_argument("--split", default="train", help="dataset split (default %(default)s)")
    parser.add_argument(
        "--tokenizer", help="tokenizer folder or Hub id (default: the first model path's)"
    )
    parser.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default="error",
        help="a row that cannot be used: error (stop, naming it) or skip (counted and reported)",
    )
    tok = parser.add_argument_group(
        "tokenization (the same options and defaults as `fastdpo train`)"
    )
    add_config_options(tok, TOKENIZATION_FIELDS, with_defaults=True)


def add_pass_options(parser: argparse.ArgumentParser) -> None:
    """--beta, --device, --dtype, --attention, --max-tokens-per-batch, --trust-remote-code."""
    parser.add_argument(
        "--beta", type=float, default=0.1, help="the implicit reward's beta (default %(default)s)"
    )
    run = parser.add_argument_group("the forward passes")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    run.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="model weights (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    run.add_argument(
        "--attention",
        choices=["auto", "flash", "torch", "flex", "sdpa"],
        default="auto",
        help="packed attention backend (default %(default)s)",
    )
    run.add_argument(
        "--max-tokens-per-batch",
        type=positive_int,
        help="packed micro-batch budget (default: as precompute-ref's, at least 2 x max-length)",
    )
    run.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model folder"
    )


def tokenization_from(args: argparse.Namespace) -> dict[str, Any]:
    """The tokenization options of `args` as `tokenize_pairs` keyword arguments."""
    from fastdpo.train.config import TOKENIZATION_FIELDS

    return {name: getattr(args, name) for name in TOKENIZATION_FIELDS}


def pass_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `evaluate` / `score_rows` from the shared options."""
    tokenization = tokenization_from(args)
    return {
        "beta": args.beta,
        "max_length": tokenization.pop("max_length"),
        "tokenization": tokenization,
        "device": args.device,
        "dtype": args.dtype,
        "attention": args.attention,
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "on_bad_row": args.on_bad_row,
        "split": args.split,
        "trust_remote_code": args.trust_remote_code,
    }


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story (exit status 2, one message, no traceback)."""
    from fastdpo.data.validation import BadRowError
    from fastdpo.reference_shards import ReferenceCacheError

    return (BadRowError, ReferenceCacheError, FileNotFoundError, KeyError, ValueError)


def fail(command: str, error: BaseException) -> int:
    """Print `fastdpo <command>: error: ...` to stderr; return exit status 2."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"fastdpo {command}: error: {message}", file=sys.stderr)
    return 2


def describe_counts(counts: dict[str, Any]) -> str:
    """One line: what was read, kept, skipped and truncated."""
    parts = [f"{counts.get('pairs', 0)} kept"]
    if counts.get("rows") is not None:
        parts.insert(0, f"{counts['rows']} rows")
    for key in ("skipped_loading", "skipped_tokenizing"):
        skipped = counts.get(key) or {}
        if skipped:
            detail = ", ".join(f"{n} x {reason}" for reason, n in sorted(skipped.items()))
            parts.append(f"{sum(skipped.values())} {key.replace('_', ' ')} ({detail})")
    for key in ("truncated_prompts", "truncated_completions"):
        if counts.get(key):
            parts.append(f"{counts[key]} {key.replace('_', ' ')}")
    return "data: " + "; ".join(parts)
