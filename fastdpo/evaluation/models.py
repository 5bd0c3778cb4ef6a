"""The models an evaluation reads: named, checked up front, loaded one at a time, freed after use.

A model is a local folder or Hub id (loaded here with fastdpo's packed attention and freed when
its scores are in) or an `nn.Module` the caller already holds (used where it is, never moved,
its train/eval mode restored afterwards). Local paths are checked before anything is loaded,
so a typo in the fifth `--model` fails in a second, not after four models were scored.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class EvaluationInputError(ValueError):
    """An input `fastdpo eval` / `score` cannot use; the message names it and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to score: its report name and a path / Hub id or a loaded module."""

    name: str
    source: str | nn.Module


def model_specs(models: Any) -> list[ModelSpec]:
    """Named specs from a path, a module, a sequence of those, or a mapping name -> either.

    Names: the path as given, `type(module).__name__` for modules; a repeated name gets "#k".
    """
    if isinstance(models, (str, os.PathLike, nn.Module)):
        models = [models]
    if isinstance(models, Mapping):
        items = [(str(name), source) for name, source in models.items()]
    else:
        items = [(_default_name(source), source) for source in models]
    if not items:
        raise EvaluationInputError("no models given: pass at least one model path or module")
    specs, seen = [], {}
    for name, source in items:
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if not isinstance(source, (str, nn.Module)):
            raise EvaluationInputError(
                f"model {name!r}: expected a folder, a Hub id or a torch.nn.Module, got a "
                f"{type(source).__name__}"
            )
        seen[name] = seen.get(name, 0) + 1
        specs.append(ModelSpec(name if seen[name] == 1 else f"{name}#{seen[name]}", source))
    return specs


def _default_name(source: Any) -> str:
    if isinstance(source, nn.Module):
        return type(source).__name__
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def looks_local(text: str) -> bool:
    """True if `text` can only be a local path (a Hub id is "name" or "owner/name")."""
    return (
        Path(text).exists()
        or text.startswith((".", "/", "~"))
        or os.path.isabs(text)
        or text.count("/") > 1
        or "\\" in text
    )


def check_model_path(text: str, what: str = "model") -> None:
    """Raise `EvaluationInputError` if `text` is a local path that holds no model."""
    if not looks_local(text):
        return  # a Hub id: loading says whether it exists
    path = Path(text).expanduser()
    if not path.exists():
        raise EvaluationInputError(f"{what}: no such model folder {text!r}")
    if not path.is_dir() or not (path / "config.json").exists():
        raise EvaluationInputError(
            f"{what}: {text!r} is not a model folder (no config.json): pass a folder saved "
            "with save_pretrained (e.g. a run's final/)"
        )


def resolve_device(choice: str | torch.device | None) -> torch.device:
    """ "auto"/None -> CUDA when available, else the CPU; a CUDA device that is missing is an
    error."""
    if isinstance(choice, torch.device):
        return choice
    choice = choice or "auto"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device: {choice!r} but no CUDA device is available")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(choice)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Weights dtype of loaded models: "auto" is bf16 on CUDA and fp32 on the CPU, as in
    `fastdpo precompute-ref`, so a reference computed here matches a cache built there."""
    if choice not in DTYPES:
        raise EvaluationInputError(f"dtype: got {choice!r}; allowed: {', '.join(DTYPES)}")
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def load_model(
    path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "auto",
    trust_remote_code: bool = False,
    what: str = "model",
) -> nn.Module:
    """A transformers causal LM from `path`, on `device`, in eval mode, with packed attention."""
    from transformers import AutoModelForCausalLM

    from fastdpo.attention import use_packed_attention

    check_model_path(path, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(path).expanduser()) if looks_local(path) else path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EvaluationInputError(f"{what}: cannot load {path!r}: {first_line}") from None
    use_packed_attention(model, backend=attention)
    return model.to(device).eval()


def module_device(model: nn.Module) -> torch.device:
    """Where the module's parameters live (the batches go there)."""
    for parameter in model.parameters():
        return parameter.device
    raise EvaluationInputError(f"{type(model).__name__} has no parameters")


@contextlib.contextmanager
def opened(
    source: str | nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "auto",
    trust_remote_code: bool = False,
    what: str = "model",
) -> Iterator[nn.Module]:
    """The model in eval mode for the `with` block; a model loaded here is freed after it."""
    if isinstance(source, nn.Module):
        was_training = source.training
        source.eval()
        try:
            yield source
        finally:
            source.train(was_training)
        return
    model = load_model(
        source,
        device=device,
        dtype=dtype,
        attention=attention,
        trust_remote_code=trust_remote_code,
        what=what,
    )
    try:
        yield model
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_local_paths(sources: Sequence[tuple[str, Any]]) -> None:
    """`check_model_path` for every (what, source) whose source is a string, before any load."""
    for what, source in sources:
        if isinstance(source, str):
            check_model_path(source, what)


def load_tokenizer(path: str, what: str = "tokenizer"):
    """The tokenizer saved with a model folder (or a Hub id's); a one-line error otherwise."""
    from transformers import AutoTokenizer

    where = str(Path(path).expanduser()) if looks_local(path) else path
    try:
        return AutoTokenizer.from_pretrained(where)
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EvaluationInputError(f"{what}: cannot load one from {path!r}: {first_line}") from None
