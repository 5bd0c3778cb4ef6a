"""Reading raw rows from any supported source, each with its source name and row index.

Sources: a Python list of dicts; a `datasets.Dataset` / `DatasetDict` / `IterableDataset`; a
path to a JSONL / JSON / Parquet file, a folder saved with `Dataset.save_to_disk`, a folder of
such files, or a glob pattern; otherwise a Hugging Face Hub name (`datasets.load_dataset`).

Rows are numbered from 0 within each file (in JSONL, row i is line i + 1, blank lines
included, so a message points at the line). JSON and JSONL are read with the standard library
(line by line, so a bad line is reported with its number and does not stop the others, and
rows of different shapes can sit in one file, which a columnar reader would refuse); Parquet
is read with pyarrow, saved folders and Hub names with `datasets`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdpo.data.validation import Reason, RowProblem

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class RawRow:
    """One row as read: a dict, or the `RowProblem` that made it unreadable."""

    source: str
    index: int
    values: dict[str, Any] | None
    problem: RowProblem | None = None


def read_rows(source: Any, *, split: str = "train", config: str | None = None) -> Iterator[RawRow]:
    """Every row of `source` in order (see the module docstring for what `source` may be)."""
    if isinstance(source, (list, tuple)):
        yield from _python_rows(source, "<python list>")
    elif isinstance(source, (str, os.PathLike)):
        yield from _path_rows(source, split=split, config=config)
    elif type(source).__module__.startswith("datasets"):
        yield from _dataset_rows(source, split=split, name=f"<{type(source).__name__}>")
    else:
        raise TypeError(
            f"cannot read preference data from a {type(source).__name__}: pass a list of dicts, "
            "a datasets.Dataset, a file or folder path, or a Hugging Face Hub dataset name"
        )


def _python_rows(rows, name: str) -> Iterator[RawRow]:
    for i, row in enumerate(rows):
        yield _as_row(row, name, i)


def _as_row(row: Any, name: str, index: int) -> RawRow:
    if isinstance(row, dict):
        return RawRow(name, index, row)
    problem = RowProblem(Reason.MALFORMED, f"row is a {type(row).__name__}, expected a dict")
    return RawRow(name, index, None, problem)


def _dataset_rows(dataset, *, split: str, name: str) -> Iterator[RawRow]:
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict
        if split not in dataset:
            raise KeyError(f"{name} has no split {split!r}; it has {sorted(dataset.keys())}")
        dataset = dataset[split]
    yield from _python_rows(dataset, name)


def _path_rows(source: str | os.PathLike, *, split: str, config: str | None) -> Iterator[RawRow]:
    text = os.fspath(source)
    if glob.has_magic(text):
        files = sorted(glob.glob(text))
        if not files:
            raise FileNotFoundError(f"no file matches {text!r}")
        for file in files:
            yield from _file_rows(Path(file))
        return
    path = Path(text)
    if path.is_dir():
        if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            datasets = _import_datasets(text)
            yield from _dataset_rows(datasets.load_from_disk(text), split=split, name=text)
            return
        files = sorted(
            p for p in path.iterdir() if p.name.lower().endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)
        )
        if not files:
            raise FileNotFoundError(
                f"folder {text!r} holds neither a saved dataset nor .jsonl/.json/.parquet files"
            )
        for file in files:
            yield from _file_rows(file)
        return
    if path.exists():
        yield from _file_rows(path)
        return
    if path.suffix.lower() in JSON_SUFFIXES + PARQUET_SUFFIXES or text.startswith((".", "/")):
        raise FileNotFoundError(f"no such file: {text!r}")
    yield from _hub_rows(text, split=split, config=config)


def _file_rows(path: Path) -> Iterator[RawRow]:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_rows(path)
    elif name.endswith(JSON_SUFFIXES):
        yield from _json_rows(path)
    else:
        raise ValueError(
            f"{str(path)!r}: unknown file type; use .jsonl, .json or .parquet, or load it with "
            "datasets and pass the Dataset"
        )


def _json_rows(path: Path) -> Iterator[RawRow]:
    """A JSON array of rows, or JSON Lines (one row per line; many '.json' files are JSONL)."""
    name = str(path)
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is skipped
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: invalid JSON array: {e}") from e
            yield from _python_rows(rows, name)
            return
        first = True
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if first and _is_one_json_object(path):
                    raise ValueError(
                        f"{name} holds one JSON object spread over lines; expected a JSON array "
                        "of row objects or JSON Lines (one row object per line)"
                    ) from e
                message = f"line {index + 1} is not JSON: {e.msg} (column {e.colno})"
                yield RawRow(name, index, None, RowProblem(Reason.INVALID_JSON, message))
            else:
                yield _as_row(row, name, index)
            first = False


def _is_one_json_object(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return isinstance(json.load(f), dict)
    except json.JSONDecodeError:
        return False


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {str(path)!r} needs pyarrow: pip install 'fastdpo[data]'"
        ) from e
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RawRow(str(path), index, row)
            index += 1


def _hub_rows(name: str, *, split: str, config: str | None) -> Iterator[RawRow]:
    datasets = _import_datasets(name)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise RuntimeError(
            f"{name!r} is not a local file or folder, and loading it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {e}); check the name, the network, or pass a local path"
        ) from e
    yield from _dataset_rows(dataset, split=split, name=f"{name}[{split}]")


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading {what!r} needs datasets: pip install 'fastdpo[data]'") from e
    return datasets
