"""Judges: what scores a (prompt, response) for `generate-pairs`, `eval --generate`, `iterate`.

    judge = load_judge("fastdpo.demo.task:judge")              # a Python function
    judge = load_judge("path/to/reward-model")                 # HF sequence classification
    judge = load_judge("implicit:path/to/policy,path/to/ref")  # beta * (log pi - log pi_ref)
    scores = judge.score([(prompt, response), ...])            # list[float], one per item

A judge spec is one of:
- a Python callable, or "module:function" naming one: `function(prompt, response) -> float`,
  called once per response (`prompt` is the prompt as given: text or chat messages);
- a folder (or Hub id) of a Hugging Face `...ForSequenceClassification` model with one output
  (a reward model): its logit is the score; chat prompts go through its tokenizer's chat
  template with the response as the assistant turn, text prompts are prompt + response;
- "implicit:POLICY,REF": DPO's implicit reward `beta * (log pi(y|x) - log pi_ref(y|x))` of a
  policy and its reference (summed completion log-probs, packed forward, no logits).

Every judge counts the responses it scored in `calls` (one per response, whatever the batch),
so callers can show that comparing n models costs n x prompts judge calls. A callable that
raises is re-raised as `JudgeError` naming the item; a NaN score is returned as NaN (callers
count and skip it; they never drop it silently). A score that is not a number is an error.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

Prompt = Any
"""A prompt as the data gives it: text, or a list of chat messages ({"role", "content"})."""

_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class JudgeError(RuntimeError):
    """A judge failed on one item; `index` is the item's position in the `score` call."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class Judge:
    """Scores (prompt, response) items; subclasses implement `_score`."""

    name: str = "judge"

    def __init__(self) -> None:
        self.calls = 0
        """Responses scored so far (one call per response)."""

    def score(self, items: Sequence[tuple[Prompt, str]]) -> list[float]:
        """One float per (prompt, response) item, in order; NaN where the judge said NaN."""
        items = list(items)
        if not items:
            return []
        scores = self._score(items)
        self.calls += len(items)
        return scores

    def _score(self, items: list[tuple[Prompt, str]]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the judge holds (models); it may not be used afterwards."""


class CallableJudge(Judge):
    """`function(prompt, response) -> float`, called once per item."""

    def __init__(self, function: Callable[[Prompt, str], float], name: str | None = None):
        super().__init__()
        self.function = function
        self.name = name or getattr(function, "__qualname__", repr(function))

    def _score(self, items: list[tuple[Prompt, str]]) -> list[float]:
        scores = []
        for index, (prompt, response) in enumerate(items):
            try:
                value = self.function(prompt, response)
            except Exception as error:  # the user's code: name the item, keep the cause
                raise JudgeError(
                    f"judge {self.name} raised {type(error).__name__}: {error}", index
                ) from error
            scores.append(_as_score(value, self.name, index))
        return scores


class RewardModelJudge(Judge):
    """A sequence-classification model with one output; its logit is the score.

    Items are scored `batch_size` at a time, right-padded (the model reads the last non-pad
    token, which transformers finds from the pad id)."""

    def __init__(
        self,
        path: str,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 16,
        max_length: int = 2048,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = str(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"judge {path}: a reward model has one output, this one has "
                f"{self.model.config.num_labels} labels; pass a reward model (num_labels=1)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # it finds the last real token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, prompt: Prompt, response: str) -> str:
        """What the reward model reads for one item (before its tokenizer's special tokens)."""
        if isinstance(prompt, str):
            return prompt + response
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"judge {self.name}: a chat prompt needs a chat template and this tokenizer has "
                "none; give plain-text prompts or a reward model with a chat template"
            )
        messages = [*prompt, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def _score(self, items: list[tuple[Prompt, str]]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            # Chat text holds the template's special tokens already; plain text gets them here.
            encoded = self.tokenizer.pad(
                [
                    self.tokenizer(
                        self.text(prompt, response),
                        truncation=True,
                        max_length=self.max_length,
                        add_special_tokens=isinstance(prompt, str),
                    )
                    for prompt, response in chunk
                ],
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**encoded).logits.float()  # [B, 1]
            for offset, value in enumerate(logits[:, 0].tolist()):
                scores.append(_as_score(value, self.name, start + offset))
        return scores

    def close(self) -> None:
        del self.model


class ImplicitRewardJudge(Judge):
    """`beta * (log pi(y|x) - log pi_ref(y|x))`: a DPO-trained policy as a reward model.

    Log-probs are summed over the response's tokens, tokenized as training does (a text
    completion gets EOS appended), each response as one packed sequence (no pairs needed)."""

    def __init__(
        self,
        policy: str,
        reference: str,
        *,
        beta: float = 0.1,
        device: torch.device | str | None = None,
        max_length: int = 2048,
        max_tokens_per_batch: int = 8192,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"judge implicit:{policy},{reference}: beta must be > 0, got {beta}")
        self.name = f"implicit:{policy},{reference}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.beta = beta
        self.tokenizer = AutoTokenizer.from_pretrained(policy)
        self.policy = _load_causal_lm(policy, self.device)
        self.reference = _load_causal_lm(reference, self.device)
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch

    @torch.no_grad()
    def _score(self, items: list[tuple[Prompt, str]]) -> list[float]:
        reward = _implicit_reward_function()
        rewards = torch.full((len(items),), math.nan, dtype=torch.float64)
        for batch in packed_responses(
            self.tokenizer,
            items,
            max_length=self.max_length,
            max_tokens_per_batch=self.max_tokens_per_batch,
        ):
            batch = batch.to(self.device)
            rows = [int(example_id) for example_id in batch.example_ids]
            rewards[rows] = reward(self.policy, self.reference, batch, self.beta).double().cpu()
        return [_as_score(v, self.name, i) for i, v in enumerate(rewards.tolist())]

    def close(self) -> None:
        del self.policy, self.reference


def _implicit_reward_function():
    """`fastdpo.evaluation.implicit_reward.implicit_reward` (policy, ref, batch, beta) -> fp32
    [S]; where that module is absent, the same through `fastdpo.sequence_logps` here."""
    try:
        from fastdpo.evaluation.implicit_reward import implicit_reward
    except ImportError:
        from fastdpo.model import sequence_logps

        def implicit_reward(policy, reference, batch, beta):
            difference = (
                sequence_logps(policy, batch).logps - sequence_logps(reference, batch).logps
            )
            return beta * difference

    return implicit_reward


def packed_responses(
    tokenizer: Any,
    items: Sequence[tuple[Prompt, str]],
    *,
    max_length: int = 2048,
    max_tokens_per_batch: int = 8192,
):
    """Packed batches (an iterable of `PackedBatch`) of the items, each (prompt, response) one
    unpaired sequence whose example id is its position in `items`, tokenized as training
    tokenizes a completion (text: EOS appended; chat: the reply as an assistant turn)."""
    from fastdpo.data.packing import pack_pairs
    from fastdpo.data.tokenize import tokenize_pairs
    from fastdpo.data.types import PreferenceExample

    examples = []
    for index, (prompt, response) in enumerate(items):
        completion: Any = response
        if not isinstance(prompt, str):
            completion = [{"role": "assistant", "content": response}]
        examples.append(
            PreferenceExample(
                example_id=str(index), prompt=prompt, completion=completion, label=True
            )
        )
    tokenized = tokenize_pairs(examples, tokenizer, max_length=max_length)
    return pack_pairs(tokenized, max_tokens_per_batch=max_tokens_per_batch, shuffle=False)


def load_judge(
    spec: str | Callable[[Prompt, str], float] | Judge,
    *,
    device: torch.device | str | None = None,
    beta: float = 0.1,
) -> Judge:
    """A `Judge` from a spec (see the module docstring); a `Judge` is returned as is."""
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"judge: got {spec!r}; give 'module:function', a reward model folder or Hub id, or "
            "'implicit:POLICY,REF'"
        )
    if spec.startswith("implicit:"):
        parts = [p.strip() for p in spec.removeprefix("implicit:").split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"judge {spec!r}: the implicit reward judge is 'implicit:POLICY,REF' (two model "
                "folders or Hub ids, comma-separated)"
            )
        for path in parts:
            _check_model_path(path, spec)
        return ImplicitRewardJudge(parts[0], parts[1], beta=beta, device=device)
    if not os.path.exists(spec) and _CALLABLE_SPEC.match(spec):
        return CallableJudge(_import_callable(spec), name=spec)
    _check_model_path(spec, spec)
    return RewardModelJudge(spec, device=device)


def _import_callable(spec: str) -> Callable[[Prompt, str], float]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"judge {spec!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"judge {spec!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"judge {spec!r}: {attribute!r} is not callable")
    return target


def _check_model_path(path: str, spec: str) -> None:
    """A path that cannot be a Hub id ("name" or "org/name") must exist on disk: a missing
    folder is an error here, not a Hub lookup later."""
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"judge {spec!r}: model folder {path} does not exist")


def _load_causal_lm(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as error:
        raise FileNotFoundError(
            f"cannot load a causal LM from {path!r}: {str(error).splitlines()[0]}"
        ) from None
    return model.to(device).eval()


def _as_score(value: Any, name: str, index: int) -> float:
    """`value` as a float (NaN kept: callers count it); anything else is a `JudgeError`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, np.number):
                return float(value)
        except ImportError:  # pragma: no cover - numpy comes with torch
            pass
        raise JudgeError(
            f"judge {name} returned {value!r} ({type(value).__name__}); a judge returns a float",
            index,
        )
    return float(value)
