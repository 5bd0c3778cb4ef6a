"""`TrainConfig`: every setting of a training run, flat, with TRL's key names where TRL has one.

    config = TrainConfig.from_yaml("dpo.yaml", overrides={"beta": 0.2})
    config = TrainConfig(model="path/to/model", data="prefs.jsonl", output_dir="runs/a")

A YAML file maps onto the fields one to one; an unknown key is an error naming the closest
valid key, a bad value names the key, the value and what is allowed. Loss parameters
(`label_smoothing`, `gamma`, `tau`, ... : the keyword parameters of the registered losses) are
accepted as top-level keys too and land in `loss_params`. The resolved config is written to
`output_dir/config.yaml` and into every checkpoint.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import inspect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

TOKENIZATION_FIELDS = (
    "max_length",
    "max_prompt_length",
    "prompt_truncation",
    "loss_on",
    "add_eos",
    "text_as_chat",
)
"""Keys that change token ids: fingerprinted, fixed across a resume, and the options that
`fastdpo train` and `fastdpo precompute-ref` share (same names, same defaults)."""


class ConfigError(ValueError):
    """A config key or value a run cannot use; the message names the key and what to do."""


# TRL / HF keys whose meaning differs in fastdpo: where the user should look instead.
_TRL_KEYS = {
    "loss_type": "loss",
    "per_device_train_batch_size": "pairs_per_step (global pairs per optimizer step)",
    "gradient_accumulation_steps": "pairs_per_step and max_tokens_per_batch (micro-batches are "
    "accumulated until pairs_per_step is reached)",
    "precompute_ref_log_probs": "reference (the reference is always precomputed into a cache)",
    "padding_free": "nothing (fastdpo always packs without padding)",
    "bf16": "dtype",
    "fp16": "dtype",
    "model_name_or_path": "model",
    "ref_model_name_or_path": "ref_model",
}


_SCHEDULERS_NEEDING_ARGS = frozenset(
    {
        "reduce_lr_on_plateau",
        "greedy",
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "warmup_stable_decay",
    }
)
"""transformers schedulers that need scheduler kwargs or eval metrics in step()."""

_TRAINER_OWNED_PARAMS = {
    "bco_state": "it carries BCO's running reward mean across steps",
    "nll_denominator": "the step's chosen tokens, so accumulation keeps the token mean",
}
"""Loss parameters the trainer computes; a config that sets them is refused."""


@dataclass(kw_only=True)
class TrainConfig:
    """One DPO training run. Field names follow TRL's `DPOConfig` / HF `TrainingArguments`."""

    # -- what to train on ------------------------------------------------------------------
    model: str
    """Policy to train: a local folder or a Hugging Face Hub id."""
    tokenizer: str | None = None
    """Tokenizer folder or Hub id (default: `model`)."""
    ref_model: str | None = None
    """Reference model for the log-prob cache (default: `model`)."""
    trust_remote_code: bool = False
    """Allow model code from the model folder / Hub (off unless asked)."""
    data: Any = None
    """Training preference data: a file, folder, glob or Hub name (Python: also a list of rows)."""
    data_split: str = "train"
    """Split of `data` to read when it has several."""
    eval_data: Any = None
    """Held-out preference data (optional; see also `eval_fraction`)."""
    eval_fraction: float = 0.0
    """Without `eval_data`: this fraction of `data` is held out for evaluation, chosen by `seed`."""
    on_bad_row: str = "error"
    """A row that cannot be used: "error" (stop, naming file and row) or "skip" (counted)."""
    output_dir: str = "runs/fastdpo"
    """Run directory: config, metrics, checkpoints, final model."""

    # -- the loss ----------------------------------------------------------------------------
    loss: Any = "sigmoid"
    """A registered loss name, or a mapping name -> weight (RPO: {sigmoid: 1.0, sft: 1.0})."""
    beta: float = 0.1
    """The losses' temperature / KL strength (> 0)."""
    loss_params: dict[str, Any] = field(default_factory=dict)
    """Loss parameters by registry name (label_smoothing, gamma, tau, ...); also top-level keys."""

    # -- tokenization (same names and defaults as `fastdpo precompute-ref`) ------------------
    max_length: int = 1024
    """Most tokens per sequence (prompt + one completion)."""
    max_prompt_length: int | None = None
    """Cut longer prompts to this many tokens (null: never cut prompts)."""
    prompt_truncation: str = "left"
    """Which end of a too-long prompt is kept: "left" keeps its end, "right" its start."""
    loss_on: str = "final_turn"
    """Multi-turn chats: "final_turn" or "all_assistant_turns" count in the loss."""
    add_eos: bool = True
    """Append EOS to plain-text completions that lack it."""
    text_as_chat: bool = False
    """Run plain-text rows through the chat template (one user turn, one assistant turn)."""
    dataset_num_proc: int = 1
    """Processes that tokenize the data."""

    # -- batches and schedule ------------------------------------------------------------
    max_tokens_per_batch: int = 4096
    """Micro-batch token budget (packed, no padding); a pair longer than this is an error."""
    pairs_per_step: int = 8
    """Global pairs per optimizer step; micro-batches are accumulated until it is reached."""
    share_prompt: str = "auto"
    """auto, true or false: pack each pair as [prompt, chosen, rejected] with its prompt run
    once (same log-probs, fewer tokens); auto: on when prompts are >= 10% of the tokens."""
    max_steps: int | None = None
    """Optimizer steps to run; when set it wins over num_train_epochs (epochs repeat)."""
    num_train_epochs: float = 1.0
    """Passes over the training data (fractions allowed) when max_steps is not set."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_scheduler_type: str = "linear"
    """transformers' get_scheduler name: constant, constant_with_warmup, linear, cosine, ..."""
    warmup_steps: int = 0
    """Linear warm-up steps (wins over warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (null: no clipping)."""
    seed: int = 42
    """Seed of model init extras, data order and held-out split."""

    # -- hardware and precision ----------------------------------------------------------
    dtype: str = "auto"
    """auto (fp32 weights + bf16 autocast on CUDA, fp32 on the CPU), float32 or bfloat16."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    attention: str = "auto"
    """Packed attention backend: auto, flash, torch, flex, sdpa."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward (less memory, ~30% more compute)."""

    # -- many processes (torchrun) -------------------------------------------------------
    strategy: str = "auto"
    """Under torchrun: ddp (a full replica per process), fsdp2 (parameters, gradients and
    optimizer state sharded per decoder layer) or auto (fsdp2 when a replica with its AdamW
    state would not fit in half of one device)."""
    offload: bool = False
    """fsdp2 on CUDA: keep parameters, gradients and optimizer state in CPU memory."""
    distributed_timeout: int = 600
    """Seconds a collective may wait for the other processes before the run fails."""

    # -- the reference -----------------------------------------------------------------
    reference: str = "auto"
    """auto (build the cache in the run directory or reuse a matching one), a cache folder,
    or none (reference-free losses only)."""
    reference_max_tokens_per_batch: int | None = None
    """Token budget of the reference pass (default: 4 x max_tokens_per_batch)."""

    # -- logging, evaluation, checkpoints ------------------------------------------------
    logging_steps: int = 10
    """Write metrics every this many steps (averaged over them)."""
    log_head_metrics: bool = False
    """Also log TRL's `entropy`, `logits/chosen`, `logits/rejected` and `mean_token_accuracy`
    (TRL logs them always). They come from per-token statistics of the fused head, which the head
    computes only when asked: +19% forward+backward time for the torch head (2-core CPU)."""
    eval_steps: int | None = None
    """Evaluate every this many steps (null: only at the end, when there is eval data)."""
    save_steps: int | None = None
    """Save a checkpoint every this many steps (null: only at the end and on a signal)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first; null: keep all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, or "latest" (newest in output_dir), to continue a run."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run's checkpoints or metrics (they are
    deleted; its reference cache is kept for reuse)."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str = "auto"
    """Extra log sinks: auto (TensorBoard when installed), tensorboard or none."""

    # -- LoRA (peft) ----------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: Any = "all-linear"
    """Modules that get adapters: "all-linear" (every linear layer but the head) or a list."""
    save_merged: bool = False
    """With LoRA: also write the merged full model to output_dir/final/merged."""

    def __post_init__(self) -> None:
        self.validate()

    # -- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from flat keys (YAML's); loss parameters may be top-level keys."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config is a mapping of keys to values, got {type(values)}")
        names = {f.name for f in dataclasses.fields(cls)}
        known_params = loss_parameter_names()
        kwargs: dict[str, Any] = {}
        params = dict(values.get("loss_params") or {})
        for key, value in values.items():
            if key == "loss_params":
                continue
            if key in names:
                kwargs[key] = value
            elif key in known_params:
                params[key] = value
            else:
                raise ConfigError(unknown_key_message(key))
        kwargs["loss_params"] = params
        missing = [name for name in ("model",) if kwargs.get(name) is None]
        if missing:
            raise ConfigError(f"{missing[0]}: required (a model folder or Hub id)")
        return cls(**kwargs)

    @classmethod
    def from_yaml(
        cls, path: str | Path | None, overrides: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """Read `path` (YAML, flat keys) and apply `overrides` (key -> value) on top."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                raise ConfigError(f"{path} is not valid YAML: {error}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
            values.update(loaded)
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON/YAML-friendly."""
        return dataclasses.asdict(self)

    def saved_dict(self) -> dict[str, Any]:
        """`to_dict()` as written to YAML: data given as Python objects is described, not kept."""
        data = self.to_dict()
        for key in ("data", "eval_data"):
            if not isinstance(data[key], (str, type(None))):
                data[key] = f"<{type(data[key]).__name__} given in Python>"
        return data

    def save_yaml(self, path: str | Path) -> None:
        """Write the config as YAML (atomically: a temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.saved_dict(), sort_keys=False))
        tmp.replace(path)

    def resolved(self) -> TrainConfig:
        """A copy with the defaults that depend on other keys filled in (tokenizer, ref_model)."""
        return dataclasses.replace(
            self, tokenizer=self.tokenizer_path, ref_model=self.ref_model_path
        )

    # -- derived values --------------------------------------------------------------------

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def ref_model_path(self) -> str:
        return self.ref_model or self.model

    def tokenization_kwargs(self) -> dict[str, Any]:
        """The `tokenize_pairs` keyword arguments that change token ids (also fingerprinted)."""
        return {name: getattr(self, name) for name in TOKENIZATION_FIELDS}

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad key, its value and what is allowed."""
        if isinstance(self.share_prompt, bool):  # YAML reads true / false as booleans
            self.share_prompt = "true" if self.share_prompt else "false"
        _choice(self, "share_prompt", ("auto", "true", "false"))
        _check_types(self)
        _positive(self, "max_length", "max_tokens_per_batch", "pairs_per_step", "logging_steps")
        _positive(self, "dataset_num_proc")
        _positive_or_none(self, "max_prompt_length", "max_steps", "eval_steps", "save_steps")
        _positive_or_none(self, "save_total_limit", "reference_max_tokens_per_batch")
        _choice(self, "on_bad_row", ("error", "skip"))
        _choice(self, "prompt_truncation", ("left", "right"))
        _choice(self, "loss_on", ("final_turn", "all_assistant_turns"))
        _choice(self, "dtype", ("auto", "float32", "bfloat16"))
        _choice(self, "attention", ("auto", "flash", "torch", "flex", "sdpa"))
        _choice(self, "report_to", ("auto", "tensorboard", "none"))
        _choice(self, "strategy", ("auto", "ddp", "fsdp2"))
        _positive(self, "distributed_timeout")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: got {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)) or self.beta <= 0:
            raise ConfigError(f"beta: got {self.beta!r}; allowed: a finite number > 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: got {self.eval_fraction}; allowed: 0 <= x < 1")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise ConfigError("eval_fraction: set it or eval_data, not both")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio: got {self.warmup_ratio}; allowed: 0 <= x <= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: got {self.warmup_steps}; allowed: >= 0")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs: got {self.num_train_epochs}; allowed: > 0")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate: got {self.learning_rate}; allowed: >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(
                f"max_grad_norm: got {self.max_grad_norm}; allowed: > 0, or null for no clipping"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: got {getattr(self, name)}; allowed: 0 <= x < 1")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r: got {self.lora_r}; allowed: 0 (full fine-tuning) or > 0")
        if self.max_length < 2:
            raise ConfigError(f"max_length: got {self.max_length}; allowed: >= 2")
        if self.data is None:
            raise ConfigError("data: required (a preference data file, folder or Hub name)")
        self._validate_loss()
        self._validate_scheduler()

    def _validate_loss(self) -> None:
        from fastdpo.losses import LOSSES

        names = [self.loss] if isinstance(self.loss, str) else self.loss
        if not isinstance(names, Mapping) and not isinstance(self.loss, str):
            raise ConfigError(
                f"loss: got {self.loss!r}; allowed: a loss name or a mapping name -> weight"
            )
        for name in names:
            if name not in LOSSES:
                close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"loss: unknown loss {name!r}{hint}; allowed: {', '.join(sorted(LOSSES))}"
                )
        specs = [LOSSES[name] for name in names]
        if any(not spec.paired for spec in specs):
            raise ConfigError(
                f"loss: {self.loss!r} trains on unpaired (KTO) data, which the trainer does not "
                "run yet; use the library (fastdpo.preference_loss with loss='kto') in your loop"
            )
        from fastdpo.losses import LOSS_OPTIONS, LossOptions

        accepted = {p for spec in specs for p in spec.params}
        for key in self.loss_params:
            if key not in accepted and key not in LOSS_OPTIONS:
                raise ConfigError(
                    f"{key}: not a parameter of loss {self.loss!r} (its parameters: "
                    f"{sorted(accepted) or 'none'}; TRL's options: {', '.join(LOSS_OPTIONS)})"
                )
        try:  # TRL's loss options: values, and whether they apply to these losses
            options = {k: v for k, v in self.loss_params.items() if k in LOSS_OPTIONS}
            LossOptions(**options).check(specs)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for key, why in _TRAINER_OWNED_PARAMS.items():
            if key in self.loss_params:
                raise ConfigError(f"{key}: set by the trainer itself ({why})")
        needs_reference = any(spec.needs_reference for spec in specs)
        if self.reference == "none" and needs_reference:
            raise ConfigError(
                f"reference: 'none' is allowed only for reference-free losses (simpo, orpo, "
                f"sft); loss {self.loss!r} needs the reference model's log-probs"
            )

    def _validate_scheduler(self) -> None:
        from transformers import SchedulerType

        allowed = [t.value for t in SchedulerType if t.value not in _SCHEDULERS_NEEDING_ARGS]
        if self.lr_scheduler_type in _SCHEDULERS_NEEDING_ARGS:
            raise ConfigError(
                f"lr_scheduler_type: {self.lr_scheduler_type!r} needs arguments or metrics the "
                f"trainer does not pass; allowed: {', '.join(allowed)}"
            )
        if self.lr_scheduler_type not in allowed:
            raise ConfigError(
                f"lr_scheduler_type: got {self.lr_scheduler_type!r}; allowed: {', '.join(allowed)}"
            )

    @property
    def needs_reference(self) -> bool:
        from fastdpo.losses import LOSSES

        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        return any(LOSSES[name].needs_reference for name in names)


# ------------------------------------------------------------------------------------------------
# Field documentation and checks


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), for --help."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def loss_parameter_names() -> set[str]:
    """Every keyword parameter of a registered loss, and TRL's loss options (f_divergence_type,
    ld_alpha, ...): allowed as top-level config keys."""
    from fastdpo.losses import LOSS_OPTIONS, LOSSES

    return {p for spec in LOSSES.values() for p in spec.params} | set(LOSS_OPTIONS)


def unknown_key_message(key: str) -> str:
    """'unknown key ...' naming the closest valid key, or TRL's equivalent."""
    if key in _TRL_KEYS:
        return f"unknown key {key!r}: fastdpo's equivalent is {_TRL_KEYS[key]}"
    valid = [f.name for f in dataclasses.fields(TrainConfig)] + sorted(loss_parameter_names())
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (`fastdpo train --help` lists every key)"


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(config: TrainConfig) -> None:
    """Values of annotated scalar fields have the annotated type (bools are not ints).

    A float field given a numeric string takes its value: YAML 1.1 (PyYAML) reads `5e-7`
    (no dot) as a string, the usual way learning rates are written."""
    for f in dataclasses.fields(config):
        kinds = [k.strip() for k in str(f.type).split("|")]
        if "Any" in kinds or f.name == "loss_params":
            continue
        value = getattr(config, f.name)
        if "float" in kinds and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a number: the type check names it
                value = float(value)
                setattr(config, f.name, value)
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _SCALARS.get(k, ()))
        if not allowed:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            names = " or ".join(k if k != "None" else "null" for k in kinds)
            raise ConfigError(f"{f.name}: got {value!r} ({type(value).__name__}); allowed: {names}")
    if not isinstance(config.loss_params, dict):
        raise ConfigError(f"loss_params: got {config.loss_params!r}; allowed: a mapping")


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"{name}: got {value}; allowed: an integer >= 1")


def _positive_or_none(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}: got {value}; allowed: an integer >= 1, or null")


def _choice(config: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"{name}: got {value!r}; allowed: {', '.join(allowed)}")
