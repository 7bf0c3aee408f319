"""The built-in trainer: `train` fine-tunes a model for some epochs, `evaluate` measures accuracy and loss.

Each `train` call builds a new optimiser (SGD with momentum, or AdamW) and a learning-rate schedule (cosine to 0,
x0.1 steps, or constant), stepped per batch, as the published methods do for each fine-tuning step; so nothing
but the model carries over between calls. Shuffling, dropout and flips are seeded by `seed` inside a forked RNG
state: the same seed gives the same batches and, on CPU, the same final weights, and the caller's global RNG is
left as it was. Under an initialised torch.distributed process group, `train` uses a DistributedSampler and
wraps the model in DistributedDataParallel for the run (unwrapped after: the caller keeps its module), and
`evaluate` shards the data over the ranks and sums the counts, so every rank gets the same numbers. A
regulariser (LaCoOT's block distance: `lacoot.BlockDistanceRegulariser`) adds a penalty to the loss, and an
objective (`objectives.Denoising`) replaces the cross-entropy of a classifier by its own loss.
"""
from __future__ import annotations

import itertools
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .. import data
from ..progress import bar
from ..errors import OptionError, finite_number, known_fields, valid_choice
from . import distributed
from .objectives import Objective

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class Regulariser(Protocol):
    """A penalty added to the training loss: `watching(model)` is entered around the whole `train` run (on the
    model itself, not its DistributedDataParallel wrapper) and `penalty()`, called after each forward, returns
    the penalty of that forward (a scalar tensor, float32, computed outside autocast) and consumes what it read."""

    def watching(self, model: nn.Module) -> AbstractContextManager: ...

    def penalty(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainConfig:
    """How `train` optimises.

    optimizer: "sgd" (momentum, no Nesterov) or "adamw". Only parameters with requires_grad are optimised, and
        weight decay applies to weights of two or more dimensions only (not to BatchNorm parameters or biases).
    schedule: "cosine" (from lr to 0 over the run, stepped per batch), "step" (x0.1 as the run passes each
        fraction in `milestones`) or "constant".
    label_smoothing: of the cross-entropy loss, in [0, 1).
    distill: weight in [0, 1] of knowledge distillation from a teacher (`train(..., teacher=)`: the loop passes
        the dense model), `temperature` its softening; the loss is (1 - distill) * CE + distill * KD. Not in the
        published methods; off by default.
    amp: mixed precision on CUDA (bfloat16 autocast where supported, else float16 with a GradScaler); None turns
        it on where the training device is CUDA; True with a CPU device is an OptionError in `train`.
    max_batches: cap on the batches of each epoch (smoke runs, tests).
    workers: DataLoader worker processes.
    progress: tqdm bars over epochs and batches (shown on rank 0 only).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: tuple = (0.5, 0.75)
    label_smoothing: float = 0.0
    distill: float = 0.0
    temperature: float = 4.0
    batch_size: int = 64
    amp: bool | None = None
    max_batches: int | None = None
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        valid_choice("optimizer", self.optimizer, OPTIMIZERS)
        valid_choice("schedule", self.schedule, SCHEDULES)
        _in_range("lr", self.lr, low=0, low_open=True)
        _in_range("momentum", self.momentum, low=0, high=1)
        _in_range("weight_decay", self.weight_decay, low=0)
        _in_range("label_smoothing", self.label_smoothing, low=0, high=1)
        if not 0 <= finite_number("option 'distill'", self.distill) <= 1:
            raise OptionError(f"option 'distill' must be in [0, 1], got {self.distill!r}")
        _in_range("temperature", self.temperature, low=0, low_open=True)
        object.__setattr__(self, "milestones", _milestones(self.milestones))
        _integer("batch_size", self.batch_size, minimum=1)
        _integer("workers", self.workers, minimum=0)
        if self.max_batches is not None:
            _integer("max_batches", self.max_batches, minimum=1)
        for name in ("amp", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "amp" and value is None):
                raise OptionError(f"option {name!r} must be a bool{' or None' * (name == 'amp')}, got {value!r}")

    @classmethod
    def from_dict(cls, options: dict) -> "TrainConfig":
        """The config of `options` (as `to_dict` writes it); unknown keys are an OptionError."""
        return cls(**known_fields("train", options, cls))

    def to_dict(self) -> dict:
        """The options as JSON-ready values (milestones as a list)."""
        return {**asdict(self), "milestones": list(self.milestones)}


@dataclass(frozen=True)
class Evaluation:
    """Top-1 accuracy and mean cross-entropy (no label smoothing) over `samples` samples."""

    accuracy: float
    loss: float
    samples: int


def train(model: nn.Module, dataset: Dataset | DataLoader, config: TrainConfig, epochs: int, *, seed: int,
          device: str | torch.device = "cpu", find_unused_parameters: bool = False,
          teacher: nn.Module | None = None, regulariser: Regulariser | None = None, objective: Objective | None = None,
          on_batch: Callable[[float], None] | None = None) -> dict:
    """Train `model` in place on `dataset` (items (input, label)) for `epochs` epochs and return
    {"epoch_losses": mean training loss of each epoch (averaged over ranks), "epoch_lrs": the learning rate at the
    start of each epoch, "batches": batches per rank}.

    The model is moved to `device` and left in training mode. Batches are shuffled by a generator seeded with
    `seed` and the last incomplete batch is dropped; an `ImageSet` is batched by `data.collate`, any other
    dataset by the default collate. Under a process group each rank trains on its DistributedSampler shard
    through DistributedDataParallel (with `find_unused_parameters`), and rank 0's buffers are copied to every
    rank at the end, so all ranks hold the same model. With `config.distill > 0`, `teacher` (run in eval mode,
    without gradients) is distilled into the model. A DataLoader is used as it is (its batches, shuffling and
    sampler: under a process group, give it a DistributedSampler); `config.batch_size` applies to datasets.
    A `regulariser` (`Regulariser`) watches the model during the run and its penalty is added to each batch's
    loss (the epoch losses include it); its random draws come from the seeded RNG, so runs repeat. An
    `objective` (`objectives.Denoising`) computes each batch's loss from (model, inputs, labels) instead of the
    cross-entropy; it draws from the seeded RNG too, and cannot be combined with distillation.
    """
    device = _resolve(device)
    amp_dtype = _amp_dtype(config.amp, device)
    _integer("epochs", epochs, minimum=1)
    loader = _train_loader(dataset, config, seed)
    per_epoch = _batches_per_epoch(loader, config)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    total = epochs * per_epoch
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(config, step / total))
    if config.distill and teacher is None:
        raise OptionError("option 'distill' needs a teacher model")
    if config.distill and objective is not None:
        raise OptionError(f"distillation matches a classifier's logits: it cannot train the {objective.name} objective")
    if teacher is not None and config.distill:
        teacher = teacher.to(device).eval()
    step = _Step(optimizer, scheduler, amp_dtype, config, teacher if config.distill else None, regulariser, objective)
    runner = _wrap(model, device, find_unused_parameters)
    losses, rates = [], []
    watching = regulariser.watching(model) if regulariser is not None else nullcontext()
    with watching, torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                         device_type=device.type):
        torch.manual_seed(seed + distributed.rank())
        for epoch in bar(range(epochs), "epochs", not _quiet(config.progress), leave=True):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            done = epoch * per_epoch
            tick = None if on_batch is None else (lambda batch: on_batch((done + batch) / total))
            rates.append(optimizer.param_groups[0]["lr"])
            losses.append(_train_epoch(runner, loader, per_epoch, step, device, config.progress, tick))
    del runner
    distributed.broadcast_buffers(model)
    return {"epoch_losses": losses, "epoch_lrs": rates, "batches": total}


def evaluate(model: nn.Module, dataset: Dataset | DataLoader, *, batch_size: int = 256,
             device: str | torch.device = "cpu", max_batches: int | None = None, progress: bool = False) -> Evaluation:
    """Accuracy and mean cross-entropy of `model` on `dataset`, in eval mode under no_grad (the model's mode is
    restored after). Under a process group each rank evaluates the strided shard rank, rank + world, ... (no
    padding) and the sums are all-reduced, so every rank gets the same exact counts. `max_batches` caps the
    batches of each rank. A DataLoader is used as it is (under a process group it must shard the data)."""
    device = _resolve(device)
    _integer("batch_size", batch_size, minimum=1)
    if max_batches is not None:
        _integer("max_batches", max_batches, minimum=1)
    if isinstance(dataset, DataLoader):
        loader = dataset
    else:
        shard = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
        loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate_fn(dataset, train=False))
    was_training = model.training
    model.to(device).eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for inputs, labels in bar(itertools.islice(loader, max_batches), "evaluating", not _quiet(progress)):
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs).float()
            totals += torch.stack([(logits.argmax(1) == labels).sum().double(),
                                   F.cross_entropy(logits, labels, reduction="sum").double(),
                                   torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    model.train(was_training)
    correct, loss, samples = distributed.all_reduce_sum(totals).tolist()
    if samples == 0:
        raise OptionError("evaluate got an empty dataset")
    return Evaluation(accuracy=correct / samples, loss=loss / samples, samples=int(samples))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the parameters that require gradients; no weight decay on 1-D ones (BN, biases)."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise OptionError("the model has no parameter that requires grad")
    decayed = [parameter for parameter in trainable if parameter.dim() > 1]
    plain = [parameter for parameter in trainable if parameter.dim() <= 1]
    groups = [group for group in ({"params": decayed, "weight_decay": config.weight_decay},
                                  {"params": plain, "weight_decay": 0.0}) if group["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(config: TrainConfig, progress: float) -> float:
    """The learning rate over `config.lr` at `progress` (fraction of the run's batches done, in [0, 1])."""
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return 0.1 ** sum(progress >= milestone for milestone in config.milestones)
    return 1.0


class _Step:
    """One optimisation step: forward under autocast, loss (the objective's, else cross-entropy, plus the
    regulariser's penalty, outside autocast), backward (scaled for float16), optimiser and schedule."""

    def __init__(self, optimizer, scheduler, amp_dtype: torch.dtype | None, config: TrainConfig,
                 teacher: nn.Module | None, regulariser: Regulariser | None = None,
                 objective: Objective | None = None) -> None:
        self.optimizer, self.scheduler, self.amp_dtype = optimizer, scheduler, amp_dtype
        self.config, self.teacher, self.regulariser, self.objective = config, teacher, regulariser, objective
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def __call__(self, runner: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.objective is not None:
                loss = self.objective.loss(runner, inputs, labels).float()
            else:
                loss = self.classification_loss(runner, inputs, labels)
        if self.regulariser is not None:
            loss = loss + self.regulariser.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def classification_loss(self, runner: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = runner(inputs).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                targets = self.teacher(inputs).float()
            loss = (1 - self.config.distill) * loss + self.config.distill * distillation(
                logits, targets, self.config.temperature)
        return loss


def distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    return temperature ** 2 * F.kl_div(F.log_softmax(logits / temperature, 1),
                                       F.log_softmax(teacher_logits / temperature, 1),
                                       reduction="batchmean", log_target=True)


def _train_epoch(runner: nn.Module, loader: DataLoader, per_epoch: int, step: _Step, device: torch.device,
                 progress: bool, on_batch: Callable[[int], None] | None = None) -> float:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch, (inputs, labels) in enumerate(bar(itertools.islice(loader, per_epoch), "training batches",
                                                 not _quiet(progress), total=per_epoch)):
        if on_batch is not None:
            on_batch(batch)
        total += step(runner, inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
    return distributed.all_reduce_sum(total).item() / (per_epoch * distributed.world_size())


def _train_loader(dataset: Dataset | DataLoader, config: TrainConfig, seed: int) -> DataLoader:
    if isinstance(dataset, DataLoader):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    collate = collate_fn(dataset, train=True)
    if distributed.initialized():
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                          num_workers=config.workers, collate_fn=collate, generator=generator)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                      num_workers=config.workers, collate_fn=collate, generator=generator)


def _batches_per_epoch(loader: DataLoader, config: TrainConfig) -> int:
    batches = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    if batches == 0:
        raise OptionError(f"a dataset of {len(loader.dataset)} samples gives no full batch of "
                          f"{config.batch_size} per rank ({distributed.world_size()} rank(s))")
    return batches


def collate_fn(dataset: Dataset, train: bool):
    """The DataLoader collate_fn of `dataset`: `data.collate` for an ImageSet (flips only when training a set
    that asks for them), else None (torch's default)."""
    if isinstance(dataset, data.ImageSet):
        return data.collate(dataset.size, flip=train and dataset.flip)
    return None


def _wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    if not distributed.initialized():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _resolve(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _amp_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    if amp and device.type != "cuda":
        raise OptionError(f"option 'amp' (mixed precision) needs a CUDA device, got {device}")
    if amp is False or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _quiet(progress: bool) -> bool:
    return not (progress and distributed.is_main())


def _in_range(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    number = finite_number(f"option {name!r}", value)
    if number < low or (low_open and number == low) or (high is not None and number >= high):
        interval = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high})"
        raise OptionError(f"option {name!r} must be in {interval}, got {value!r}")


def _integer(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"option {name!r} must be an integer >= {minimum}, got {value!r}")


def _milestones(milestones: object) -> tuple:
    if not isinstance(milestones, (tuple, list)):
        raise OptionError(f"option 'milestones' must be a sequence of fractions, got {milestones!r}")
    values = tuple(finite_number("a milestone", value) for value in milestones)
    if any(not 0 < value < 1 for value in values) or list(values) != sorted(set(values)):
        raise OptionError(f"option 'milestones' must be increasing fractions in (0, 1), got {milestones!r}")
    return values
