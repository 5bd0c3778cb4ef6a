"""A two-process reference-cache build under torchrun (gloo, CPU) equals the one-process build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fastdpo.reference import ReferenceCache
from fastdpo.reference_shards import MANIFEST_NAME
from fastdpo.testing.models import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import build, cache_contents, make_pairs

# Run by each rank. First every rank tries a build in which rank 1 holds other data (both must
# refuse it), then one in which rank 1 fails mid-build (both must raise, neither may wait for
# the other forever), then the real build; each rank writes down which shards it computed.
_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_reference import build, make_pairs
from fastdpo.reference import ReferenceCacheError
from fastdpo.testing.models import tiny_model

dist.init_process_group("gloo")
rank = dist.get_rank()
model = tiny_model("llama")
try:
    build(model, make_pairs(seed=rank), {out!r} + "-disagree")
    refused = None
except ReferenceCacheError as e:
    refused = str(e)
def fail_on_rank_1(record):
    if rank == 1:
        raise RuntimeError("disk full on rank 1")

try:
    build(model, make_pairs(8), {out!r} + "-fail", on_shard_written=fail_on_rank_1)
    failed = None
except (RuntimeError, ReferenceCacheError) as e:
    failed = str(e)
written = []
build(model, make_pairs(), {out!r}, on_shard_written=lambda r: written.append(r.index))
with open({out!r} + f"-rank{{rank}}.json", "w") as f:
    json.dump({{"written": written, "refused": refused, "failed": failed}}, f)
dist.destroy_process_group()
"""


def test_two_rank_build_equals_one_rank_build(tmp_path):
    out = tmp_path / "two"
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    )
    # Same thread count as this process: CPU matmuls round differently with another one.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["written"] == [0, 2, 4] and ranks[1]["written"] == [1, 3]  # disjoint
    for rank in ranks:
        assert "rank 1 builds from other inputs than rank 0 (dataset)" in rank["refused"]
    assert ranks[1]["failed"] == "disk full on rank 1"
    assert ranks[0]["failed"] == (
        "rank 1 failed while computing its shards: RuntimeError: disk full on rank 1"
    )

    single = build(tiny_model("llama"), make_pairs(), tmp_path / "one")
    two = ReferenceCache.open(out)
    assert cache_contents(two) == cache_contents(single)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["shards"] == single.manifest["shards"]  # the same bytes, shard by shard
    assert manifest["fingerprint"] == single.manifest["fingerprint"]
    assert manifest["build"]["world_size"] == 2
