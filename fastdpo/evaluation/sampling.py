"""Sampling responses from a causal LM with transformers `generate`: batched, seeded.

    settings = SamplingSettings(num_samples=4, max_new_tokens=64, temperature=1.0, seed=0)
    responses = sample_responses(model, tokenizer, prompts, settings)   # [prompt][sample] -> str

Prompts are encoded the way training encodes them, so a sampled response, written back as a
completion, is the continuation the model produced: plain text with the tokenizer's special
tokens (BOS) and no trailing EOS; chat messages through the chat template with the generation
prompt (the template writes its own special tokens). Prompts are left-padded into batches of
`batch_size` prompts x `num_samples` samples; generation stops at EOS or `max_new_tokens`, and
the special tokens are dropped from the decoded text.

Seeding: the draws come from a generator forked from the global one and seeded with `seed`,
so the same model, prompts and settings give the same responses on the same device (and the
caller's random state is left as it was). `temperature=0` is greedy decoding.

Model instances: transformers' `generate` needs the model's own attention; `fastdpo.sequence_logps`
switches an instance to packed-only attention, so sample from an instance that has not been
through it (load the model again, as `load_for_sampling` does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How responses are drawn; kept with every generated pair."""

    num_samples: int = 1
    """Responses per prompt."""
    max_new_tokens: int = 128
    """Most tokens per response."""
    temperature: float = 1.0
    """Softmax temperature; 0 decodes greedily (then every sample of a prompt is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    seed: int = 0
    """Seed of the draws."""
    batch_size: int = 16
    """Prompts per `generate` call (each with `num_samples` rows)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples: got {self.num_samples}; allowed: an integer >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {self.max_new_tokens}; allowed: >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: got {self.temperature}; allowed: >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: got {self.top_p}; allowed: 0 < top_p <= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: got {self.batch_size}; allowed: >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the draws (batch size excluded: it only changes speed)."""
        values = asdict(self)
        values.pop("batch_size")
        return values


def load_for_sampling(path: str, *, device: torch.device | str | None = None):
    """(model in eval mode, tokenizer) from a folder or Hub id; a clear error if missing."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"model {path}: no such folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as error:
        raise FileNotFoundError(
            f"model {path}: cannot load it ({str(error).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), tokenizer


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of one prompt as training encodes it (see the module docstring)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is not None and ids[:2] == [bos, bos]:
            ids = ids[1:]
        if eos is not None and len(ids) > 1 and ids[-1] == eos:
            ids = ids[:-1]
        return ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a chat prompt (a list of messages) needs a tokenizer with a chat template; this "
            "one has none: give plain-text prompts or a tokenizer with a template"
        )
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    settings: SamplingSettings,
) -> list[list[str]]:
    """`settings.num_samples` decoded responses per prompt: `result[i][k]` for prompt i."""
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    k = settings.num_samples
    results: list[list[str]] = []
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(settings.seed)
        for start in range(0, len(encoded), settings.batch_size):
            chunk = encoded[start : start + settings.batch_size]
            rows = [ids for ids in chunk for _ in range(k)]
            width = max(len(ids) for ids in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, ids in enumerate(rows):  # left padding: generation appends on the right
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            sampling: dict[str, Any] = {"do_sample": False}
            if settings.temperature > 0:
                sampling = {
                    "do_sample": True,
                    "temperature": settings.temperature,
                    "top_p": settings.top_p,
                    "top_k": 0,  # the full vocabulary (transformers' default is 50)
                }
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            results += [texts[i * k : (i + 1) * k] for i in range(len(chunk))]
    return results


def load_prompts(source: Any, *, column: str = "prompt") -> list[Any]:
    """The distinct prompts of `source`, in first-seen order.

    `source`: a list of prompts (texts or message lists); a .txt file (one prompt per
    non-blank line); or anything `load_preference_data` reads (JSONL, JSON, Parquet, a saved
    dataset, a Hub name) whose rows have a `column` (text or messages; other columns, such as
    chosen / rejected, are ignored). A prompt repeated (a preference file with several pairs
    per prompt) is kept once. No prompt at all is an error naming the source.
    """
    import json
    from pathlib import Path

    from fastdpo.data.messages import check_text
    from fastdpo.data.readers import read_rows
    from fastdpo.data.validation import RowProblem

    if isinstance(source, (str, Path)) and str(source).endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompts: {path} does not exist")
        raw = [line for line in path.read_text().splitlines() if line.strip()]
    elif isinstance(source, (list, tuple)) and all(isinstance(p, (str, list)) for p in source):
        raw = list(source)
    else:
        local = isinstance(source, (str, Path)) and str(source).startswith((".", "/", "~"))
        if local and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"prompts: {source} does not exist")
        raw = []
        for row in read_rows(source):
            where = f"prompts: {row.source} row {row.index}"
            if row.problem is not None:
                raise ValueError(f"{where}: {row.problem.message}")
            if row.values.get(column) is None:
                raise ValueError(f"{where}: no {column!r} column (columns: {sorted(row.values)})")
            raw.append(row.values[column])
    prompts: dict[str, Any] = {}
    for index, prompt in enumerate(raw):
        try:
            prompt = check_text(prompt, f"prompt {index}")
        except RowProblem as problem:
            raise ValueError(f"prompts: {problem.message}") from None
        prompts.setdefault(json.dumps(prompt, sort_keys=True, ensure_ascii=False), prompt)
    if not prompts:
        raise ValueError(
            f"prompts: {source if not isinstance(source, list) else 'the list'} "
            "holds no prompts; give a file with one prompt per row"
        )
    return list(prompts.values())
