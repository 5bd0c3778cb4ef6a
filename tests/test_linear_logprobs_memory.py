"""Peak memory of the fused op (torch impl) versus full logits, forward + backward, on the CPU.

Each variant runs in a fresh subprocess: its peak RSS (the kernel's high-water mark) minus its
RSS just before the op is the op's peak extra memory, whatever allocator torch uses underneath.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

ROWS, WIDTH, VOCAB = 8192, 256, 32000

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch

    variant, rows, width, vocab = sys.argv[1], *map(int, sys.argv[2:5])

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    from fastdpo.ops.linear_logprobs import linear_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::4] = -100
    before = rss_bytes()
    if variant == "fused":
        logp = linear_logprobs(hidden, weight, targets, impl="torch")
    else:
        logits = hidden @ weight.T
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        valid = targets != -100
        picked = logprobs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
        logp = torch.where(valid, picked, 0.0)
    logp.sum().backward()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across
    # fork + exec, so a large pytest worker would inflate it; the new mm's own peak starts here.
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
    print(json.dumps({"extra_bytes": peak - before, "checksum": float(logp.sum())}))
    """
)


def _peak_extra_bytes(variant: str) -> tuple[int, float]:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, variant, str(ROWS), str(WIDTH), str(VOCAB)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["extra_bytes"], measured["checksum"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_fused_peak_memory_is_10x_below_full_logits():
    fused_bytes, fused_sum = _peak_extra_bytes("fused")
    naive_bytes, naive_sum = _peak_extra_bytes("naive")
    # The two paths computed the same thing.
    assert abs(fused_sum - naive_sum) <= 1e-4 * abs(naive_sum)
    full_logits_bytes = ROWS * VOCAB * 4
    assert naive_bytes >= full_logits_bytes, "the naive path must at least hold the logits"
    assert fused_bytes * 10 <= naive_bytes, (
        f"fused {fused_bytes / 2**20:.0f} MiB vs naive {naive_bytes / 2**20:.0f} MiB"
    )
