"""The README's Python examples run as written, so an out-of-date one fails here.

Every ```python block of README.md runs, in order, in one namespace, with a temporary folder as
the working directory (the examples write `prefs.jsonl`, a reference cache and a run folder).
A block meant only as an illustration must use another info string (```text, ```bash,
```yaml). Besides running, the results must show what the examples claim: the plain loop's
DPO loss goes down, the Hugging Face `Trainer` subclass changes the weights, the model then
generates what a never-packed copy of the trained weights generates, and the op alone gives
the log-probs of the full logits.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from fastdpo.testing.models import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block, in order."""
    return [
        (text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in _PYTHON_BLOCK.finditer(text)
    ]


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_python_blocks_are_found():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = 2\n\nc = 3\n")]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    assert blocks, f"no ```python block in {README}"
    namespace: dict = {"__name__": "readme"}
    weights_after: list[dict[str, torch.Tensor] | None] = []
    for line, source in blocks:
        exec(compile(source, f"{README}:{line}", "exec"), namespace)
        policy = namespace.get("policy")
        weights_after.append(parameters_of(policy) if policy is not None else None)

    # The plain loop: DPO from policy == reference (loss log 2) down, every loss finite.
    losses = namespace["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - math.log(2)) < 1e-4
    assert losses[-1] < 0.5 * losses[0]

    # The Trainer subclass trained its steps on packed batches and moved the weights.
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps == 2
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all(math.isfinite(loss) for loss in logged)
    block = next(i for i, (_, source) in enumerate(blocks) if "trainer.train()" in source)
    before, after = weights_after[block - 1], weights_after[block]
    assert any(not torch.equal(before[name], after[name]) for name in after)

    # Generation from the trained model, which sequence_logps switched to packed attention,
    # equals generation from a never-switched copy of the same weights.
    policy, prompt, sample = namespace["policy"], namespace["prompt"], namespace["sample"]
    plain = tiny_model("llama", vocab_size=policy.config.vocab_size).to(policy.device)
    plain.load_state_dict(policy.state_dict())
    expected = plain.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(sample, expected)
    assert sample.shape[1] > prompt["input_ids"].shape[1]

    # The op alone: the log-probs of the soft-capped full logits (float64), 0 where ignored.
    hidden, weight, targets = namespace["hidden"], namespace["weight"], namespace["targets"]
    logits = hidden.detach().double() @ weight.detach().double().T
    logits = 30.0 * torch.tanh(logits / 30.0)
    kept = targets != -100
    expected_logp = torch.zeros(len(targets), dtype=torch.float64)
    expected_logp[kept] = logits.log_softmax(-1)[kept].gather(1, targets[kept, None])[:, 0]
    torch.testing.assert_close(namespace["logp"].double(), expected_logp, rtol=1e-6, atol=1e-6)
    assert hidden.grad is not None and weight.grad is not None
