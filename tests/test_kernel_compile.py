"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100) under this venv's triton,
without a GPU, at the configurations the launchers pick for the benchmark shapes: within the
block's shared memory, without spills, and with tensor-core instructions in the matmul kernels
(wgmma on sm_90). The compiling runs benchmarks/kernel_compile_report.py in a subprocess: this
process imported the kernels for the interpreter, which cannot compile them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import kernel_compile_report as report  # noqa: E402


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_compile_report.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if not out.exists():
        pytest.fail(
            f"the compile report did not finish:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    payload = json.loads(out.read_text())
    payload["stdout"] = proc.stdout
    payload["returncode"] = proc.returncode
    return payload


def test_every_kernel_has_a_compile_spec(compiled):
    missing = compiled["kernels_without_spec"]
    assert not missing, (
        f"Triton kernels without a compile spec: {missing}. Add one line per configuration to "
        "SPECS in benchmarks/kernel_compile_report.py: KernelSpec(name, config, launch, "
        "matmul=...), where launch() returns the Launch(kernel, args, kwargs) your launcher "
        "makes at the benchmark shape, on report.meta(...) tensors"
    )


def test_every_spec_compiled_for_every_target(compiled):
    # (config labels may differ here: this process sees the interpreter's tile configuration)
    got = sorted((row["kernel"], row["target"]) for row in compiled["rows"])
    want = sorted((spec.name, target) for spec in report.SPECS for target in report.TARGETS)
    assert got == want
    failed = [f"{row['kernel']} [{row['config']}] {row['target']}: {row['error']}"
              for row in compiled["rows"] if row["error"]]  # fmt: skip
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("target", list(report.TARGETS))
def test_kernels_within_limits(compiled, target):
    """Shared memory, spills and the matmul instruction, per target (report.problems)."""
    rows = [row for row in compiled["rows"] if row["target"] == target]
    assert rows
    bad = [f"{row['kernel']} [{row['config']}]: {'; '.join(row['problems'])}"
           for row in rows if row["problems"]]  # fmt: skip
    assert not bad, f"triton {compiled['triton']}, {target}:\n" + "\n".join(bad)
    # The numbers the checks read are really there (a parse that found nothing reads as None).
    for row in rows:
        assert row["registers"] > 0 and row["shared_bytes"] >= 0 and row["spill_bytes"] >= 0
    matmul = [row for row in rows if row["matmul_instruction"] is not None]
    assert matmul, "no matmul kernel among the specs: the wgmma check checks nothing"


def test_report_prints_the_table_and_exits_zero(compiled):
    assert compiled["returncode"] == 0, compiled["stdout"][-3000:]
    assert "| kernel | config | target | registers |" in compiled["stdout"]
    assert "linear_logprobs.fwd" in compiled["stdout"]


def _row(**fields) -> report.Row:
    base = dict(kernel="k", config="c", target="sm_90", registers=128, spill_bytes=0)
    return report.Row(**{**base, "shared_bytes": 1024, "matmul_instruction": True, **fields})


def test_problems_flags_each_limit():
    """report.problems, on made-up rows: each check can fail, at its exact threshold."""
    limit = report.TARGETS["sm_90"][1]
    assert report.problems(_row(), limit) == []
    assert report.problems(_row(shared_bytes=limit), limit) == []
    assert "shared memory" in report.problems(_row(shared_bytes=limit + 1), limit)[0]
    assert "spills 4 B" in report.problems(_row(spill_bytes=4), limit)[0]
    assert "wgmma" in report.problems(_row(matmul_instruction=False), limit)[0]
    assert report.problems(_row(matmul_instruction=None), limit) == []
    assert "does not compile" in report.problems(_row(error="PTXASError: x"), limit)[0]
    sm80 = report.TARGETS["sm_80"][1]
    tolerated = report.SPILL_TOLERANCE["sm_80"]
    assert report.problems(_row(target="sm_80", spill_bytes=tolerated), sm80) == []
    assert report.problems(_row(target="sm_80", spill_bytes=tolerated + 4), sm80)
    assert "mma.sync" in report.problems(_row(target="sm_80", matmul_instruction=False), sm80)[0]
