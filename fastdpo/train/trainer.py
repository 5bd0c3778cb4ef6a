"""`Trainer`: a DPO run from a `TrainConfig`, read top to bottom as the steps it performs.

    trainer = Trainer(TrainConfig.from_yaml("dpo.yaml"))
    result = trainer.train()       # checkpoints, metrics.jsonl, curves.png, final/

Set-up order keeps one model in memory at a time: tokenizer and data first, then the
reference cache (the reference model is loaded for the pass and freed), then the policy and
its optimizer. Each step: the step's pairs (a pure function of seed and epoch) packed into
micro-batches, forward + backward of each (`step.train_step`), gradient clipping, a finiteness
check (the one host sync per step), AdamW, the schedule. SIGINT / SIGTERM finish the current
step, save a checkpoint and return.

Under torchrun (`fastdpo.train.distributed`) every process runs this same loop on its share
of each step's pairs: the policy is wrapped for DDP or FSDP2, the step's loss and metrics are
summed over ranks (each rank's are already weighted by its share of the global pairs), and
only rank 0 writes logs and files; checkpoints are sharded and written by every rank.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdpo.memory import peak_rss_bytes
from fastdpo.train.checkpoint import (
    TrainerState,
    check_resumable,
    load_training_state,
    prepare_output_dir,
    resolve_checkpoint,
    save_checkpoint,
    save_final_model,
)
from fastdpo.train.config import ConfigError, TrainConfig
from fastdpo.train.data import (
    StepPlan,
    eval_batches,
    load_run_data,
    micro_batches,
    rank_shares,
    total_steps,
    worst_rank_share,
)
from fastdpo.train.distributed import Parallel, bare_model, clip_grad_norm
from fastdpo.train.metrics_log import LogWindow, MetricsLog
from fastdpo.train.model_setup import (
    autocast_context,
    count_parameters,
    load_causal_lm,
    load_policy,
    reference_dtype,
    resolve_device,
)
from fastdpo.train.optim import build_optimizer, build_scheduler
from fastdpo.train.reference_cache import prepare_reference
from fastdpo.train.step import _STATE_METRICS, LossSettings, evaluate_batches, train_step

logger = logging.getLogger("fastdpo.train")

# Dense bf16 peak FLOP/s by device-name substring, for `mfu` (datasheet numbers).
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm was NaN/inf; the run stopped before applying it."""


@dataclass(kw_only=True)
class TrainResult:
    """What `Trainer.train()` returns."""

    global_step: int
    final_dir: Path | None
    """output_dir/final (None if the run was interrupted before the end)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every row written to metrics.jsonl (training and eval), in order."""
    interrupted: bool = False
    """True if a signal stopped the run (a checkpoint was saved)."""
    stop_signal: int | None = None
    """The signal that stopped it (SIGINT, SIGTERM), if one did."""
    last_checkpoint: Path | None = None


class Trainer:
    """Trains `config.model` with a preference loss; see the module docstring."""

    def __init__(
        self, config: TrainConfig, *, rank: int | None = None, world_size: int | None = None
    ):
        """`rank` / `world_size`: checked against the process group (torchrun's environment,
        or one the caller initialized); leave them out to take its values."""
        self.config = config
        self.parallel = Parallel.from_environment(config)
        for name, given in (("rank", rank), ("world_size", world_size)):
            actual = getattr(self.parallel, name)
            if given is not None and given != actual:
                raise ValueError(
                    f"Trainer({name}={given}) but the process group says {actual}: launch with "
                    "torchrun (it sets RANK and WORLD_SIZE) and leave rank / world_size out"
                )
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        self.output_dir = Path(config.output_dir)
        self.is_main = self.parallel.is_main
        self.device = resolve_device(config.device)
        from transformers import AutoTokenizer, set_seed

        set_seed(config.seed)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer_path, trust_remote_code=config.trust_remote_code
            )
        except OSError as error:
            key = "tokenizer" if config.tokenizer else "model"
            raise ConfigError(
                f"{key}: cannot load a tokenizer from {config.tokenizer_path!r}: "
                f"{str(error).splitlines()[0]}"
            ) from None
        self.checkpoint = (
            resolve_checkpoint(config.resume_from_checkpoint, self.output_dir)
            if config.resume_from_checkpoint
            else None
        )
        if self.checkpoint is not None:
            check_resumable(config, self.checkpoint)
        elif self.is_main:
            prepare_output_dir(self.output_dir, overwrite=config.overwrite_output_dir)
        self.parallel.barrier()  # nobody writes into output_dir before it is prepared
        self.data = load_run_data(config, self.tokenizer)
        self.reference = prepare_reference(
            config,
            self.tokenizer,
            {"train": self.data.train, "eval": self.data.eval},
            device=self.device,
            load_model=self._load_reference_model,
            autocast=self._autocast,
            share_prompt=self.data.share_prompt,
        )
        # Several processes: load on the CPU, then replicate (DDP) or shard onto the device
        # (FSDP2 moves only each rank's shards there).
        cpu = torch.device("cpu")
        model = load_policy(config, cpu if self.parallel.distributed else self.device)
        trainable, total = count_parameters(model)
        self._parameters = total  # for mfu
        logger.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")
        if self.parallel.choose_strategy(config, model, self.device) == "ddp":
            model = model.to(self.device)
        # forward_model is what the step calls (the model, or its DDP / FSDP2 wrapper); model is
        # the causal LM inside (parameters, optimizer, saving).
        self.forward_model = self.parallel.wrap(model, config, self.device)
        self.model = bare_model(self.forward_model)
        self.plan = StepPlan(
            num_pairs=len(self.data.train), pairs_per_step=config.pairs_per_step, seed=config.seed
        )
        self.total_steps = total_steps(config, self.plan)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.state = TrainerState(
            total_steps=self.total_steps, reference_caches=self.reference.paths()
        )
        self.loss_settings = LossSettings(
            loss=config.loss,
            beta=config.beta,
            params=dict(config.loss_params),
            head_metrics=config.log_head_metrics,
        )
        # Tokens each pair takes in the run's packed form (rank balance); with sharing, the
        # prompt tokens it does not run a second time (the logged `prompt_tokens_saved`).
        shared = self.data.share_prompt
        self._sizes = [p.tokens_in_stream(shared) for p in self.data.train]
        self._prompt_saved = [p.num_tokens - p.tokens_in_stream(shared) for p in self.data.train]
        self._chosen_tokens = [
            len(p.chosen_ids) if p.chosen_loss_mask is None else sum(p.chosen_loss_mask)
            for p in self.data.train
        ]
        self._stop_signal: int | None = None
        self.log = MetricsLog(self.output_dir, enabled=self.is_main, report_to=config.report_to)
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.resolved().save_yaml(self.output_dir / "config.yaml")

    # -- set-up helpers ----------------------------------------------------------------------

    def _load_reference_model(self, path: str):
        dtype = reference_dtype(self.config)
        return load_causal_lm(path, self.config, dtype, self.device).eval()

    def _restore(self, checkpoint: Path) -> None:
        self.state = load_training_state(
            checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if self.state.total_steps != self.total_steps:
            logger.warning(
                "resuming a run planned for %d steps with %d steps",
                self.state.total_steps,
                self.total_steps,
            )
            self.state.total_steps = self.total_steps
        if self.state.bco_mean is not None:
            from fastdpo.losses import RunningMean

            self.loss_settings.bco_state = RunningMean(
                mean=torch.tensor(self.state.bco_mean, dtype=torch.float64, device=self.device),
                count=torch.tensor(self.state.bco_count, dtype=torch.float64, device=self.device),
            )
        self.state.reference_caches = self.reference.paths()
        self.log.resume(self.state.global_step)
        logger.info("resumed from %s at step %d", checkpoint, self.state.global_step)

    def _autocast(self):
        return autocast_context(self.config, self.device)

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run until `total_steps` (or a signal); returns where things were written."""
        from tqdm.auto import tqdm

        config = self.config
        window = LogWindow.from_state(self.state.window)
        last_checkpoint = self.checkpoint
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.global_step,
            disable=not (config.progress and self.is_main),
            desc="training",
            unit="step",
        )
        previous_handlers = self._install_signal_handlers()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.parallel.failures_end_every_rank():
            return self._train(window, last_checkpoint, bar, previous_handlers)

    def _train(self, window, last_checkpoint, bar, previous_handlers) -> TrainResult:
        config = self.config
        try:
            while self.state.global_step < self.total_steps:
                out, capacity, stop_requested = self._run_step()
                grad_norm = self._clip_gradients()
                self._check_finite(out, grad_norm, last_checkpoint)
                learning_rate = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                self.state.epoch = self.state.global_step / self.plan.steps_per_epoch
                bar.update(1)

                values = {"loss": out.loss, "grad_norm": grad_norm, **out.metrics}
                window.add(values, learning_rate, out.tokens, out.pairs, capacity)
                step = self.state.global_step
                if step % config.logging_steps == 0 or step == self.total_steps:
                    row = self._log_row(window)
                    self.log.write(row)
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}",
                        acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                    )
                    window = LogWindow()
                with window.paused():  # evaluation and saving are not training throughput
                    if (
                        config.eval_steps
                        and step % config.eval_steps == 0
                        and step < self.total_steps
                    ):
                        self._log_eval()
                    stopping = stop_requested and step < self.total_steps
                    if stopping or (config.save_steps and step % config.save_steps == 0):
                        self.state.window = window.to_state()
                        last_checkpoint = self._save()
                if stopping:
                    logger.warning(
                        "stopped by signal %s after step %d; checkpoint %s (resume with "
                        "resume_from_checkpoint: latest)",
                        self._stop_signal or "(on another rank)",
                        step,
                        last_checkpoint,
                    )
                    return TrainResult(
                        global_step=step,
                        final_dir=None,
                        history=list(self.log.rows),
                        interrupted=True,
                        stop_signal=self._stop_signal or signal.SIGTERM,  # another rank's
                        last_checkpoint=last_checkpoint,
                    )
        finally:
            bar.close()
            self._restore_signal_handlers(previous_handlers)
        if self.data.eval:
            self._log_eval()
        self.state.window = None
        if not (config.save_steps and self.state.global_step % config.save_steps == 0):
            last_checkpoint = self._save()
        final_dir = self._save_final()
        self.log.plot()
        self.log.close()
        self.parallel.barrier()
        return TrainResult(
            global_step=self.state.global_step,
            final_dir=final_dir,
            history=list(self.log.rows),
            last_checkpoint=last_checkpoint,
        )

    def _run_step(self):
        """Forward + backward of the next step; returns (StepOutput with global values, token
        capacity of the step's micro-batches, whether any rank was asked to stop)."""
        config = self.config
        epoch, step_in_epoch = self.plan.position(self.state.global_step)
        pairs = self.plan.step_pairs(epoch, step_in_epoch)
        shares = rank_shares(pairs, self._sizes, self.world_size)
        mine = shares[self.rank]

        def pack(indices):
            return list(
                micro_batches(
                    self.data.train,
                    indices,
                    max_tokens_per_batch=config.max_tokens_per_batch,
                    seed=config.seed,
                    epoch=epoch,
                    share_prompt=self.data.share_prompt,
                )
            )

        batches = pack(mine)
        fillers = []
        missing = self.parallel.micro_batch_count(len(batches)) - len(batches)
        if missing:  # the smallest pair at hand, with weight 0 (see train_step)
            smallest = min(mine or pairs, key=lambda i: (self._sizes[i], i))
            fillers = pack([smallest]) * missing
        out = train_step(
            self.forward_model,
            batches,
            step_pairs=len(pairs),
            step_chosen_tokens=sum(self._chosen_tokens[i] for i in pairs),
            reference=self.reference.train,
            settings=self.loss_settings,
            device=self.device,
            autocast=self._autocast,
            filler_batches=fillers,
            gradient_sync=lambda is_last: self.parallel.gradient_sync(self.forward_model, is_last),
        )
        capacity = len(batches) * config.max_tokens_per_batch
        saved = float(sum(self._prompt_saved[i] for i in pairs))  # the global step's, host-side
        if not self.parallel.distributed:
            out.metrics["prompt_tokens_saved"] = saved
            return out, capacity, self._stop_signal is not None
        # One all-reduce: loss and metrics (pair-share weighted, so the sum is the global
        # mean), counts, and the stop flag. State metrics (BCO's running mean) stay local.
        local = {k: v for k, v in sorted(out.metrics.items()) if k not in _STATE_METRICS}
        summed = self.parallel.sum_over_ranks(
            {
                "loss": out.loss,
                **local,
                "pairs": out.pairs,
                "tokens": out.tokens,
                "capacity": capacity,
                "stop": self._stop_signal is not None,
            }
        )
        out.loss = summed.pop("loss")
        counts = torch.stack([summed.pop(k) for k in ("pairs", "tokens", "capacity", "stop")])
        pairs_total, tokens_total, capacity, stop = (int(v) for v in counts.tolist())
        out.metrics.update(summed)
        out.metrics["worst_rank_token_share"] = worst_rank_share(shares, self._sizes)
        out.metrics["prompt_tokens_saved"] = saved
        out.pairs, out.tokens = pairs_total, tokens_total
        return out, capacity, stop > 0

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (clipped to max_grad_norm when set); a device scalar."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return clip_grad_norm(params, self.config.max_grad_norm)

    def _check_finite(self, out, grad_norm: torch.Tensor, last_checkpoint: Path | None) -> None:
        """Stop before a non-finite loss or gradient reaches the weights (one host sync)."""
        if bool(torch.isfinite(out.loss) & torch.isfinite(grad_norm)):
            return
        bad = [
            ids
            for ids, loss in zip(out.micro_batches, out.micro_losses, strict=True)
            if not bool(torch.isfinite(loss))
        ]
        what = "loss" if bad else "gradient norm"
        offenders = bad or out.micro_batches
        listed = [i for ids in offenders for i in ids][:10]
        checkpoint = str(last_checkpoint) if last_checkpoint else "none saved yet"
        raise NonFiniteLossError(
            f"step {self.state.global_step + 1}: non-finite {what} "
            f"(loss {float(out.loss)}, grad norm {float(grad_norm)}); example ids of the "
            f"offending micro-batch(es): {listed}; last good checkpoint: {checkpoint}. Lower "
            "learning_rate, set max_grad_norm, or inspect those examples"
        )

    # -- metrics -----------------------------------------------------------------------------

    def _log_row(self, window: LogWindow) -> dict[str, Any]:
        """Means over the logging window (host syncs here, once per logging step).

        Tokens (tokens_per_second, packing_efficiency, mfu) are the real tokens of the packed
        streams, the tokens the model ran: with share_prompt on, each pair's prompt counts
        once; `prompt_tokens_saved` (per step) is what sharing left out."""
        elapsed = window.seconds()
        row: dict[str, Any] = {
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            **window.means(),
            "tokens_per_second": window.tokens / elapsed if elapsed > 0 else None,
            "pairs_per_second": window.pairs / elapsed if elapsed > 0 else None,
            "packing_efficiency": window.tokens / window.capacity if window.capacity else None,
            "peak_memory_mb": self.parallel.max_over_ranks(self._peak_memory_mb()),
        }
        if self.device.type == "cuda":
            row["mfu"] = self._mfu(window.tokens, elapsed)
        return row

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_bytes() / 2**20

    def _mfu(self, tokens: int, elapsed: float) -> float | None:
        """Model FLOPs utilization: 6 x parameters x tokens / time / the device's bf16 peak."""
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
        if peak is None or elapsed <= 0:
            return None
        return 6 * self._parameters * tokens / elapsed / peak

    def evaluate(self) -> dict[str, float]:
        """Loss and reward metrics on the held-out pairs (`eval/` names); {} without them."""
        if not self.data.eval:
            return {}
        batches = eval_batches(
            self.data.eval,
            max_tokens_per_batch=self.config.max_tokens_per_batch,
            share_prompt=self.data.share_prompt,
        )
        # Every rank evaluates every held-out batch (FSDP2 needs the same forwards on all ranks;
        # the metrics come out identical everywhere, with no reduction to get wrong).
        return evaluate_batches(
            self.forward_model,
            batches,
            reference=self.reference.eval,
            settings=self.loss_settings,
            device=self.device,
            autocast=self._autocast,
        )

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.log.write({"step": self.state.global_step, "epoch": self.state.epoch, **metrics})

    # -- saving ------------------------------------------------------------------------------

    def _save(self) -> Path | None:
        state = self.loss_settings.bco_state
        if state is not None:
            self.state.bco_mean, self.state.bco_count = float(state.mean), float(state.count)
        return save_checkpoint(
            self.output_dir,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            config_yaml=(self.output_dir / "config.yaml").read_text() if self.is_main else None,
            save_total_limit=self.config.save_total_limit,
            parallel=self.parallel,
        )

    def _save_final(self) -> Path | None:
        """output_dir/final: the model (LoRA: the adapter; merged on request) and tokenizer."""
        return save_final_model(
            self.output_dir / "final",
            model=self.model,
            tokenizer=self.tokenizer,
            save_merged=bool(self.config.lora_r and self.config.save_merged),
            parallel=self.parallel,
        )

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            logger.warning("signal %d: finishing this step, then saving a checkpoint", signum)

        return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        if previous:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
