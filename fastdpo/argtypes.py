"""argparse value types shared by the `fastdpo` commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1, or an argparse error that says what was given."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
