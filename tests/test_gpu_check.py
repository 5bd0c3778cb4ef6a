"""benchmarks/gpu_check.sh runs end to end in its dry-run mode on the CPU: every step runs
(CPU-sized), the report names device, versions, date and commit, and says what needed CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out")}
    env["GPU_CHECK_WHEELS"] = str(tmp_path / "no-wheels")  # nothing to install: fastdpo imports
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_dry_run_end_to_end(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.startswith("# fastdpo GPU check")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+", report)
    for package in ("torch", "triton", "transformers", "numpy"):
        assert re.search(rf"^- {package} \d", report, re.M), package
    # Each step ran and exited 0, and the report says what the GPU run would have done.
    assert re.search(r"pytest -m gpu --collect-only .*: exit 0", report)
    assert re.search(r"Collected only; running them needs CUDA \(\d+/\d+ tests collected\)", report)
    assert re.search(r"bench_linear_logprobs\.py .*--dtype bf16 .*: exit 0", report)
    assert re.search(r"bench_forward\.py .*: exit 0", report)
    assert "| 64, 32, 256 | bf16 | fwd | fastdpo-torch |" in report  # the head's table
    assert "| small | 512 |" in report  # the forward's table
    assert "every step exited 0; dry run." in report


def test_unknown_argument_is_refused(tmp_path):
    proc = _run(tmp_path, "--dryrun")
    assert proc.returncode == 2
    assert "unknown argument --dryrun" in proc.stderr
