"""Tokenization with a locally built ChatML tokenizer: completions and masks are the reply."""

import logging

import pytest

from fastdpo.data.chat import ChatTemplateError, Completion, Encoded
from fastdpo.data.sources import load_preference_data
from fastdpo.data.tokenize import tokenize_pairs
from fastdpo.data.truncation import TruncationOptions, fit_to_max_length
from fastdpo.data.types import PreferenceExample
from fastdpo.data.validation import BadRowError, Reason
from fastdpo.testing.tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def msg(role, text):
    return {"role": role, "content": text}


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def render(tok, messages, generation_prompt):
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def test_tiny_tokenizer_round_trips_and_has_special_tokens(tok):
    text = "Hello, world! ünïcode 🙂\n\n  spaced"
    assert tok.decode(encode(tok, text)) == text
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    assert tok.chat_template == CHATML_TEMPLATE


def test_conversational_completion_is_exactly_the_reply(tok):
    prompt = [
        msg("system", "You are brief."),
        msg("user", "Hello!"),
        msg("assistant", "Hi."),
        msg("user", "What is the capital of France?"),
    ]
    data = load_preference_data(
        [{"prompt": prompt, "chosen": "Paris.", "rejected": "I do not know."}]
    )
    (pair,) = tokenize_pairs(data, tok, max_length=256)
    assert pair.prompt_ids == encode(tok, render(tok, prompt, True))
    assert tok.decode(pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "I do not know.<|im_end|>\n"
    full = encode(tok, render(tok, [*prompt, msg("assistant", "Paris.")], False))
    assert pair.prompt_ids + pair.chosen_ids == full
    assert pair.chosen_loss_mask is None and pair.rejected_loss_mask is None  # all count
    assert tok.decode(pair.prompt_ids).startswith("<|bos|><|im_start|>system\nYou are brief.")


MULTI_TURN = {
    "prompt": [msg("user", "Hi")],
    "chosen": [msg("assistant", "Hello."), msg("user", "And?"), msg("assistant", "Bye now.")],
    "rejected": [msg("assistant", "Go away.")],
}


def masked_text(tok, ids, mask):
    return tok.decode([t for t, keep in zip(ids, mask, strict=True) if keep])


def test_multi_turn_reply_final_turn_mask(tok):
    (pair,) = tokenize_pairs(load_preference_data([MULTI_TURN]), tok, max_length=256)
    assert tok.decode(pair.chosen_ids) == (
        "Hello.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n"
        "Bye now.<|im_end|>\n"
    )
    assert masked_text(tok, pair.chosen_ids, pair.chosen_loss_mask) == "Bye now.<|im_end|>\n"
    # the mask is a suffix: only the final turn counts
    first = pair.chosen_loss_mask.index(True)
    assert all(pair.chosen_loss_mask[first:]) and not any(pair.chosen_loss_mask[:first])
    assert pair.rejected_loss_mask is None


def test_multi_turn_reply_all_assistant_turns(tok):
    (pair,) = tokenize_pairs(
        load_preference_data([MULTI_TURN]), tok, max_length=256, loss_on="all_assistant_turns"
    )
    assert masked_text(tok, pair.chosen_ids, pair.chosen_loss_mask) == (
        "Hello.<|im_end|>\nBye now.<|im_end|>\n"
    )


def test_whole_conversation_row_tokenizes_like_prompt_plus_reply(tok):
    shared = [msg("system", "Sys."), msg("user", "Q?")]
    rows = [
        {"chosen": [*shared, msg("assistant", "A.")], "rejected": [*shared, msg("assistant", "B.")]}
    ]
    explicit = [{"prompt": shared, "chosen": "A.", "rejected": "B."}]
    a = tokenize_pairs(load_preference_data(rows), tok, max_length=64)[0]
    b = tokenize_pairs(load_preference_data(explicit), tok, max_length=64)[0]
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (
        b.prompt_ids,
        b.chosen_ids,
        b.rejected_ids,
    )


def test_plain_text_gets_bos_and_one_eos(tok):
    data = load_preference_data(
        [{"prompt": "Question:", "chosen": " yes", "rejected": " no<|eos|>"}]
    )
    (pair,) = tokenize_pairs(data, tok, max_length=64)
    assert pair.prompt_ids == [tok.bos_token_id, *encode(tok, "Question:")]
    assert pair.chosen_ids == [*encode(tok, " yes"), tok.eos_token_id]
    assert pair.rejected_ids == [*encode(tok, " no"), tok.eos_token_id]  # not doubled
    (no_eos,) = tokenize_pairs(data, tok, max_length=64, add_eos=False)
    assert no_eos.chosen_ids == encode(tok, " yes")
    with_bos = load_preference_data(
        [{"prompt": "<|bos|>Question:", "chosen": "a", "rejected": "b"}]
    )
    assert tokenize_pairs(with_bos, tok, max_length=64)[0].prompt_ids == pair.prompt_ids


def test_implicit_prompt_and_unpaired(tok):
    hh = "\n\nHuman: Hi\n\nAssistant:"
    (pair,) = tokenize_pairs(
        load_preference_data([{"chosen": hh + " Hello.", "rejected": hh + " Go."}]),
        tok,
        max_length=64,
    )
    assert tok.decode(pair.prompt_ids) == "<|bos|>" + hh
    assert tok.decode(pair.chosen_ids) == " Hello.<|eos|>"
    kto = load_preference_data(
        [{"prompt": [msg("user", "Hi")], "completion": "Yo", "label": False}]
    )
    (single,) = tokenize_pairs(kto, tok, max_length=64)
    assert not single.is_paired and single.label is False and single.rejected_ids is None
    assert tok.decode(single.chosen_ids) == "Yo<|im_end|>\n"


def test_text_as_chat(tok):
    data = load_preference_data([{"prompt": "Hi", "chosen": "A", "rejected": "B"}])
    (pair,) = tokenize_pairs(data, tok, max_length=64, text_as_chat=True)
    assert (
        tok.decode(pair.prompt_ids)
        == "<|bos|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(pair.chosen_ids) == "A<|im_end|>\n"


def test_template_fallback_is_counted_and_reported_once(caplog):
    # The generation prompt ends with a space that byte-level BPE merges into the reply's first
    # word: the prompt tokens are not a prefix of the conversation's tokens.
    template = CHATML_TEMPLATE.replace("assistant\n", "assistant ").replace(
        "{{ message['role'] }}\n", "{{ message['role'] }} "
    )
    assert template.count("assistant ") == 1
    tok = build_tiny_tokenizer(chat_template=template)
    rows = [
        {"prompt": [msg("user", f"Q{i}")], "chosen": "Paris", "rejected": "Rome"} for i in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="fastdpo.data"):
        pairs = tokenize_pairs(load_preference_data(rows), tok, max_length=64)
    assert pairs.report.template_fallbacks == 3
    assert len([r for r in caplog.records if "chat template" in r.message]) == 1
    for pair in pairs:
        assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant ")
        assert tok.decode(pair.chosen_ids) == "Paris<|im_end|>\n"
    # the fallback also locates the final turn of a multi-turn reply
    multi_pairs = tokenize_pairs(load_preference_data([MULTI_TURN]), tok, max_length=64)
    (multi,) = multi_pairs
    assert multi_pairs.report.template_fallbacks == 1
    assert masked_text(tok, multi.chosen_ids, multi.chosen_loss_mask) == "Bye now.<|im_end|>\n"


def test_template_that_rewrites_the_prompt_is_an_error():
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    template += "{% if add_generation_prompt %}NEXT:{% endif %}"
    tok = build_tiny_tokenizer(chat_template=template)
    data = load_preference_data([{"prompt": [msg("user", "Q")], "chosen": "A", "rejected": "B"}])
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        tokenize_pairs(data, tok, max_length=64)


def test_messages_without_chat_template_is_an_error(tok):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    data = load_preference_data([{"prompt": [msg("user", "Q")], "chosen": "A", "rejected": "B"}])
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_pairs(data, plain, max_length=64)


LONG = {
    "prompt": "The quick brown fox jumps over the lazy dog. " * 4,
    "chosen": "Here is a better answer with more detail. " * 3,
    "rejected": "Sorry.",
}


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_truncation_sides(tok, side):
    data = load_preference_data([LONG])
    full_prompt = tokenize_pairs(data, tok, max_length=4096)[0].prompt_ids
    (pair,) = tokenize_pairs(data, tok, max_length=40, max_prompt_length=12, prompt_truncation=side)
    assert len(pair.prompt_ids) == 12
    if side == "left":  # the end of the prompt, and the BOS
        assert pair.prompt_ids == [tok.bos_token_id, *full_prompt[-11:]]
    else:
        assert pair.prompt_ids == full_prompt[:12]
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 40  # completion cut to fit
    assert len(pair.rejected_ids) < 28  # short ones untouched
    report = tokenize_pairs(data, tok, max_length=40, max_prompt_length=12).report
    assert (report.truncated_prompts, report.truncated_completions) == (1, 1)


def test_cache_by_content(tok, tmp_path):
    data = load_preference_data([LONG, MULTI_TURN])
    first = tokenize_pairs(data, tok, max_length=64, cache_dir=tmp_path)
    again = tokenize_pairs(data, tok, max_length=64, cache_dir=tmp_path)
    assert not first.report.from_cache and again.report.from_cache
    assert list(first) == list(again)
    other = tokenize_pairs(data, tok, max_length=48, cache_dir=tmp_path)
    assert not other.report.from_cache and len(list(tmp_path.iterdir())) == 2
    changed = load_preference_data([{**LONG, "rejected": "No."}, MULTI_TURN])
    assert not tokenize_pairs(changed, tok, max_length=64, cache_dir=tmp_path).report.from_cache


def test_parallel_tokenization_matches_serial(tok):
    rows = [
        {"prompt": [msg("user", f"Question {i}?")], "chosen": f"Answer {i}.", "rejected": "No."}
        for i in range(160)
    ]
    data = load_preference_data(rows)
    serial = tokenize_pairs(data, tok, max_length=64)
    parallel = tokenize_pairs(data, tok, max_length=64, num_proc=2)
    assert list(parallel) == list(serial)


def test_cached_skips_do_not_answer_the_error_policy(tok, tmp_path):
    data = load_preference_data([LONG, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}])
    skipped = tokenize_pairs(data, tok, max_length=24, on_bad_row="skip", cache_dir=tmp_path)
    assert len(skipped) == 1 and skipped.report.skipped
    again = tokenize_pairs(data, tok, max_length=24, on_bad_row="skip", cache_dir=tmp_path)
    assert again.report.from_cache and again.report.skipped == skipped.report.skipped
    with pytest.raises(BadRowError):
        tokenize_pairs(data, tok, max_length=24, cache_dir=tmp_path)


def test_multi_turn_reply_whose_final_turn_is_cut_off_is_a_bad_row(tok):
    data = load_preference_data([MULTI_TURN])
    (full,) = tokenize_pairs(data, tok, max_length=256)
    first_counted = full.chosen_loss_mask.index(True)
    max_length = len(full.prompt_ids) + first_counted  # the earlier turns fit, the final does not
    with pytest.raises(BadRowError, match=r"'chosen': no loss token fits"):
        tokenize_pairs(data, tok, max_length=max_length)
    skipped = tokenize_pairs(data, tok, max_length=max_length, on_bad_row="skip")
    assert len(skipped) == 0 and skipped.report.skipped == {"prompt longer than max_length": 1}
    (kept,) = tokenize_pairs(data, tok, max_length=max_length + 1)
    assert kept.chosen_loss_mask == full.chosen_loss_mask[: first_counted + 1]


@pytest.mark.parametrize(
    ("chosen", "rejected", "empty"),
    [
        (Completion([7, 8], [False, False]), Completion([9], None), "chosen"),
        (Completion([7], None), Completion([], None), "rejected"),
    ],
)
def test_completion_without_a_loss_token_is_empty_content(chosen, rejected, empty):
    """A sequence with no target would add a log-prob of 0 to the loss: never kept."""
    example = PreferenceExample(example_id="e", prompt="p", chosen="a", rejected="b")
    encoded = Encoded([1, 5], [chosen, rejected], False)
    fitted = fit_to_max_length(example, encoded, TruncationOptions(max_length=16), 1)
    assert fitted.pair is None
    assert fitted.problem == (Reason.EMPTY_CONTENT, f"{empty!r} encodes to no loss token")
