"""Preference data: sources, row formats, tokenization, validation, pair-aware packing.

Modules, in the order data flows through them:
- `readers`: raw rows from JSONL / JSON / Parquet / `datasets` / Python lists / the Hub;
- `formats` (+ `messages`, `prompts`, `ranking`): a row -> canonical `PreferenceExample`s;
- `sources`: `load_preference_data`, with column mapping, stable ids and `validation`'s policy;
- `chat`: one example -> token ids and loss masks (chat template or plain text);
- `truncation`: one encoded example fitted into `max_length` (or the reason it cannot be);
- `tokenize`: `tokenize_pairs`, with the bad-row policy, worker processes and the `cache`;
- `planner`: best-fit-decreasing assignment of pairs to token-budget micro-batches;
- `collate`: pairs -> one `PackedBatch`; `packing`: `pack_pairs`, a DataLoader-ready epoch;
- `shared_prompt`: the shared-prompt form (each pair's prompt once) and `share_prompt="auto"`;
- `types`: the types that cross module boundaries (`PackedBatch` is the contract with the model).

Nothing here imports other fastdpo modules.
"""
