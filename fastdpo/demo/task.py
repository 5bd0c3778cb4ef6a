"""The demo's preference task: answer a request with a polite sign-off, not a curt one.

A user asks for an item ("User: Can you pass me the salt?\\nAssistant:"). A reply says where
the item is, then signs off, politely or curtly; phrases are picked from small lists so sampled
replies vary:

    polite (preferred):  " Here is the salt. Have a nice day!"
    curt (dispreferred): " Here is the salt. Leave me alone."

`judge` reads the style off a generation with string matching (and checks that it names the
requested item). Both styles have the same number of sign-offs, so neither is more likely by
count alone.

All rows come from one seed: the (template, item) prompts are shuffled and a fraction is held
out. Warm-up (SFT) rows show each training prompt once with each style as "chosen", so the
warm-up model signs off either way about half the time; DPO rows pair a polite reply (chosen)
with a curt one (rejected). The two replies of every pair say the same first sentence: the
tokens they share have the same log-prob under any model, so they cancel out of the DPO margin
and the loss acts on the sign-off alone.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

TEMPLATES: tuple[str, ...] = (
    "Can you pass me the {item}?",
    "Where is the {item}?",
    "Could you bring the {item}?",
    "I need the {item}.",
    "Do you have the {item}?",
    "Please find the {item}.",
)
"""User requests; `{item}` is one of `ITEMS`."""

ITEMS: tuple[str, ...] = (
    "salt", "pepper", "bread", "cheese", "apple", "lemon", "honey", "butter",
    "coffee", "tea", "milk", "sugar", "spoon", "fork", "knife", "plate",
    "cup", "kettle", "towel", "soap", "lamp", "chair", "pillow", "blanket",
    "book", "pencil", "map", "ticket", "wallet", "key", "umbrella", "hat",
    "scarf", "glove", "jacket", "ball", "kite", "guitar", "camera", "phone",
)  # fmt: skip
"""The things users ask for (single words, so the judge can find them by word match)."""

BODIES: tuple[str, ...] = (
    "Here is the {item}.",
    "The {item} is on the table.",
    "I found the {item}.",
)
"""What a reply says, in either style."""
POLITE: tuple[str, ...] = (
    "Have a nice day!",
    "Anything else I can do for you?",
    "Thank you for asking!",
    "Enjoy!",
)
"""Sign-offs of the polite style (preferred)."""
CURT: tuple[str, ...] = (
    "Now go away.",
    "Stop asking me.",
    "Leave me alone.",
    "Do it yourself next time.",
)
"""Sign-offs of the curt style (dispreferred)."""

PROMPT_FORMAT = "User: {request}\nAssistant:"
"""How a request becomes a prompt; a reply starts with a space and follows it directly."""


def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One regex matching any of `phrases` (case-insensitive)."""
    # (?<!\w): a phrase starts at a word start ("Enjoy!" must not match inside "Overenjoy!")
    return re.compile("|".join(rf"(?<!\w){re.escape(p)}" for p in phrases), re.IGNORECASE)


_POLITE_PATTERN = _phrase_pattern(POLITE)
_CURT_PATTERN = _phrase_pattern(CURT)
_ITEM_PATTERN = re.compile(r"\b(" + "|".join(ITEMS) + r")\b", re.IGNORECASE)


def make_prompt(template: str, item: str) -> str:
    """The prompt text of one request."""
    return PROMPT_FORMAT.format(request=template.format(item=item))


def make_reply(body: str, sign_off: str, item: str) -> str:
    """A reply: `body` (one of `BODIES`) about `item`, then `sign_off`, after a space."""
    return f" {body.format(item=item)} {sign_off}"


def requested_item(prompt: str) -> str | None:
    """The item a prompt asks for (the last item word in it), or None if it names none."""
    found = _ITEM_PATTERN.findall(prompt)
    return found[-1].lower() if found else None


def judge(prompt: str, response: str) -> float:
    """How much a response is what the task prefers: 1.0 polite and about the requested item.

    0.0 if the response does not name the item the prompt asks for, or names another item
    (an off-topic reply is never preferred, however polite); otherwise the share of the known
    phrases found in it that are polite (0.0 when it has none: a reply in neither style).
    A clean polite reply scores 1.0, a clean curt one 0.0, a mix in between.
    """
    item = requested_item(prompt)
    named = {word.lower() for word in _ITEM_PATTERN.findall(response)}
    if item is None or named != {item}:
        return 0.0
    polite = len(_POLITE_PATTERN.findall(response))
    curt = len(_CURT_PATTERN.findall(response))
    return polite / (polite + curt) if polite + curt else 0.0


@dataclass(kw_only=True)
class TaskData:
    """The demo's rows (dicts with "prompt", "chosen", "rejected": what `load_preference_data`
    reads), all made from one seed."""

    sft_rows: list[dict[str, str]]
    """Warm-up rows: each training prompt twice, once with each style as "chosen"."""
    dpo_rows: list[dict[str, str]]
    """Training pairs: chosen polite, rejected curt."""
    heldout_rows: list[dict[str, str]]
    """Pairs like `dpo_rows` on prompts no training row uses."""

    @property
    def heldout_prompts(self) -> list[str]:
        """Held-out prompts in row order, without repeats."""
        return list(dict.fromkeys(row["prompt"] for row in self.heldout_rows))


def make_task(
    *, seed: int, heldout_fraction: float = 0.2, dpo_pairs_per_prompt: int = 2
) -> TaskData:
    """All rows of the task, deterministic in `seed`.

    The `len(TEMPLATES) * len(ITEMS)` prompts are shuffled by `seed`; the first
    `heldout_fraction` of them are held out (one pair each). Every item still appears in
    training under other templates, so held-out prompts are new sentences about known items.
    A prompt's DPO pairs are distinct (body, polite sign-off, curt sign-off) draws.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    combinations = list(itertools.product(BODIES, POLITE, CURT))
    if not 1 <= dpo_pairs_per_prompt <= len(combinations):
        raise ValueError(
            f"dpo_pairs_per_prompt must be in [1, {len(combinations)}], got {dpo_pairs_per_prompt}"
        )
    rng = random.Random(seed)
    prompts = [(template, item) for template in TEMPLATES for item in ITEMS]
    rng.shuffle(prompts)
    n_heldout = max(1, round(heldout_fraction * len(prompts)))
    heldout, train = prompts[:n_heldout], prompts[n_heldout:]

    def pairs(template: str, item: str, count: int) -> list[dict[str, str]]:
        """`count` distinct pairs (polite chosen) for one prompt; each pair shares its body."""
        prompt = make_prompt(template, item)
        return [
            {
                "prompt": prompt,
                "chosen": make_reply(body, polite, item),
                "rejected": make_reply(body, curt, item),
            }
            for body, polite, curt in rng.sample(combinations, count)
        ]

    sft_rows = []
    for template, item in train:
        polite_first = pairs(template, item, 1)[0]
        curt_first = pairs(template, item, 1)[0]
        curt_first["chosen"], curt_first["rejected"] = curt_first["rejected"], curt_first["chosen"]
        sft_rows += [polite_first, curt_first]
    dpo_rows = [row for t, item in train for row in pairs(t, item, dpo_pairs_per_prompt)]
    heldout_rows = [row for t, item in heldout for row in pairs(t, item, 1)]
    return TaskData(sft_rows=sft_rows, dpo_rows=dpo_rows, heldout_rows=heldout_rows)


def corpus() -> list[str]:
    """Every prompt and reply phrase of the task (what the demo's tokenizer is trained on)."""
    texts = [make_prompt(template, item) for template in TEMPLATES for item in ITEMS]
    texts += [" " + phrase for phrase in (*POLITE, *CURT)]
    texts += [" " + body.format(item=item) for body in BODIES for item in ITEMS]
    return texts
