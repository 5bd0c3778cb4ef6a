"""Where a run's numbers go: metrics.jsonl, the progress bar, TensorBoard, curves.png.

`metrics.jsonl` gets one JSON object per logging step (and one per evaluation, with `eval/`
names). Only rank 0 writes. TensorBoard event files are written when tensorboard is installed
(`report_to: auto`); `curves.png` is drawn at the end with matplotlib when it is installed,
else a one-line note says how to get it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("fastdpo.train")

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

_PANELS = (
    ("loss", ("loss", "eval/loss")),
    ("reward accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward margin", ("rewards/margins", "eval/rewards/margins")),
)


class LogWindow:
    """The steps since the last logged row: their values (device scalars until logged), tokens,
    pairs, packed capacity and training time. Saved in checkpoints, so a run resumed mid-window
    logs the row an uninterrupted run would."""

    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []
        self.tokens = self.pairs = self.capacity = 0
        self._seconds_before = 0.0  # time in earlier sessions (resume) or before a pause
        self._start = time.perf_counter()

    def add(
        self, values: dict[str, Any], learning_rate: float, tokens: int, pairs: int, capacity: int
    ) -> None:
        self.values.append({**values, "learning_rate": learning_rate})
        self.tokens += tokens
        self.pairs += pairs
        self.capacity += capacity

    def seconds(self) -> float:
        return self._seconds_before + time.perf_counter() - self._start

    @contextlib.contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, checkpoints)."""
        self._seconds_before = self.seconds()
        try:
            yield
        finally:
            self._start = time.perf_counter()

    def means(self) -> dict[str, float]:
        """Per key, the mean over the window's steps that have it."""
        keys = list(dict.fromkeys(k for row in self.values for k in row))
        return {
            key: sum(_as_float(row[key]) for row in self.values if key in row)
            / sum(1 for row in self.values if key in row)
            for key in keys
        }

    def to_state(self) -> dict[str, Any]:
        """Plain numbers for trainer_state.json."""
        return {
            "values": [{k: _as_float(v) for k, v in row.items()} for row in self.values],
            "tokens": self.tokens,
            "pairs": self.pairs,
            "capacity": self.capacity,
            "seconds": self.seconds(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> LogWindow:
        window = cls()
        if state:
            window.values = [dict(row) for row in state["values"]]
            window.tokens, window.pairs = state["tokens"], state["pairs"]
            window.capacity, window._seconds_before = state["capacity"], state["seconds"]
        return window


def _as_float(value: Any) -> float:
    return float(value.float()) if isinstance(value, torch.Tensor) else float(value)


class MetricsLog:
    """Appends metric rows to `output_dir/metrics.jsonl` and mirrors them to TensorBoard."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, report_to: str = "auto"):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._tensorboard = None
        if enabled and report_to != "none":
            self._tensorboard = _tensorboard_writer(Path(output_dir) / "tensorboard", report_to)

    def resume(self, up_to_step: int) -> None:
        """Keep the rows of steps <= up_to_step (a resumed run rewrites the rest)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("step", 0) <= up_to_step:
                    kept.append(row)
        self.rows = kept
        if self.enabled:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    def write(self, row: dict[str, Any]) -> None:
        """One row: plain floats/ints, NaN and inf written as null (valid JSON)."""
        clean = {k: _json_number(v) for k, v in row.items()}
        self.rows.append(clean)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            step = clean.get("step", 0)
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

    def plot(self) -> Path | None:
        """Draw curves.png from the rows; None (and a note) without matplotlib."""
        if not self.enabled or not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning(
                "no curves.png: matplotlib is not installed (pip install 'fastdpo[plot]'); "
                "the numbers are in %s",
                self.path,
            )
            return None
        figure, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.6))
        for axis, (title, keys) in zip(axes, _PANELS, strict=True):
            for key in keys:
                points = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(
                        steps,
                        values,
                        marker="o" if key.startswith("eval/") else None,
                        label="eval" if key.startswith("eval/") else "train",
                    )
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        out = self.path.with_name(CURVES_FILE)
        figure.savefig(out, dpi=100)
        plt.close(figure)
        return out


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tensorboard_writer(folder: Path, report_to: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if report_to == "tensorboard":
            from fastdpo.train.config import ConfigError

            raise ConfigError(
                "report_to: tensorboard is not installed (pip install tensorboard)"
            ) from None
        return None
    return SummaryWriter(log_dir=str(folder))
