"""Evaluating and using trained policies: rank models on pairs, implicit reward, pair generation.

    report = fastdpo.evaluate(["runs/a/final", "runs/b/final"], "heldout.jsonl", ref="base")
    rewards = fastdpo.implicit_reward(policy, ref, batch, beta=0.1)    # fp32 [S]

Modules (imported where used, so `import fastdpo.evaluation` stays light):
- `models`: loading a model folder (or taking a loaded module), device and dtype, freeing it;
- `data`: rows -> tokenized pairs with the trainer's tokenization options, counting drops;
- `logps`: per-example summed completion log-probs of one model (packed, fused head) or of a
  reference cache;
- `ranking`: `evaluate` (accuracies, bootstrap intervals, the ranking) and its JSON report;
- `implicit_reward`: `implicit_reward` on a packed batch and `score_rows` for `fastdpo score`;
- `eval_command`, `score_command`: the `fastdpo eval` and `fastdpo score` commands.
"""
