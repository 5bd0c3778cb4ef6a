"""Files written whole or not at all: a temporary file beside the target, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, value: Any) -> Path:
    """Write `value` as JSON to `path` through a temporary file in the same folder and a
    rename, so a reader never sees half a file (and a crash leaves the old one)."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` to `path` via a temporary file beside it and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, written atomically (see `write_text_atomic`)."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)
