"""`fastdpo train CONFIG.yaml [--key value ...]`: a training run from a YAML file and overrides.

Every `TrainConfig` field is an option (`--max-length 512`, `--beta 0.2`, booleans as
`--gradient-checkpointing` / `--no-gradient-checkpointing`), documented by the field's own
docstring in `--help`; options override the YAML file. Loss parameters go by their registry
names (`--label-smoothing 0.1`). The tokenization options are the same, with the same
defaults, as `fastdpo precompute-ref`'s (`add_config_options` builds both).

Exit status: 0 done, 2 a user mistake (bad key or value, missing file: one line, no
traceback), 1 a failed run (non-finite loss, another rank's failure), 130 / 143 stopped by
SIGINT / SIGTERM after saving a checkpoint.

Under `torchrun --nproc-per-node N -m fastdpo train CONFIG.yaml` every process runs this; the
process group comes from torchrun's environment (see `fastdpo.train.distributed`). Ranks
other than 0 log warnings and errors only, each line prefixed with its rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any

import yaml

from fastdpo.train.config import (
    TOKENIZATION_FIELDS,
    TrainConfig,
    field_docs,
    loss_parameter_names,
)

_CHOICES = {
    "prompt_truncation": ("left", "right"),
    "loss_on": ("final_turn", "all_assistant_turns"),
    "dtype": ("auto", "float32", "bfloat16"),
    "attention": ("auto", "flash", "torch", "flex", "sdpa"),
    "on_bad_row": ("error", "skip"),
    "report_to": ("auto", "tensorboard", "none"),
    "strategy": ("auto", "ddp", "fsdp2"),
    "share_prompt": ("auto", "true", "false"),
}


def _yaml_value(text: str) -> Any:
    """A command-line value read as YAML (numbers, null, true/false, lists) or kept as text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    *,
    with_defaults: bool,
) -> None:
    """One `--field-name` option per `TrainConfig` field in `names`, help from its docstring.

    `with_defaults=False` (train): an option not given is absent from the namespace, so the
    YAML file's value stands. `with_defaults=True` (precompute-ref): TrainConfig's defaults.
    """
    docs = field_docs()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + name.replace("_", "-")
        help_text = docs.get(name, "").replace("%", "%%")
        if default is not None and default != "":
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text}
        kwargs["default"] = default if with_defaults else argparse.SUPPRESS
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kinds = {k.strip() for k in str(f.type).split("|")}
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        elif "int" in kinds:
            kwargs.update(type=_or_null(int, "an integer"), metavar="N")
        elif "float" in kinds:
            kwargs.update(type=_or_null(float, "a number"), metavar="X")
        elif "str" in kinds:  # text stays text (YAML would read 2024-06-01 as a date)
            kwargs.update(type=_or_null(str, "text") if "None" in kinds else str, metavar="TEXT")
        else:  # Any: a YAML value (a mapping for `loss`, a list of module names, ...)
            kwargs.update(type=_yaml_value, metavar="VALUE")
        parser.add_argument(flag, **kwargs)


def _or_null(convert, what: str):
    """An argparse type: `convert(text)`, or None for "null"."""

    def parse(text: str):
        if text.lower() in ("null", "none"):
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or null, got {text!r}") from None

    parse.__name__ = convert.__name__  # argparse names the type in its messages
    return parse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `train` (sets `handler` to `run`)."""
    parser = subparsers.add_parser(
        "train",
        help="train a model with DPO (or another preference loss) from a YAML config",
        description=(
            "Train a causal LM on preference pairs. CONFIG.yaml holds TrainConfig keys (TRL's "
            "names where TRL has the concept); every key is also an option below and options "
            "override the file. Writes output_dir/config.yaml, metrics.jsonl, checkpoint-STEP/ "
            "and final/."
        ),
    )
    parser.add_argument("config", nargs="?", help="YAML file of TrainConfig keys (optional)")
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "loss_params"]
    tokenization = parser.add_argument_group("tokenization (the same as precompute-ref's)")
    add_config_options(tokenization, TOKENIZATION_FIELDS, with_defaults=False)
    rest = parser.add_argument_group("run settings")
    add_config_options(
        rest, [n for n in fields if n not in TOKENIZATION_FIELDS], with_defaults=False
    )
    params = parser.add_argument_group("loss parameters (by registry name)")
    internal = {"bco_state", "nll_denominator", "kl_policy_logps", "kl_ref_logps"}
    for name in sorted(loss_parameter_names() - internal):
        params.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_yaml_value,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"the loss parameter {name!r}",
        )
    parser.set_defaults(handler=run, unknown_option_hint=unknown_option_hint)


def unknown_option_hint(option: str) -> str:
    """`--betta` -> "unknown key 'betta'; did you mean 'beta'? ..." (for the CLI's error)."""
    from fastdpo.train.config import unknown_key_message

    return unknown_key_message(option.lstrip("-").split("=", 1)[0].replace("-", "_"))


_NOT_CONFIG = ("config", "handler", "command", "unknown_option_hint")
"""Namespace entries that are not TrainConfig keys."""


def run(args: argparse.Namespace) -> int:
    """Train as `args` says; returns the exit status."""
    from fastdpo.data.validation import BadRowError
    from fastdpo.reference_shards import ReferenceCacheError
    from fastdpo.train.config import ConfigError
    from fastdpo.train.distributed import RankFailedError
    from fastdpo.train.trainer import NonFiniteLossError, Trainer

    rank = int(os.environ.get("RANK", "0"))
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"[rank {rank}] " if ranks > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {where}%(name)s: %(message)s",
    )
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k not in ("config", "handler", "command", "unknown_option_hint")
    }
    trainer = None
    try:
        config = TrainConfig.from_yaml(args.config, overrides)
        trainer = Trainer(config)
        # a rank blocked in a collective when a peer fails reports it the same way
        trainer.parallel.report_peer_failure = lambda message: print(
            f"fastdpo train: {where}stopped: {message}", file=sys.stderr
        )
        result = trainer.train()
    except (ConfigError, BadRowError, ReferenceCacheError, FileNotFoundError, ValueError) as error:
        print(f"fastdpo train: {where}error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RankFailedError) as error:
        print(f"fastdpo train: {where}stopped: {error}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.parallel.shutdown()
    if not trainer.is_main:  # rank 0 reports for the run
        return 128 + int(result.stop_signal or signal.SIGINT) if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted after step {result.global_step}; checkpoint: {result.last_checkpoint}")
        print("resume with: --resume-from-checkpoint latest")
        return 128 + int(result.stop_signal or signal.SIGINT)
    print(f"done: {result.global_step} steps; final model in {result.final_dir}")
    print(f"metrics: {config.output_dir}/metrics.jsonl")
    return 0
