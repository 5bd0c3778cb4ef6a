"""The data types that cross module boundaries: canonical examples, tokenized pairs, packed batches.

`PackedBatch` is the contract between `fastdpo.data` (which builds it), `fastdpo.model` (which
runs it through a model) and `fastdpo.reference` (which stores per-example results): its
layout is documented field by field here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import torch

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": str}."""


@dataclass(frozen=True, kw_only=True)
class PreferenceExample:
    """One example in canonical form, whatever row format it came from.

    A paired example has `chosen` and `rejected`; an unpaired (KTO) example has `completion`
    and `label`. Text is either a plain string or a list of chat messages (then the prompt is
    the conversation so far and completions are assistant messages).
    """

    example_id: str
    """Stable id (used to look up reference log-probs); unique within a dataset."""
    prompt: str | list[Message]
    chosen: str | list[Message] | None = None
    rejected: str | list[Message] | None = None
    completion: str | list[Message] | None = None
    """Unpaired examples only: the single completion."""
    label: bool | None = None
    """Unpaired examples only: True if the completion is desirable."""
    source: str | None = None
    """Where the row came from (a file name or a description), for error messages."""
    row: int | None = None
    """The row index in `source`, for error messages."""

    @property
    def is_paired(self) -> bool:
        return self.completion is None


@dataclass(frozen=True, kw_only=True)
class TokenizedPair:
    """Token ids of one example. Completion ids hold the completion only (no prompt tokens).

    An unpaired (KTO) example keeps its completion in `chosen_ids`, has `rejected_ids=None`
    and its desirability in `label`.
    """

    example_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    label: bool | None = None
    chosen_loss_mask: list[bool] | None = None
    """Which completion tokens count in the loss (multi-turn, all assistant turns); None: all."""
    rejected_loss_mask: list[bool] | None = None

    @property
    def is_paired(self) -> bool:
        return self.rejected_ids is not None

    @property
    def num_tokens(self) -> int:
        """Tokens this example takes in a packed stream (the prompt appears once per sequence)."""
        return self.tokens_in_stream(share_prompt=False)

    def tokens_in_stream(self, share_prompt: bool = False) -> int:
        """Tokens this example takes in a packed stream: the prompt once per sequence, or once
        per pair in the shared-prompt form (`share_prompt=True`, paired examples)."""
        n = len(self.prompt_ids) + len(self.chosen_ids)
        if self.rejected_ids is not None:
            n += len(self.rejected_ids) + (0 if share_prompt else len(self.prompt_ids))
        return n


class Role(enum.IntEnum):
    """What a packed sequence is, stored per sequence in `PackedBatch.seq_role`."""

    CHOSEN = 0
    REJECTED = 1
    UNPAIRED = 2


@dataclass(kw_only=True)
class SharedPromptLayout:
    """Where the parts of every pair lie in a shared-prompt `PackedBatch` (see its docstring).

    G is the number of pairs (groups), K the number of keys the rejected part attends to.
    Everything a backend needs is here, computed on the host at collation, so that no
    attention layer has to read a device tensor back.
    """

    rejected_start: int
    """Stream offset where the rejected part begins (a Python int): every group's prompt and
    chosen tokens lie before it, every group's rejected tokens (then the padding) after it."""
    rejected_cu_seqlens: torch.Tensor
    """int32 [G + 1] (or [G + 2] with padding): offsets of each group's rejected tokens, then
    of the padding, relative to `rejected_start` (the queries of the second attention call)."""
    key_index: torch.Tensor
    """int64 [K]: stream positions of the keys the rejected part attends to, group by group:
    the group's prompt, then its rejected tokens (then the padding, attending to itself)."""
    key_cu_seqlens: torch.Tensor
    """int32 [G + 1] (or [G + 2]): offsets of each group's keys in `key_index`."""
    token_group: torch.Tensor
    """int32 [T]: the group of each stream position (G for the padding)."""
    token_branch: torch.Tensor
    """int8 [T]: 0 for a prompt (or padding) token, 1 chosen, 2 rejected. A query may see a
    key of its group only if the key is a prompt token or on the query's own branch."""


@dataclass(kw_only=True)
class PackedBatch:
    """One micro-batch: sequences concatenated into a single token stream, no padding between.

    Sequence order: for paired data, pair `p` owns sequences `2p` (chosen) and `2p + 1`
    (rejected), so both sequences of a pair are always in the same batch. For unpaired data,
    sequence `p` is example `p`. S is the number of real sequences, P the number of examples,
    T the stream length (including optional tail padding), M the number of completion targets.

    Completion targets: the token at stream position `j` (a completion token that counts in the
    loss) is predicted by the hidden state at position `j - 1`, which always lies in the same
    sequence (every sequence starts with at least one prompt token). `target_positions` holds
    those `j - 1`, `target_ids` the tokens `input_ids[j]`, grouped by sequence in order:
    sequence `s` owns targets `target_cu[s]:target_cu[s + 1]`.

    Padding (optional, to make T a multiple of some number): the padded tail is one extra
    segment at the end of `cu_seqlens` (its positions restart at 0), so `cu_seqlens` has
    S + 2 entries instead of S + 1; it owns no targets and is counted nowhere else.

    Shared-prompt form (`shared_prompt` set; paired data only): each pair's prompt is in the
    stream once, as a group [prompt, chosen, rejected] whose rejected tokens attend to the
    prompt and to themselves, never to the chosen tokens, with positions continuing from the
    prompt's end (so both completions see exactly what they would see unshared). The stream
    holds every group's prompt + chosen tokens first (group order), then every group's
    rejected tokens, then the padding:

        [P0 C0][P1 C1] ... | [R0][R1] ... | [padding]
        positions: P 0..p-1, C p..p+c-1, R p..p+r-1

    `cu_seqlens` keeps S (+ 1) segments in stream order: the G prompt + chosen segments, then
    the G rejected segments (then the padding), so the first part is an ordinary packed
    stream and the attention backends read both parts as slices; only the prompt keys are
    gathered for the rejected queries (`SharedPromptLayout.key_index`). Sequences, targets
    and `target_cu` are as in the plain form, except that the first rejected target of a pair
    is predicted from its prompt's last position, which is not `j - 1`: `target_positions`
    is explicit, so no token is duplicated. `max_seqlen` is the longest prompt + completion
    (or padding), the longest sequence any position attends within.
    """

    input_ids: torch.Tensor
    """int64 [T]"""
    position_ids: torch.Tensor
    """int64 [T], restarting at 0 for each sequence."""
    cu_seqlens: torch.Tensor
    """int32 [S + 1] (or [S + 2] with padding): sequence start offsets into the stream, then T."""
    max_seqlen: int
    """Longest segment in `cu_seqlens` (a Python int: read without a device sync)."""
    target_positions: torch.Tensor
    """int64 [M]: stream positions whose hidden state predicts a completion token."""
    target_ids: torch.Tensor
    """int64 [M]: the completion tokens predicted there."""
    target_cu: torch.Tensor
    """int32 [S + 1]: offsets of each sequence's targets in `target_positions` / `target_ids`."""
    seq_pair: torch.Tensor
    """int64 [S]: index of the example (pair) each sequence belongs to, in [0, P)."""
    seq_role: torch.Tensor
    """int8 [S]: a `Role` per sequence."""
    seq_label: torch.Tensor
    """bool [S]: for UNPAIRED sequences, True if desirable; False for paired sequences."""
    example_ids: list[str]
    """[P] stable example ids, in pair order."""
    num_padding: int = 0
    """Tokens of tail padding in the stream (0 if none)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (e.g. planner statistics); never read by the model."""
    shared_prompt: SharedPromptLayout | None = None
    """The shared-prompt form's layout, or None for the plain form (see above)."""

    @property
    def num_sequences(self) -> int:
        return self.seq_role.shape[0]

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the stream."""
        return self.input_ids.shape[0] - self.num_padding

    @property
    def completion_lengths(self) -> torch.Tensor:
        """int [S]: completion tokens counted in the loss, per sequence."""
        return self.target_cu[1:] - self.target_cu[:-1]

    def _map_tensors(self, fn) -> PackedBatch:
        return _map_tensor_fields(self, fn)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Every tensor moved to `device` (use `non_blocking=True` from pinned memory)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Every tensor in pinned host memory (called by DataLoader with pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())


def _map_tensor_fields(obj, fn):
    """A copy of dataclass `obj` with `fn` applied to its tensor fields (and to those of a
    nested `SharedPromptLayout`)."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif isinstance(value, SharedPromptLayout):
            changes[f.name] = _map_tensor_fields(value, fn)
    return dataclasses.replace(obj, **changes)
