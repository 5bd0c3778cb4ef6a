"""Data parallelism for the trainer: PyTorch's own DDP and FSDP2 under `torchrun`.

    torchrun --nproc-per-node 8 -m fastdpo train dpo.yaml        # one machine
    parallel = Parallel.from_environment(config)                  # what Trainer does

`Parallel.from_environment` joins the process group that torchrun's environment describes
(`WORLD_SIZE` > 1; NCCL on CUDA, gloo on the CPU) or uses one the caller already initialized;
a plain `python` run is one process and changes nothing. `strategy` picks how the policy is
replicated: DDP (every rank holds the whole model and its AdamW state; gradients all-reduced)
or FSDP2 (`fully_shard` on every decoder layer and on the root; parameters, gradients and
optimizer state sharded, layers all-gathered for their forward and backward). `auto` takes
FSDP2 when the model with its gradients and AdamW state would not fit in half of one device's
memory, and logs which it picked and why.

`sequence_logps` calls the decoder body and the head separately, so the wrapper's forward
would never run and neither DDP's gradient hooks nor FSDP2's root unshard (embeddings, final
norm, lm_head) would happen. The wrapped module is therefore `PackedForward`, whose forward
*is* `sequence_logps` on the bare model: calling the wrapper (`packed_forward`) runs the
root's pre-forward (FSDP2: the head weight is all-gathered before the fused head op reads it)
and post-backward (FSDP2: resharded, gradients reduce-scattered).

Gradients are summed across ranks, not averaged (each rank's loss is already scaled by its
pairs / the step's global pairs). DDP synchronises only on a step's last micro-batch
(`no_sync` before it); FSDP2 reduce-scatters after every micro-batch, because skipping it
would keep the unsharded fp32 gradients of the whole model on every rank between
micro-batches: the memory FSDP2 is there to save. FSDP2 all-gathers in every forward and
backward, so every rank must run the same number of micro-batches: ranks with fewer run
zero-weight copies of their smallest pair (`micro_batch_count`).

A failure on one rank ends every rank with that rank's error: the failing rank posts its
error to the rendezvous store and tears its process group down, which makes the collectives
the others are blocked in fail at once (instead of at `distributed_timeout`); they read the
posted error and raise `RankFailedError` naming the rank and its message. Tearing down does
not always close the connections (a wrapper holding the group keeps it alive, seen under load
with FSDP2 on gloo: rank 0 stayed blocked until torchrun killed it, without the error), so a
watch thread on every rank also polls the store: when a peer's error is posted and this rank
has not ended with it after `_PEER_GRACE_S`, the thread reports it and ends the process.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastdpo.data.types import PackedBatch
from fastdpo.model import SequenceLogps, sequence_logps, unwrap_model
from fastdpo.train.config import ConfigError, TrainConfig

logger = logging.getLogger("fastdpo.train")

STRATEGIES = ("auto", "ddp", "fsdp2")

FITS_FRACTION = 0.5
"""`strategy: auto` picks DDP while weights + gradients + AdamW state take at most this share
of one device's memory (the rest is for activations, the fused head's tiles, the allocator)."""

_PEER_GRACE_S = 3.0
"""How long the watch thread lets this rank's own code end with a peer's posted error (a
collective failing, `RankFailedError`) before it reports the error and exits the process."""
_WATCH_INTERVAL_S = 0.25

_FAILURE_KEY = "fastdpo/failure"
_SEEN_KEY = "fastdpo/failure-seen"
_FAILURE_GRACE_S = 10.0
"""How long a failing rank waits for the others to read its error before it exits (under
torchrun rank 0's store lives in the agent; without it, in rank 0's process)."""


class RankFailedError(RuntimeError):
    """Another rank failed; the message names it and repeats its error."""


@dataclass(kw_only=True)
class Parallel:
    """This process's place in the run and how the policy is replicated."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    strategy: str = "none"
    """"none" (one process), "ddp" or "fsdp2" (after `choose_strategy`)."""
    store: Any = None
    """The rendezvous store (failure messages travel through it); None in one process."""
    report_peer_failure: Callable[[str], None] | None = None
    """How the watch thread reports a peer's error ("rank R failed: ...") before it ends a
    process stuck in a collective; None: logged as an error."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- joining ------------------------------------------------------------------------------

    @classmethod
    def from_environment(cls, config: TrainConfig) -> Parallel:
        """Join torchrun's process group (or the caller's); one process: `Parallel()`."""
        if dist.is_available() and dist.is_initialized():
            store = _default_store()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            store = _init_process_group(config)
        else:
            return cls()
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
            store=store,
        )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- strategy and wrapping ---------------------------------------------------------------

    def choose_strategy(self, config: TrainConfig, model: nn.Module, device: torch.device) -> str:
        """Set and log `self.strategy` for `config.strategy` (auto: by memory, see module)."""
        if not self.distributed:
            self.strategy = "none"
            if config.strategy == "fsdp2" or config.offload:
                logger.warning("one process: strategy %r has nothing to shard", config.strategy)
            return self.strategy
        needed = training_state_bytes(model)
        budget = device_memory_bytes(device, self.local_world_size)
        if config.offload and config.strategy == "ddp":
            raise ConfigError("offload: needs strategy fsdp2 (or auto); DDP cannot offload")
        if config.strategy != "auto":
            self.strategy = config.strategy
            why = "as configured"
        elif config.offload:
            self.strategy, why = "fsdp2", "offload: true needs FSDP2"
        else:
            fits = needed <= FITS_FRACTION * budget
            self.strategy = "ddp" if fits else "fsdp2"
            why = (
                f"weights + gradients + AdamW state need {needed / 2**30:.2f} GiB per replica, "
                f"{'within' if fits else 'over'} {FITS_FRACTION:.0%} of "
                f"{budget / 2**30:.1f} GiB per {device.type} device"
            )
        if self.strategy == "fsdp2" and config.lora_r:
            raise ConfigError(
                "strategy: fsdp2 with LoRA (lora_r > 0) is not supported yet; use strategy: ddp "
                "(a LoRA run keeps only the adapters' optimizer state)"
            )
        logger.info(
            "%d processes, strategy %s (%s: %s)",
            self.world_size,
            self.strategy,
            config.strategy,
            why,
        )
        return self.strategy

    def wrap(self, model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
        """The module the step calls (through `packed_forward`): `model` itself in one process,
        else a `PackedForward` around it under DDP or FSDP2. Parameters stay reachable (and
        named) through `model`; under FSDP2 they become sharded DTensors, so build the
        optimizer after this."""
        if self.strategy == "none":
            return model
        root = PackedForward(model)
        if self.strategy == "ddp":
            # Rotary tables are equal everywhere: no buffer broadcast before every forward.
            # torch 2.13 renamed the option (the old name warns); 2.11 knows only the old one.
            ddp_args = inspect.signature(nn.parallel.DistributedDataParallel).parameters
            no_buffer_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in ddp_args
                else {"broadcast_buffers": False}
            )
            wrapped = nn.parallel.DistributedDataParallel(
                root, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
            )
            wrapped.register_comm_hook(None, _sum_all_reduce)
            return wrapped
        return _fully_shard(root, model, config, device)

    # -- a step across ranks -----------------------------------------------------------------

    def micro_batch_count(self, count: int) -> int:
        """How many micro-batches this rank must run this step (its own `count` plus fillers).

        DDP: at least one (every rank joins the step's one gradient all-reduce). FSDP2: the
        most any rank has (every forward and backward all-gathers each layer; one small
        all-reduce per step to agree)."""
        if self.strategy == "ddp":
            return max(count, 1)
        if self.strategy == "fsdp2":
            most = torch.tensor([count], dtype=torch.int64)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=_cpu_group())
            return int(most.item())
        return count

    def gradient_sync(self, model: nn.Module, is_last: bool):
        """Context for one micro-batch's forward + backward: DDP skips its all-reduce on all
        but the last (gradients accumulate locally, then the sum is all-reduced)."""
        if self.strategy == "ddp" and not is_last:
            return model.no_sync()
        return contextlib.nullcontext()

    def sum_over_ranks(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each value (device scalar or number) summed over ranks in one all-reduce (fp64);
        returned as fp64 device scalars. One process: the values as fp64 tensors."""
        if not values:
            return {}
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
        stacked = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                for v in values.values()
            ]
        )
        if self.distributed:
            dist.all_reduce(stacked)
        return dict(zip(values, stacked.unbind(), strict=True))

    def max_over_ranks(self, value: float) -> float:
        """The largest `value` of any rank (peak memory, say); one process: `value`."""
        if not self.distributed:
            return value
        box = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_cpu_group())
        return float(box.item())

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a stop request, say)."""
        if not self.distributed:
            return flag
        box = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_cpu_group())
        return bool(box.item())

    # -- failures ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def failures_end_every_rank(self):
        """Around a run's work on every rank: an exception on one rank ends all of them."""
        if not self.distributed or self.store is None:
            yield
            return
        ended = threading.Event()
        watch = threading.Thread(
            target=self._watch_peers, args=(ended,), name="fastdpo-failure-watch", daemon=True
        )
        watch.start()
        try:
            yield
        except BaseException as error:
            ended.set()
            self._fail(error)
            raise
        finally:
            ended.set()

    def _watch_peers(self, ended: threading.Event) -> None:
        """Ends this process with a peer's posted error if this rank's own code has not ended
        within `_PEER_GRACE_S` of it being posted (blocked in a collective that never fails)."""
        while not ended.wait(_WATCH_INTERVAL_S):
            posted = self._posted_failure()
            if posted is None or posted[0] == self.rank:
                continue
            if ended.wait(_PEER_GRACE_S):
                return
            message = f"rank {posted[0]} failed: {posted[1]}"
            (self.report_peer_failure or (lambda m: logger.error("stopped: %s", m)))(message)
            with contextlib.suppress(Exception):
                self.store.add(_SEEN_KEY, 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    def _fail(self, error: BaseException) -> None:
        posted = self._posted_failure()
        if posted is not None and posted[0] != self.rank and _is_communication_error(error):
            with contextlib.suppress(Exception):
                self.store.add(_SEEN_KEY, 1)
            rank, message = posted
            raise RankFailedError(f"rank {rank} failed: {message}") from error
        message = f"{type(error).__name__}: {error}".strip()
        with contextlib.suppress(Exception):
            self.store.compare_set(_FAILURE_KEY, "", f"{self.rank}\n{message}")
        logger.error("rank %d failed: %s", self.rank, message)
        # Tearing the group down closes this rank's connections: collectives the others wait
        # in fail now rather than after distributed_timeout.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        deadline = time.monotonic() + _FAILURE_GRACE_S
        with contextlib.suppress(Exception):
            while self.store.add(_SEEN_KEY, 0) < self.world_size - 1:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)

    def _posted_failure(self) -> tuple[int, str] | None:
        try:
            if not self.store.check([_FAILURE_KEY]):
                return None
            rank, message = self.store.get(_FAILURE_KEY).decode().split("\n", 1)
            return int(rank), message
        except Exception:  # the store itself is gone: nothing to read
            return None

    def shutdown(self) -> None:
        """Leave the process group (end of a successful run)."""
        global _CPU_GROUP
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        _CPU_GROUP = None


# ------------------------------------------------------------------------------------------------
# The forward through the wrapper


class PackedForward(nn.Module):
    """`sequence_logps` as a module's forward, so DDP / FSDP2 wrap the call that uses the
    parameters. `model` is the bare causal LM (or its PEFT wrapper)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, **kwargs: Any) -> SequenceLogps:
        out = sequence_logps(self.model, batch, **kwargs)
        if out.chosen is not None:
            # Not views of `logps`: FSDP2 hooks the outputs for its pre-backward, and an
            # output that is a view draws its warning about in-place ops.
            out.chosen, out.rejected = out.logps[0::2].clone(), out.logps[1::2].clone()
        return out


def packed_forward(model: nn.Module, batch: PackedBatch, **kwargs: Any) -> SequenceLogps:
    """`sequence_logps(model, batch, **kwargs)`, through the DDP / FSDP2 wrapper when `model`
    is one (its hooks must run), else on the model itself."""
    if isinstance(model, (PackedForward, nn.parallel.DistributedDataParallel)):
        return model(batch, **kwargs)
    return sequence_logps(model, batch, **kwargs)


def bare_model(model: nn.Module) -> nn.Module:
    """The causal LM (or PEFT model) inside a `wrap` result."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.model if isinstance(model, PackedForward) else model


def _sum_all_reduce(state, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size). No annotations:
    DDP checks `bucket`'s against dist.GradBucket, and postponed annotations are strings."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (the classes transformers names in `_no_split_modules`)."""
    lm = unwrap_model(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"strategy: fsdp2 shards per decoder layer, but {type(lm).__name__} names no layer "
            "class in _no_split_modules; use strategy: ddp"
        )
    return layers


def _fully_shard(
    root: PackedForward, model: nn.Module, config: TrainConfig, device: torch.device
) -> nn.Module:
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cuda", (dist.get_world_size(),))
        if config.dtype == "auto":  # bf16 compute, fp32 master weights and gradient reduction
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
    if config.offload:
        if device.type != "cuda":
            raise ConfigError("offload: moves parameters off a GPU; this run has none")
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    # Sum, as DDP's comm hook above, on every sharded module (the setting is per module: on
    # the root alone the layers' gradients came out halved). A divide factor alone becomes
    # PREMUL_SUM(1.0), which gloo refuses; forcing plain SUM works on both backends and skips
    # the division by 1.
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
        else:  # older torch names it for reduce-scatter only
            module.set_reduce_scatter_divide_factor(1.0)
    return root


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm, clipped to `max_norm` when set (fp32 device scalar).

    Under FSDP2 the gradients are sharded DTensors: their norm is a partial DTensor and
    `full_tensor()` sums it over ranks. Under DDP they are already the global sums."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    full_tensor = getattr(norm, "full_tensor", None)
    if callable(full_tensor):
        norm = full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


# ------------------------------------------------------------------------------------------------
# Memory estimate for strategy auto


def training_state_bytes(model: nn.Module) -> int:
    """Bytes one full replica needs: every weight, plus an fp32 gradient and AdamW's two fp32
    moments for each trainable one."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (4 + 8)
    return total


def device_memory_bytes(device: torch.device, local_world_size: int) -> int:
    """One device's memory (a GPU's total; on the CPU the machine's RAM / local processes)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // max(local_world_size, 1)


# ------------------------------------------------------------------------------------------------
# Process group


def _init_process_group(config: TrainConfig):
    """init_process_group from torchrun's env, keeping the store for failure messages."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=config.distributed_timeout)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    return store


def _default_store():
    """The store of a process group the caller initialized (private torch API: may be None)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


_CPU_GROUP: Any = None


def _cpu_group():
    """A gloo group for small host-side agreements (NCCL groups take only CUDA tensors)."""
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def _is_communication_error(error: BaseException) -> bool:
    """A collective or store call that failed because a peer went away (or timed out)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    markers = ("Connection closed by peer", "Connection reset", "Broken pipe", "gloo", "NCCL")
    return isinstance(error, RuntimeError) and any(m in text for m in markers)
