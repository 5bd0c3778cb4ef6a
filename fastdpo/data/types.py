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
        n = len(self.prompt_ids) + len(self.chosen_ids)
        if self.rejected_ids is not None:
            n += len(self.prompt_ids) + len(self.rejected_ids)
        return n


class Role(enum.IntEnum):
    """What a packed sequence is, stored per sequence in `PackedBatch.seq_role`."""

    CHOSEN = 0
    REJECTED = 1
    UNPAIRED = 2


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
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """Every tensor moved to `device` (use `non_blocking=True` from pinned memory)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Every tensor in pinned host memory (called by DataLoader with pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())
