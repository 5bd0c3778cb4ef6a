"""`fastdpo precompute-ref`: compute a reference model's log-probs over a dataset into a cache.

    fastdpo precompute-ref --model M --data D --out DIR [--max-length 1024] [--per-token] ...
    torchrun --nproc-per-node 8 -m fastdpo.cli precompute-ref ...   # one shard set per rank

Loads the data (`load_preference_data`), tokenizes it (`tokenize_pairs`) with the given
settings, loads the model, and runs `ReferenceCache.build`. Run the same command again after a
crash: finished shards are kept. The tokenization settings are recorded in the cache's
fingerprint; training must tokenize with the same ones
(`fastdpo.reference_fingerprint.tokenization_settings` builds the recorded dict from
`tokenize_pairs` keyword arguments, for the trainer to use too).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from fastdpo.argtypes import positive_int

logger = logging.getLogger("fastdpo.reference")

# Default token budgets of the pass (see --max-tokens-per-batch).
CUDA_BUDGET = 16384
CPU_BUDGET = 2048


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `precompute-ref` (sets `handler` to `run`)."""
    from fastdpo.data.shared_prompt import AUTO_MIN_PROMPT_SHARE

    parser = subparsers.add_parser(
        "precompute-ref",
        help="compute the reference model's log-probs over a dataset into a cache folder",
        description=(
            "One inference pass of the reference model over the tokenized dataset; writes "
            "summed (and optionally per-token) log-probs to safetensors shards plus a "
            "manifest.json with a fingerprint of model, tokenizer, data and settings. Run the "
            "same command again after a crash to finish (finished shards are kept). Under "
            "torchrun each rank computes its own shards."
        ),
    )
    parser.add_argument("--model", required=True, help="reference model: local folder or Hub id")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: --model)")
    parser.add_argument("--data", required=True, help="preference data (file, folder, Hub name)")
    parser.add_argument("--split", default="train", help="dataset split (default %(default)s)")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument(
        "--on-bad-row", choices=["error", "skip"], default="error", help="(default %(default)s)"
    )

    from fastdpo.train.command import TOKENIZATION_FIELDS, add_config_options

    tok = parser.add_argument_group(
        "tokenization (recorded in the fingerprint; the same options as `fastdpo train`)"
    )
    add_config_options(tok, TOKENIZATION_FIELDS, with_defaults=True)
    tok.add_argument("--num-proc", type=positive_int, default=1, help="tokenizer processes")

    run_group = parser.add_argument_group("the pass")
    run_group.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model dtype (auto: bfloat16 on CUDA, float32 on the CPU)",
    )
    run_group.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the pass runs (auto: CUDA when available)",
    )
    run_group.add_argument(
        "--attention",
        choices=["auto", "flash", "torch", "flex", "sdpa"],
        default="auto",
        help="packed attention backend (default %(default)s)",
    )
    run_group.add_argument(
        "--max-tokens-per-batch",
        type=positive_int,
        help=(
            "token budget per packed micro-batch; larger than training's, since no activations "
            f"are kept (default: {CUDA_BUDGET} on CUDA, {CPU_BUDGET} on the CPU, where packed "
            "attention uses a dense [T, T] mask; at least 2 * max-length)"
        ),
    )
    run_group.add_argument(
        "--examples-per-shard",
        type=positive_int,
        default=1024,
        help="examples per shard file: the unit of resume (default %(default)s)",
    )
    run_group.add_argument(
        "--loader-workers",
        type=int,
        help="DataLoader processes that collate batches (default: 2 on CUDA, 0 on the CPU)",
    )
    run_group.add_argument("--per-token", action="store_true", help="also store per-token values")
    run_group.add_argument(
        "--share-prompt",
        choices=["auto", "true", "false"],
        default="auto",
        help=(
            "pack each pair with its prompt once (same log-probs, fewer tokens; not part of the "
            "fingerprint, so the cache serves a run either way); auto: on when prompts are >= "
            f"{AUTO_MIN_PROMPT_SHARE * 100:.0f}%% of the tokens (default %(default)s)"
        ),
    )
    run_group.add_argument(
        "--overwrite", action="store_true", help="replace a cache built from other inputs"
    )
    run_group.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the cache described by `args`; returns the exit code (0 on success)."""
    import torch
    import torch.distributed as dist

    from fastdpo.reference import ReferenceCache, ReferenceCacheError
    from fastdpo.reference_build import BuildOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started_group = _init_distributed_from_env()
    try:
        device = _device(args.device)
        tokenizer, pairs, settings = _tokenized_data(args)
        model = _load_model(args, device)
        budget = args.max_tokens_per_batch
        if budget is None:  # a pair holds at most 2 * max_length tokens
            budget = max(CUDA_BUDGET if device.type == "cuda" else CPU_BUDGET, 2 * args.max_length)
        workers = args.loader_workers
        if workers is None:
            workers = 2 if device.type == "cuda" else 0
        options = BuildOptions(
            max_tokens_per_batch=budget,
            examples_per_shard=args.examples_per_shard,
            per_token=args.per_token,
            overwrite=args.overwrite,
            num_workers=workers,
            progress=args.progress,
            command=_command_line(),
            share_prompt=args.share_prompt,
        )
        try:
            cache = ReferenceCache.build(
                model, pairs, args.out, tokenizer=tokenizer, tokenization=settings, options=options
            )
        except (ReferenceCacheError, ValueError) as error:  # their messages say what to do
            print(f"fastdpo precompute-ref: error: {error}", file=sys.stderr)
            return 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(
                f"reference cache {cache.path}: {len(cache)} examples, "
                f"{len(cache.manifest['shards'])} shards, per-token values: {cache.per_token}"
            )
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    return 0


def _command_line() -> str | None:
    """This command as typed (for rebuild hints in the manifest), if it came from a shell."""
    if "precompute-ref" not in sys.argv:
        return None  # called in-process (a test, a notebook): argv is someone else's
    return shlex.join(["fastdpo", *sys.argv[sys.argv.index("precompute-ref") :]])


def _init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True if started here."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _tokenized_data(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from fastdpo.data.sources import load_preference_data
    from fastdpo.data.tokenize import tokenize_pairs
    from fastdpo.reference_fingerprint import tokenization_settings

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    examples = load_preference_data(args.data, split=args.split, on_bad_row=args.on_bad_row)
    kwargs = {
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "prompt_truncation": args.prompt_truncation,
        "loss_on": args.loss_on,
        "add_eos": args.add_eos,
        "text_as_chat": args.text_as_chat,
    }
    pairs = tokenize_pairs(
        examples, tokenizer, on_bad_row=args.on_bad_row, num_proc=args.num_proc, **kwargs
    )
    logger.info("%d examples loaded, %d tokenized pairs", len(examples), len(pairs))
    return tokenizer, pairs, tokenization_settings(**kwargs)


def _load_model(args: argparse.Namespace, device):
    import torch
    from transformers import AutoModelForCausalLM

    from fastdpo.attention import use_packed_attention

    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    use_packed_attention(model, backend=args.attention)
    return model.to(device).eval()
