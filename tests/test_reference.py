"""The reference log-prob cache: values, lookup, coverage, fingerprint, corruption, resume, CLI.

One tiny Llama and a few dozen synthetic pairs; the cache is built once per module (5 shards
of 7 examples) and copied where a test damages or extends it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdpo.data.packing import collate_pairs, pack_pairs
from fastdpo.data.types import TokenizedPair
from fastdpo.model import sequence_logps
from fastdpo.reference import (
    FingerprintMismatchError,
    ReferenceCache,
    ReferenceCacheError,
    expected_fields,
)
from fastdpo.reference_fingerprint import weights_digest
from fastdpo.reference_shards import MANIFEST_NAME, PLAN_NAME, file_sha256
from fastdpo.testing.models import tiny_model
from fastdpo.testing.tokenizer import build_tiny_tokenizer

NUM_PAIRS = 32
EXAMPLES_PER_SHARD = 7  # 32 examples -> 5 shards, the last one short
TOKENIZATION = {"max_length": 64, "template": "chatml"}
# Subprocesses use as many threads as this process: CPU matmuls round differently with another
# thread count, and the tests compare builds bit for bit.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def make_pairs(n: int = NUM_PAIRS, *, seed: int = 0, vocab: int = 96) -> list[TokenizedPair]:
    """Random paired examples of uneven lengths, some with loss masks, ids not in sorted order."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for i in rng.sample(range(n), n):
        chosen, rejected = ids(1, 12), ids(1, 12)
        mask = [k % 3 != 1 for k in range(len(chosen))] if i % 4 == 0 else None
        if mask is not None:
            mask[-1] = True  # at least one loss token
        pairs.append(
            TokenizedPair(
                example_id=f"row-{i}",
                prompt_ids=ids(1, 14),
                chosen_ids=chosen,
                rejected_ids=rejected,
                chosen_loss_mask=mask,
            )
        )
    return pairs


def build(model, pairs, out_dir, **kwargs) -> ReferenceCache:
    options = {
        "tokenizer": build_tiny_tokenizer(),
        "tokenization": TOKENIZATION,
        "examples_per_shard": EXAMPLES_PER_SHARD,
        "max_tokens_per_batch": 200,
        "per_token": True,
        "progress": False,
        **kwargs,
    }
    return ReferenceCache.build(model, pairs, out_dir, **options)


def cache_contents(cache: ReferenceCache) -> dict[str, tuple]:
    """Everything a cache holds, per example id (for exact comparisons of two builds)."""
    out = {}
    for example_id in cache.example_ids:
        e = cache.lookup(example_id)
        tokens = None
        if e.chosen_token_logps is not None:
            tokens = (e.chosen_token_logps.tolist(), e.rejected_token_logps.tolist())
        out[example_id] = (
            e.chosen_logp,
            e.rejected_logp,
            e.chosen_length,
            e.rejected_length,
            tokens,
        )
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def cache(model, pairs, tmp_path_factory) -> ReferenceCache:
    return build(model, pairs, tmp_path_factory.mktemp("ref") / "cache")


def copy_cache(cache: ReferenceCache, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(cache.path, target)
    return target


# ---- values -------------------------------------------------------------------------------------


def test_values_equal_sequence_logps(cache, model, pairs):
    """Every cached value equals sequence_logps of the reference model on the same pairs, in
    another batch composition (all pairs in one batch, and a few pairs alone)."""
    with torch.inference_mode():
        for group in [pairs, *([p] for p in pairs[:3])]:
            direct = sequence_logps(model, collate_pairs(group), return_token_logps=True)
            entries = [cache.lookup(p.example_id) for p in group]
            cached = [v for e in entries for v in (e.chosen_logp, e.rejected_logp)]
            lengths = [v for e in entries for v in (e.chosen_length, e.rejected_length)]
            tokens = [t for e in entries for t in (e.chosen_token_logps, e.rejected_token_logps)]
            # Another batch composition changes fp32 rounding only (sums of ~25 log-probs).
            torch.testing.assert_close(torch.tensor(cached), direct.logps, rtol=1e-5, atol=1e-5)
            assert lengths == direct.lengths.tolist()
            torch.testing.assert_close(
                torch.from_numpy(np.concatenate(tokens)), direct.token_logps, rtol=1e-5, atol=1e-5
            )
            assert all(e.paired for e in entries)


def test_loss_mask_counts_only_loss_tokens(cache, pairs):
    masked = next(p for p in pairs if p.chosen_loss_mask is not None)
    assert cache.lookup(masked.example_id).chosen_length == sum(masked.chosen_loss_mask)


def test_for_batch_matches_a_training_batch(cache, model, pairs):
    """A training-style packing (other budget, shuffled): values in the batch's own order."""
    with torch.inference_mode():
        for batch in pack_pairs(pairs, max_tokens_per_batch=96, seed=3):
            ref = cache.for_batch(batch, with_tokens=True)
            direct = sequence_logps(model, batch, return_token_logps=True)
            for got, want in [
                (ref.chosen, direct.chosen),
                (ref.rejected, direct.rejected),
                (ref.logps, direct.logps),
                (ref.token_logps, direct.token_logps),
            ]:
                assert got.dtype == torch.float32 and got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(ref.chosen_lengths.long(), direct.chosen_lengths.long())
            assert torch.equal(ref.rejected_lengths.long(), direct.rejected_lengths.long())


def test_for_batch_without_tokens_and_on_meta_device(cache, pairs):
    batch = collate_pairs(pairs[:3])
    ref = cache.for_batch(batch)
    assert ref.token_logps is None and ref.chosen.shape == (3,)
    moved = cache.for_batch(batch, device="meta")  # any device: values follow the batch there
    assert moved.chosen.device.type == "meta" and moved.logps.shape == (6,)


def test_loader_workers_give_the_same_values(cache, model, pairs, tmp_path):
    """Batches collated in DataLoader worker processes: same batches, same values."""
    from fastdpo.reference_build import BuildOptions

    options = BuildOptions(
        max_tokens_per_batch=200,
        examples_per_shard=EXAMPLES_PER_SHARD,
        per_token=True,
        num_workers=1,
        progress=False,
    )
    other = build(model, pairs, tmp_path / "c", options=options)
    assert cache_contents(other) == cache_contents(cache)


def test_unpaired_examples(model, tmp_path):
    """KTO-style examples: one completion each, rejected NaN, packed apart from pairs."""
    paired = make_pairs(6, seed=1)
    unpaired = [
        TokenizedPair(
            example_id=f"kto-{i}",
            prompt_ids=p.prompt_ids,
            chosen_ids=p.chosen_ids,
            rejected_ids=None,
            label=i % 2 == 0,
        )
        for i, p in enumerate(make_pairs(5, seed=2))
    ]
    cache = build(model, paired + unpaired, tmp_path / "c", examples_per_shard=4)
    with torch.inference_mode():
        direct = sequence_logps(model, collate_pairs(unpaired), return_token_logps=True)
    entries = [cache.lookup(p.example_id) for p in unpaired]
    cached = torch.tensor([e.chosen_logp for e in entries])
    torch.testing.assert_close(cached, direct.logps, rtol=1e-5, atol=1e-5)
    tokens = np.concatenate([e.chosen_token_logps for e in entries])
    torch.testing.assert_close(torch.from_numpy(tokens), direct.token_logps, rtol=1e-5, atol=1e-5)
    for e in entries:
        assert not e.paired and np.isnan(e.rejected_logp) and e.rejected_length == 0
        assert e.rejected_token_logps is None
    ref = cache.for_batch(collate_pairs(unpaired), with_tokens=True)
    assert ref.logps.shape == (5,) and torch.isnan(ref.rejected).all()
    torch.testing.assert_close(ref.token_logps, direct.token_logps, rtol=1e-5, atol=1e-5)
    cache.check_coverage(paired + unpaired)


# ---- lookup and coverage ------------------------------------------------------------------------


def test_lookup_of_an_unknown_id_names_it(cache):
    assert "row-3" in cache and "nope" not in cache and len(cache) == NUM_PAIRS
    with pytest.raises(KeyError, match="'nope'"):
        cache.lookup("nope")


def test_coverage_counts_missing_and_differing_examples(cache, pairs):
    cache.check_coverage(pairs)
    cache.check_coverage(p.example_id for p in pairs[:5])  # a subset is covered
    extra = make_pairs(3, seed=9)
    extra = [dataclasses.replace(p, example_id=f"new-{i}") for i, p in enumerate(extra)]
    changed = dataclasses.replace(pairs[0], chosen_ids=[*pairs[0].chosen_ids, 5])
    with pytest.raises(ReferenceCacheError) as info:
        cache.check_coverage([*pairs[1:], changed, *extra])
    message = str(info.value)
    assert f"3 of {NUM_PAIRS + 3} training examples have no entry" in message
    assert "'new-0'" in message
    assert f"1 of {NUM_PAIRS + 3} are tokenized differently" in message
    assert repr(pairs[0].example_id) in message
    assert "fastdpo precompute-ref" in message


def test_for_batch_of_an_uncached_example_fails(cache):
    stranger = TokenizedPair(example_id="x", prompt_ids=[3], chosen_ids=[4], rejected_ids=[5])
    with pytest.raises(KeyError, match="check_coverage"):
        cache.for_batch(collate_pairs([stranger]))


# ---- fingerprint --------------------------------------------------------------------------------


def test_matching_expectations_open(cache, model, pairs):
    fields = expected_fields(
        model=model, tokenizer=build_tiny_tokenizer(), tokenization=TOKENIZATION, examples=pairs
    )
    for expect in (fields, cache.fingerprint):
        opened = ReferenceCache.open(cache.path, expect=expect)
        assert opened.fingerprint == cache.fingerprint
        assert cache_contents(opened) == cache_contents(cache)


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ("model weights", ["model.weights"]),
        ("model config", ["model.config"]),  # rms_norm_eps: same weights
        ("tokenizer vocab", ["tokenizer.vocab_size", "tokenizer.digest"]),
        ("chat template", ["tokenizer.digest"]),
        ("dataset", ["dataset"]),
        ("max_length", ["tokenization.max_length"]),
    ],
)
def test_other_inputs_are_refused_naming_the_field(cache, model, pairs, change, fields):
    tokenizer, tokenization, examples, other_model = (
        build_tiny_tokenizer(),
        TOKENIZATION,
        pairs,
        model,
    )
    if change == "model weights":
        other_model = tiny_model("llama", seed=1)
    elif change == "model config":
        other_model = tiny_model("llama", rms_norm_eps=1e-5)
    elif change == "tokenizer vocab":
        tokenizer = build_tiny_tokenizer(vocab_size=300)
    elif change == "chat template":
        tokenizer = build_tiny_tokenizer(chat_template="{{ messages }}")
    elif change == "dataset":
        examples = make_pairs(seed=1)
    else:
        tokenization = {**TOKENIZATION, "max_length": 128}
    expect = expected_fields(
        model=other_model, tokenizer=tokenizer, tokenization=tokenization, examples=examples
    )
    with pytest.raises(FingerprintMismatchError) as info:
        ReferenceCache.open(cache.path, expect=expect)
    assert info.value.fields == fields
    for name in fields:
        assert name in str(info.value)
    assert "fastdpo precompute-ref" in str(info.value)


def test_expect_with_an_unknown_field_is_an_error(cache):
    with pytest.raises(KeyError, match=r"model\.weight"):
        ReferenceCache.open(cache.path, expect={"model.weight": "abc"})


def test_weights_digest_sees_any_single_weight_and_moves():
    model = tiny_model("llama")
    base = weights_digest(model)
    assert weights_digest(model) == base
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.mlp.down_proj.weight",
            "lm_head.weight",
            "model.norm.weight",
        ]:
            flat = params[name].view(-1)
            for index in (0, flat.numel() // 2 + 1, flat.numel() - 1):
                old = flat[index].clone()
                flat[index] = torch.nextafter(old, old + 1)  # the smallest possible change
                assert weights_digest(model) != base, (name, index)
                flat[index] = old
        assert weights_digest(model) == base
        flat = params["model.layers.0.self_attn.q_proj.weight"].view(-1)
        flat[[3, 700]] = flat[[700, 3]]  # two weights swap places
        assert weights_digest(model) != base


def test_weights_digest_is_the_same_for_a_bf16_model_upcast():
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    assert weights_digest(bf16) == weights_digest(tiny_model("llama", dtype=torch.bfloat16).float())


# ---- corruption and resume ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_detected_and_rebuilt(cache, model, pairs, tmp_path, damage):
    path = copy_cache(cache, tmp_path)
    shard = sorted((path / "shards").glob("*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    else:
        data[-7] ^= 0x40  # inside the last tensor's values: still loads, wrong numbers
    shard.write_bytes(bytes(data))
    with pytest.raises(ReferenceCacheError, match=rf"{shard.name}.*(truncated|corrupted)"):
        ReferenceCache.open(path)

    written = []
    rebuilt = build(model, pairs, path, on_shard_written=lambda r: written.append(r.index))
    assert written == [2]  # only the damaged shard is computed again
    assert cache_contents(rebuilt) == cache_contents(cache)


def test_shards_mixed_from_another_build_are_refused(cache, tmp_path):
    """A shard with a valid record but other examples (here: shard 1 again in place of shard 2)
    is caught by the dataset digest: no example twice, none missing."""
    path = copy_cache(cache, tmp_path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    second, third = manifest["shards"][1], manifest["shards"][2]
    shutil.copy(path / second["file"], path / third["file"])
    manifest["shards"][2] = {**second, "index": 2, "file": third["file"]}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ReferenceCacheError, match="do not hold the examples"):
        ReferenceCache.open(path)


_KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_reference import build, make_pairs
from fastdpo.testing.models import tiny_model

def stop_after_two(record):
    if record.index == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a crash: no cleanup runs

build(tiny_model("llama"), make_pairs(), {out!r}, on_shard_written=stop_after_two)
"""


def test_killed_build_resumes_with_identical_contents(cache, model, pairs, tmp_path):
    out = tmp_path / "cache"
    script = _KILLED_BUILD.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=SUBPROCESS_ENV)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST_NAME).exists() and (out / PLAN_NAME).exists()
    assert len(list((out / "shards").glob("*.safetensors"))) == 2
    with pytest.raises(ReferenceCacheError, match="unfinished"):
        ReferenceCache.open(out)

    written = []
    resumed = build(model, pairs, out, on_shard_written=lambda r: written.append(r.index))
    assert written == [2, 3, 4]
    assert cache_contents(resumed) == cache_contents(cache)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["shards"] == cache.manifest["shards"]  # same bytes, same checksums
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "shards"]
    assert len(list((out / "shards").iterdir())) == 5  # no records or temporary files left


def unfinish(path: Path) -> list[dict]:
    """Turn a finished cache folder into what a build killed after its last shard leaves: the
    plan, one record per shard, no manifest. Returns the records."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    keys = ("format", "format_version", "fingerprint", "plan")
    (path / PLAN_NAME).write_text(json.dumps({k: manifest[k] for k in keys}))
    for record in manifest["shards"]:
        (path / record["file"].replace(".safetensors", ".json")).write_text(json.dumps(record))
    (path / MANIFEST_NAME).unlink()
    return manifest["shards"]


def test_resume_recomputes_a_shard_whose_record_is_for_other_examples(
    cache, model, pairs, tmp_path
):
    """Shard 2 and its record come from a build over other examples (same ids, other tokens,
    same shard layout): its checksum holds, but it is not the planned shard."""
    other = build(model, make_pairs(seed=1), tmp_path / "other")
    path = copy_cache(cache, tmp_path)
    records = unfinish(path)
    unfinish(other.path)
    name = records[2]["file"]
    shutil.copy(other.path / name, path / name)
    record_name = name.replace(".safetensors", ".json")
    shutil.copy(other.path / record_name, path / record_name)
    written = []
    resumed = build(model, pairs, path, on_shard_written=lambda r: written.append(r.index))
    assert written == [2]
    assert cache_contents(resumed) == cache_contents(cache)


def test_resume_recomputes_a_shard_whose_record_misstates_its_examples(
    cache, model, pairs, tmp_path
):
    """The record claims the planned examples, size and checksum match the bytes, but the bytes
    hold other examples: what the shard holds is checked, not what its record says."""
    other = build(model, make_pairs(seed=1), tmp_path / "other")
    path = copy_cache(cache, tmp_path)
    records = unfinish(path)
    name = records[2]["file"]
    shutil.copy(other.path / name, path / name)
    forged = {
        **records[2],
        "bytes": (path / name).stat().st_size,
        "sha256": file_sha256(path / name),
    }
    (path / name.replace(".safetensors", ".json")).write_text(json.dumps(forged))
    written = []
    resumed = build(model, pairs, path, on_shard_written=lambda r: written.append(r.index))
    assert written == [2]
    assert cache_contents(resumed) == cache_contents(cache)


@pytest.mark.parametrize("other", ["per_token", "model weights"])
def test_resume_recomputes_shards_of_another_plan(cache, model, pairs, tmp_path, other):
    """Shards and records left by a build with another plan (per-token values off) or other
    inputs (another model), whose build-plan.json is gone (deleted by hand, or an overwrite
    killed half-way): same examples, so their records' contents match, but every one of them
    belongs to another build and is recomputed."""
    if other == "per_token":
        leftover = build(model, pairs, tmp_path / "left", per_token=False)
    else:
        leftover = build(tiny_model("llama", seed=1), pairs, tmp_path / "left")
    unfinish(leftover.path)
    (leftover.path / PLAN_NAME).unlink()
    written = []
    resumed = build(model, pairs, leftover.path, on_shard_written=lambda r: written.append(r.index))
    assert written == [0, 1, 2, 3, 4]
    assert cache_contents(resumed) == cache_contents(cache)


def test_finished_build_is_not_recomputed(cache, model, pairs):
    written = []
    build(model, pairs, cache.path, on_shard_written=lambda r: written.append(r.index))
    assert written == []


def test_build_killed_while_finalizing_is_complete(cache, model, pairs, tmp_path):
    """Killed after the manifest was written but before the plan and records were removed:
    the cache opens, and the next build computes nothing and removes the leftovers."""
    path = copy_cache(cache, tmp_path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    keys = ("format", "format_version", "fingerprint", "plan")
    (path / PLAN_NAME).write_text(json.dumps({k: manifest[k] for k in keys}))
    record = manifest["shards"][0]
    (path / record["file"].replace(".safetensors", ".json")).write_text(json.dumps(record))
    ReferenceCache.open(path)
    written = []
    build(model, pairs, path, on_shard_written=lambda r: written.append(r.index))
    assert written == []
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME, "shards"]
    assert len(list((path / "shards").iterdir())) == 5


def test_build_into_a_cache_of_other_inputs_needs_overwrite(cache, pairs, tmp_path):
    path = copy_cache(cache, tmp_path)
    other = tiny_model("llama", seed=3)
    with pytest.raises(ReferenceCacheError, match=r"model\.weights.*--overwrite"):
        build(other, pairs, path)
    rebuilt = build(other, pairs, path, overwrite=True)
    assert rebuilt.fingerprint.model_weights == weights_digest(other)


def test_duplicate_ids_are_refused(model, pairs, tmp_path):
    with pytest.raises(ValueError, match=r"duplicate example ids.*'row-1'"):
        build(model, [*pairs, dataclasses.replace(pairs[0], example_id="row-1")], tmp_path)


# ---- command line -------------------------------------------------------------------------------


def test_precompute_ref_command_end_to_end(tmp_path, capsys):
    from fastdpo.data.sources import load_preference_data
    from fastdpo.data.tokenize import tokenize_pairs
    from fastdpo.precompute import add_parser
    from fastdpo.reference import tokenization_settings

    tokenizer = build_tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [
        {
            "prompt": f"What is {i} + {i}?",
            "chosen": f"It is {2 * i}.",
            "rejected": "I do not know. Sorry, I cannot help with that." * (1 + i % 2),
        }
        for i in range(12)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ref"

    parser = argparse.ArgumentParser(prog="fastdpo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["precompute-ref", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--max-length", "48", "--examples-per-shard", "5", "--device", "cpu", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0

    # What a training run would check: same model, tokenizer and settings, each example covered.
    # (The tokenizer as loaded from the folder: next to a Qwen2 config AutoTokenizer picks
    # Qwen2's class, which adds a token to the in-memory one.)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_preference_data(str(data))
    tokenized = tokenize_pairs(examples, tokenizer, max_length=48)
    settings = tokenization_settings(max_length=48)
    cache = ReferenceCache.open(
        out, expect=expected_fields(model=loaded, tokenizer=tokenizer, tokenization=settings)
    )
    cache.check_coverage(tokenized)
    assert len(cache) == 12 and len(cache.manifest["shards"]) == 3
    with torch.inference_mode():
        direct = sequence_logps(loaded, collate_pairs(tokenized))
    ref = cache.for_batch(collate_pairs(tokenized))
    torch.testing.assert_close(ref.logps, direct.logps, rtol=1e-5, atol=1e-5)

    with pytest.raises(FingerprintMismatchError, match=r"tokenization\.max_length"):
        ReferenceCache.open(
            out, expect=expected_fields(tokenization=tokenization_settings(max_length=64))
        )

    # Into the same folder with other settings: refused with a message, exit code 1.
    args = parser.parse_args([*argv[:7], "--max-length", "32", *argv[9:]])
    assert args.handler(args) == 1
    error = capsys.readouterr().err
    assert "tokenization.max_length (48 vs 32)" in error and "--overwrite" in error
