"""Test helper shared by the evaluation, generate-pairs and iterate tests: a tiny model folder."""

from __future__ import annotations

from pathlib import Path

from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random llama (weights seeded by `seed`) and the tiny tokenizer, saved in `folder`
    so it loads by path like a real checkpoint; returns `folder`."""
    tokenizer = build_tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer), seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
