"""A small, resumable training loop for distillation and pruning recovery, single process or `torchrun`.

PyTorch does the heavy lifting: autocast (bf16/fp16 mixed precision; bf16 on CPU), gradient checkpointing through
transformers' `gradient_checkpointing_enable`, DistributedDataParallel (gloo on CPU, nccl on GPU) with a
DistributedSampler, FSDP2 `fully_shard` for a teacher too big for one device, AdamW (foreach=False: no fused
per-step copies) or transformers' Adafactor (factored second moments). What is ours: the checkpoint format
(safetensors for every tensor, JSON for every scalar: no pickle anywhere), exact resume (model, optimizer,
scheduler, step, position in the epoch, RNG), per-epoch evaluation with early stopping, and the global-batch
arithmetic that makes N processes follow the 1-process loss curve.

Run under torchrun:  torchrun --standalone --nproc_per_node 2 -m edgepack.compress.stages distill request.json

>>> trainer = Trainer(objective, examples, collate=collate, options=TrainOptions(epochs=3))  # doctest: +SKIP
>>> result = trainer.fit()                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgepack.errors import BadInputError
from edgepack.registry import Registry

Batch = dict[str, torch.Tensor]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 3
    #: optimizer steps in all; None = epochs x steps per epoch
    max_steps: int | None = None
    #: samples per optimizer step, all processes and accumulation micro-batches together (the global batch)
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    optimizer: str = "adamw"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    seed: int = 0
    #: evaluation metric to monitor (higher is better) and epochs without improvement before stopping
    monitor: str | None = None
    early_stop_patience: int | None = None
    checkpoint_dir: Path | None = None
    #: also checkpoint every N optimizer steps (0: only at the end of each epoch)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    #: shard the (frozen) teacher with FSDP across processes instead of replicating it
    shard_teacher: bool = False
    #: wall-clock budget for training; the run stops after the step that crosses it (all processes together).
    #: A stop by time depends on the machine's speed, so such a run is not reproducible step for step.
    max_train_minutes: float | None = None
    #: batches of texts of similar length (less padding); each epoch still sees every text once, see
    #: `bucketed_micro_batches`. Needs examples with `input_ids`.
    length_bucketing: bool = False

    def __post_init__(self) -> None:
        rules = (("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1),
                 ("grad_accum", self.grad_accum >= 1), ("lr", self.lr > 0), ("warmup_ratio", 0 <= self.warmup_ratio < 1),
                 ("max_steps", self.max_steps is None or self.max_steps >= 1),
                 ("checkpoint_every", self.checkpoint_every >= 0), ("keep_checkpoints", self.keep_checkpoints >= 1),
                 ("max_train_minutes", self.max_train_minutes is None or self.max_train_minutes > 0))
        for name, ok in rules:
            if not ok:
                raise BadInputError(f"distill.{name}={getattr(self, name)!r} is out of range; see DistillSection")
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"distill.schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"distill.precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        OPTIMIZERS.get(self.optimizer)


# -------------------------------------------------------------------------------------------------- optimizers

OptimizerFactory = Callable[[list[dict[str, Any]], TrainOptions], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict[str, Any]], options: TrainOptions) -> torch.optim.Optimizer:
    # foreach=False updates one tensor at a time: no temporary copies of every parameter at once.
    return torch.optim.AdamW(groups, lr=options.lr, foreach=False)


@OPTIMIZERS.register("adafactor")
def _adafactor(groups: list[dict[str, Any]], options: TrainOptions) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # Fixed learning rate (our schedule drives it); factored second moments: O(rows + cols) state per matrix.
    return Adafactor(groups, lr=options.lr, scale_parameter=False, relative_step=False, warmup_init=False)


@OPTIMIZERS.register("adamw-8bit")
def _adamw_8bit(groups: list[dict[str, Any]], options: TrainOptions) -> torch.optim.Optimizer:
    reason = optimizer_availability()["adamw-8bit"]
    if reason != "ok":
        raise BadInputError(f"distill.optimizer adamw-8bit is {reason}; use adamw or adafactor")
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=options.lr)


def optimizer_availability() -> dict[str, str]:
    """'ok' or 'unavailable: <why>' per optimizer on this machine (8-bit states need bitsandbytes' kernels)."""
    status = {"adamw": "ok", "adafactor": "ok"}
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError:
        status["adamw-8bit"] = "unavailable: bitsandbytes is not installed (it ships 8-bit optimizer kernels)"
        return status
    if not torch.cuda.is_available():
        try:
            probe = torch.nn.Parameter(torch.zeros(4096))
            optimizer = bnb.optim.AdamW8bit([probe], lr=1e-3)
            probe.grad = torch.ones_like(probe)
            optimizer.step()
        except Exception as err:  # bitsandbytes' CPU backend varies by build; report what it says
            status["adamw-8bit"] = f"unavailable: bitsandbytes has no working CPU 8-bit optimizer here ({err})"[:300]
            return status
    status["adamw-8bit"] = "ok"
    return status


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and LayerNorm weights (1-D) keep their scale."""
    decay, plain = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else plain).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine or linear decay to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


# ------------------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); else a 1-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size())


def _mean_across(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world
    return value


def shard_module(module: nn.Module, layers: Sequence[nn.Module]) -> nn.Module:
    """FSDP2: each layer and then the root sharded across the process group (parameters all-gathered per layer)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return module


def epoch_micro_batches(n: int, *, env: DistEnv, micro: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: DistributedSampler's seeded shuffle, rank r takes every world-th
    index, incomplete batches dropped. Micro-batch k of all ranks together is the same set of samples as batch k
    of one process with batch size micro x world (what makes the loss curves comparable)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=env.world, rank=env.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + micro] for i in range(0, len(indices) - micro + 1, micro)]


def bucketed_micro_batches(lengths: Sequence[int], *, env: DistEnv, micro: int, seed: int, epoch: int,
                           window: int = 50) -> list[list[int]]:
    """This rank's micro-batches for one epoch, each global batch (micro x world texts) of similar lengths.

    The epoch's seeded shuffle (the same on every rank) is cut into windows of `window` global batches; each window
    is sorted by length and cut into global batches, then all batches are shuffled and rank r takes slice r of
    each. Every text is seen once per epoch (the last incomplete batch dropped), a batch pads to a length close to
    its texts', and micro-batch k of all ranks together is still one global batch, as with `epoch_micro_batches`.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    whole = micro * env.world
    usable = len(lengths) // whole * whole
    order = torch.randperm(len(lengths), generator=generator).tolist()[:usable]
    batches: list[list[int]] = []
    for start in range(0, usable, window * whole):
        chunk = sorted(order[start:start + window * whole], key=lambda i: lengths[i])
        batches += [chunk[i:i + whole] for i in range(0, len(chunk), whole)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[b][env.rank * micro:(env.rank + 1) * micro] for b in shuffled]


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    #: optimizer steps already done in `epoch` (resume skips them)
    step_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    stopped_by_time: bool = False


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, everything else for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in scalars["state"].items()}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, keep: int, fingerprint: dict[str, Any] | None = None) -> Path:
    """folder/step-<N>/: model.safetensors, optimizer.safetensors (+ RNG), trainer_state.json; written atomically."""
    from safetensors.torch import save_file

    final = folder / f"step-{state.step:08d}"
    tmp = folder / f".tmp-step-{state.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    tensors, scalars = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    payload = {"trainer": asdict(state), "optimizer": scalars, "scheduler": scheduler.state_dict(),
               "run": fingerprint}
    (tmp / "trainer_state.json").write_text(json.dumps(payload, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    done = [p for p in sorted(folder.glob("step-*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


#: options that must match for a checkpoint to continue the same run
RESUME_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "schedule",
               "optimizer", "precision", "seed", "length_bucketing")


def run_fingerprint(options: TrainOptions, *, examples: int, world: int) -> dict[str, Any]:
    return {**{key: getattr(options, key) for key in RESUME_KEYS}, "examples": examples, "world_size": world}


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    fingerprint: dict[str, Any] | None = None) -> TrainState:
    """Restore everything `save_checkpoint` wrote; tensors from safetensors, scalars from JSON.

    A checkpoint of a different run (other options, data size or process count) is refused, never half-resumed.
    """
    from safetensors.torch import load_file

    payload = json.loads((path / "trainer_state.json").read_text())
    saved = payload.get("run")
    if fingerprint is not None and saved is not None and saved != fingerprint:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if saved.get(k) != v)
        raise BadInputError(f"checkpoint {path} belongs to another run ({changed}); delete {path.parent} or pass "
                            "another checkpoint_dir")
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, payload["optimizer"]))
    scheduler.load_state_dict(payload["scheduler"])
    return TrainState(**payload["trainer"])


# ---------------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    best_epoch: int | None
    stopped_early: bool
    stopped_by_time: bool
    resumed_from: str | None
    wall_s: float
    world_size: int
    micro_batch: int
    #: seconds spent in optimizer steps only (wall_s also holds the per-epoch evaluation and checkpoints)
    steps_wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Trains `objective` (a module whose forward(**batch) returns (loss, per-loss parts)) on `examples`.

    `evaluate()` runs after every epoch on every process and returns metrics; `on_step(step, loss)` is called after
    each optimizer step (after that step's checkpoint), e.g. to stop a run for the resume test.
    """

    def __init__(self, objective: nn.Module, examples: Sequence[Any], *, collate: Callable[[list[Any]], Batch],
                 options: TrainOptions, evaluate: Callable[[], dict[str, float]] | None = None,
                 on_step: Callable[[int, float], None] | None = None, teacher_layers: Sequence[nn.Module] = ()) -> None:
        self.objective = objective
        self.examples = examples
        self.collate = collate
        self.options = options
        self.evaluate = evaluate
        self.on_step = on_step
        self.teacher_layers = teacher_layers

    def _micro_batch(self, env: DistEnv) -> int:
        o = self.options
        per_step = env.world * o.grad_accum
        if o.batch_size % per_step:
            raise BadInputError(f"distill.batch_size={o.batch_size} is not divisible by processes x grad_accum = "
                                f"{env.world} x {o.grad_accum}; pick a multiple of {per_step}")
        micro = o.batch_size // per_step
        if len(self.examples) // env.world < micro * o.grad_accum:
            raise BadInputError(f"distill.batch_size={o.batch_size} is larger than the {len(self.examples)} training "
                                "texts; lower batch_size or add text")
        return micro

    def fit(self) -> TrainResult:
        o, env = self.options, init_distributed()
        micro = self._micro_batch(env)
        torch.manual_seed(o.seed)
        student = getattr(self.objective, "student", self.objective)
        if o.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if o.shard_teacher and env.world > 1:
            shard_module(self.objective.__dict__["teacher"], self.teacher_layers)
        optimizer = OPTIMIZERS.get(o.optimizer)(param_groups(self.objective, o.weight_decay), o)
        steps_per_epoch = len(self.examples) // env.world // micro // o.grad_accum
        total = min(o.max_steps or 10**12, o.epochs * steps_per_epoch)
        warmup = int(total * o.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, schedule=o.schedule))
        state, resumed = TrainState(), None
        self.fingerprint = run_fingerprint(o, examples=len(self.examples), world=env.world)
        checkpoint = latest_checkpoint(o.checkpoint_dir) if o.resume else None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model=self.objective, optimizer=optimizer, scheduler=scheduler,
                                    fingerprint=self.fingerprint)
            resumed = str(checkpoint)
        wrapped: nn.Module = self.objective
        if env.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(self.objective, find_unused_parameters=True)
        start = time.perf_counter()
        loop = _Loop(self, wrapped, optimizer, scheduler, env, micro=micro, total=total)
        while state.epoch < o.epochs and state.step < total and not (state.stopped_early or state.stopped_by_time):
            loop.run_epoch(state)
        if env.world > 1:
            dist.barrier()
        self._restore_best(state)
        return TrainResult(steps=state.step, history=state.history, evals=state.evals, best_epoch=state.best_epoch,
                           stopped_early=state.stopped_early, stopped_by_time=state.stopped_by_time,
                           resumed_from=resumed,
                           wall_s=time.perf_counter() - start, world_size=env.world, micro_batch=micro,
                           steps_wall_s=round(loop.step_time, 3))

    def _restore_best(self, state: TrainState) -> None:
        """Early stopping keeps the best epoch's weights (saved beside the checkpoints, or held in memory)."""
        best = getattr(self, "_best_weights", None)
        if state.best_epoch is None or not state.evals or state.evals[-1]["epoch"] == state.best_epoch:
            return
        if best is None and self.options.checkpoint_dir is not None:
            from safetensors.torch import load_file

            path = self.options.checkpoint_dir / "best" / "model.safetensors"
            best = load_file(str(path)) if path.is_file() else None
        if best is not None:
            self.objective.load_state_dict(best)

    def _note_best(self, state: TrainState, env: DistEnv) -> None:
        weights = {k: v.detach().clone() for k, v in self.objective.state_dict().items()}
        self._best_weights = weights
        folder = self.options.checkpoint_dir
        if folder is not None and env.main:
            from safetensors.torch import save_file

            (folder / "best").mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "best" / "model.safetensors"))


class _Loop:
    """One trainer run's moving parts; `run_epoch` advances `state` by (the rest of) one epoch."""

    def __init__(self, trainer: Trainer, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 env: DistEnv, *, micro: int, total: int) -> None:
        self.t, self.wrapped, self.optimizer, self.scheduler = trainer, wrapped, optimizer, scheduler
        self.env, self.micro, self.total = env, micro, total
        self.started = time.perf_counter()
        self.step_time = 0.0
        o = trainer.options
        dtype = PRECISIONS[o.precision]
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = (lambda: torch.autocast(self.device_type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(self.device_type) if o.precision == "fp16" else None

    def run_epoch(self, state: TrainState) -> None:
        o = self.t.options
        if o.length_bucketing:
            lengths = [len(e["input_ids"]) for e in self.t.examples]
            batches = bucketed_micro_batches(lengths, env=self.env, micro=self.micro, seed=o.seed, epoch=state.epoch)
        else:
            batches = epoch_micro_batches(len(self.t.examples), env=self.env, micro=self.micro, seed=o.seed,
                                          epoch=state.epoch)
        steps = len(batches) // o.grad_accum
        self.wrapped.train()
        for step_in_epoch in range(state.step_in_epoch, steps):
            if state.step >= self.total:
                break
            chunk = batches[step_in_epoch * o.grad_accum:(step_in_epoch + 1) * o.grad_accum]
            began = time.perf_counter()
            loss, parts = self._optimizer_step(chunk)
            self.step_time += time.perf_counter() - began
            state.step += 1
            state.step_in_epoch = step_in_epoch + 1
            state.history.append({"step": state.step, "epoch": state.epoch, "loss": loss,
                                  "lr": self.scheduler.get_last_lr()[0], "parts": parts})
            if o.checkpoint_every and state.step % o.checkpoint_every == 0:
                self._checkpoint(state)
            if self.t.on_step is not None:
                self.t.on_step(state.step, loss)
            if self._out_of_time():
                state.stopped_by_time = True
                break
        self._end_epoch(state)

    def _out_of_time(self) -> bool:
        """True on every process once any process has used the time budget (so all stop at the same step)."""
        budget = self.t.options.max_train_minutes
        if budget is None:
            return False
        flag = torch.tensor(float(time.perf_counter() - self.started > budget * 60))
        if self.env.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _optimizer_step(self, chunk: list[list[int]]) -> tuple[float, list[float]]:
        o = self.t.options
        total_loss = torch.zeros(())
        total_parts: torch.Tensor | None = None
        for index, indices in enumerate(chunk):
            batch = self.t.collate([self.t.examples[i] for i in indices])
            last = index == len(chunk) - 1
            sync: AbstractContextManager[Any] = nullcontext()
            if not last and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
                sync = self.wrapped.no_sync()  # all-reduce gradients once per optimizer step
            with sync:
                with self.autocast():
                    loss, parts = self.wrapped(**batch)
                scaled = loss.float() / o.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total_loss += scaled.detach()
            total_parts = parts.float() / o.grad_accum + (0 if total_parts is None else total_parts)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.t.objective.parameters(), o.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = _mean_across(total_loss, self.env)
        parts_value = _mean_across(total_parts if total_parts is not None else torch.zeros(0), self.env)
        return float(loss_value), [float(p) for p in parts_value]

    def _end_epoch(self, state: TrainState) -> None:
        o = self.t.options
        epoch_done = state.step_in_epoch  # steps of this epoch actually run
        metrics = self.t.evaluate() if self.t.evaluate is not None else {}
        state.evals.append({"epoch": state.epoch, "step": state.step, "steps_in_epoch": epoch_done, **metrics})
        if o.monitor is not None and o.monitor in metrics:
            value = float(metrics[o.monitor])
            if state.best is None or value > state.best:
                state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
                self.t._note_best(state, self.env)
            else:
                state.bad_epochs += 1
                patience = o.early_stop_patience
                state.stopped_early = patience is not None and state.bad_epochs >= patience
        state.epoch += 1
        state.step_in_epoch = 0
        self._checkpoint(state)

    def _checkpoint(self, state: TrainState) -> None:
        o = self.t.options
        if o.checkpoint_dir is None:
            return
        if self.env.main:
            save_checkpoint(o.checkpoint_dir, model=self.t.objective, optimizer=self.optimizer,
                            scheduler=self.scheduler, state=state, keep=o.keep_checkpoints,
                            fingerprint=self.t.fingerprint)
        if self.env.world > 1:
            dist.barrier()


# ------------------------------------------------------------------------------------- training memory probe


def train_peak_memory(model_dir: Path, *, sequence_length: int, batch_size: int, gradient_checkpointing: bool,
                      steps: int = 2, precision: str = "fp32", optimizer: str = "adamw",
                      malloc_mmap_threshold: int | None = 65536, timeout_s: float = 600) -> dict[str, Any]:
    """Peak RSS of `steps` training steps of the encoder in `model_dir`, measured in a fresh process (VmHWM).

    The child loads the model, builds the optimizer, records its RSS (`before_train_mb`), runs the steps on a
    (batch_size, sequence_length) batch of random token ids, and reports VmHWM (`peak_mb`); `train_peak_mb` is the
    difference (activations, gradients, optimizer state: what gradient checkpointing and the optimizer change).

    `malloc_mmap_threshold` pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) in the child. glibc raises that
    threshold after the first large free, so later activation buffers come from a heap it rarely gives back and
    RSS tracks the allocator's cache instead of the live tensors; pinned, freed buffers return to the OS. Pass None
    to measure glibc's default behaviour. Only glibc (Linux) reads this variable.
    """
    request = {"model_dir": str(model_dir), "sequence_length": sequence_length, "batch_size": batch_size,
               "gradient_checkpointing": gradient_checkpointing, "steps": steps, "precision": precision,
               "optimizer": optimizer, "malloc_mmap_threshold": malloc_mmap_threshold}
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    done = subprocess.run([sys.executable, "-m", "edgepack.compress.trainer", json.dumps(request)],
                          capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"training memory probe failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _memory_child(request: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModel

    from edgepack.compress.prune import output_energy

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(request["model_dir"], local_files_only=True, use_safetensors=True,
                                      attn_implementation="eager").train()
    if request["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = TrainOptions(optimizer=request["optimizer"], precision=request["precision"])
    optimizer = OPTIMIZERS.get(options.optimizer)(param_groups(model, 0.01), options)
    shape = (request["batch_size"], request["sequence_length"])
    batch = {"input_ids": torch.randint(1000, 20000, shape), "attention_mask": torch.ones(shape, dtype=torch.long)}
    dtype = PRECISIONS[request["precision"]]
    before = _vm_kib("VmRSS")
    start = time.perf_counter()
    for _ in range(request["steps"]):
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            loss = output_energy(model(**batch), batch)
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - start) / request["steps"]
    peak = _vm_kib("VmHWM")
    return {**request, "before_train_mb": before / 1024, "peak_mb": peak / 1024,
            "train_peak_mb": (peak - before) / 1024, "step_s": step_s, "method": "VmRSS/VmHWM of a fresh process"}


if __name__ == "__main__":
    print(json.dumps(_memory_child(json.loads(sys.argv[1]))))
