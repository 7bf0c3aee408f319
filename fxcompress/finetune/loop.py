"""The fine-tuning loop every method runs: capture -> score -> choose -> apply -> fine-tune -> evaluate -> measure
-> hooks.

`prune(model, example_inputs, method=..., ...)` starts from the dense model (step 0, after `dense_epochs` of
training where asked) and repeats until a stop rule holds (`STOP_RULES`: the validation score more than
`max_drop` below the dense model's, a one-shot plan chosen, a budget met: `activations` linearised, `macs_ratio`
or `latency_ratio` of the compressed model against the dense one; `steps` steps run) or the method has nothing
left to choose. With `rewind`, each step fine-tunes from the weights the model had before the dense step's
training, under the step's masks (lottery-ticket retraining; pruning methods that keep the structure). The
result is the last step within the tolerance. Each step's record (`Trajectory`) is measured
(`Costs`, `Latency`) and handed to the hooks (`hooks.StepLine`, the caller's, and `Checkpoint`, which writes the
run folder with `out`: `run_folder.RunFolder`, checkpoint, the kept planned model, trajectory, every step's
model with `save_steps`); `resume=True` continues an interrupted run from its last checkpoint (a step that was
interrupted starts again; each step seeds its own random generators, so a resumed run makes the same choices).

Training and evaluation are either the caller's (`finetune(model, step)` trains the model in place;
`evaluate(model) -> score`, higher is better, on a validation split; `test(model) -> score` optional) or the
built-in trainer's on `data` (`fashion_mnist_splits` or any `Splits`) with a `TrainConfig`. Under an initialised
process group (torchrun), rank 0 chooses and broadcasts the decisions, every rank applies and trains, and only
rank 0 writes.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Subset

from ..api import compress
from ..capture import private_copy
from ..data import ImageSet
from ..errors import OptionError, PassError, PlanError, finite_number, known_fields
from ..graph import module_of
from ..measure import measure
from ..plan import Decision, Plan
from ..trainable import apply_plan, base_graph, base_of, blending, plan_of
from . import distributed
from . import oneshot  # noqa: F401  (registers the "oneshot" method)
from .hooks import StepLine
from .methods import Method, StepInputs, make_method
from .objectives import Objective
from .run_folder import RunFolder
from .sparsity import masks_of, plain_state_dict, rewind, set_masks, weight_sparsity
from .trainer import TrainConfig, collate_fn, evaluate as evaluate_on, train


@dataclass(frozen=True)
class LoopConfig:
    method: str = "easier"
    steps: int | None = None  # at most this many steps after the dense one
    per_step: int = 1  # activations chosen per step
    epochs_per_step: int = 1
    dense_epochs: int = 0  # training of the dense model before step 0 (a pretrained model on new data)
    max_drop: float = 0.01  # largest validation drop from the dense model (a fraction: 0.01 = 1 point)
    activations: int | None = None  # budget: activations linearised
    macs_ratio: float | None = None  # budget: compressed MACs / dense MACs
    latency_ratio: float | None = None  # budget: compressed latency / dense latency on `lowering`
    lowering: str = "onnxruntime"
    measure_latency: bool = False  # record latency ratios every step (always with a latency_ratio budget)
    latency_threads: int | None = None  # CPU threads latency is measured on (None: those training runs on)
    selection: str = "criterion"
    method_options: dict = field(default_factory=dict)  # the method's own (`Method.options`), all of them once made
    calibration_batches: int = 4
    anneal: float = 0.0  # fraction of each step's fine-tune over which its new decisions are blended in (0: at once)
    rewind: bool = False  # each step fine-tunes from the weights before the dense step's training, under its masks
    save_steps: bool = False  # with `out`, every step's plan and weights too, in steps/<step>.pt (as kept.pt)
    only: str | None = None  # a regular expression: the method chooses only targets whose names it matches
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise OptionError(f"steps must be an int >= 0, got {self.steps!r}")
        for name in ("per_step", "calibration_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("epochs_per_step", "dense_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise OptionError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.latency_threads is not None and (not isinstance(self.latency_threads, int) or self.latency_threads < 1):
            raise OptionError(f"latency_threads must be an int >= 1 or None, got {self.latency_threads!r}")
        if not 0 <= finite_number("anneal", self.anneal) < 1:
            raise OptionError(f"anneal must be in [0, 1), got {self.anneal!r}")
        for name in ("save_steps", "rewind"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not 0 <= finite_number("max_drop", self.max_drop) <= 1:
            raise OptionError(f"max_drop must be in [0, 1], got {self.max_drop!r}")
        if self.activations is not None and (not isinstance(self.activations, int) or self.activations < 1):
            raise OptionError(f"budget 'activations' must be an int >= 1, got {self.activations!r}")
        for name in ("macs_ratio", "latency_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < finite_number(f"budget '{name}'", value) <= 1:
                raise OptionError(f"budget '{name}' must be in (0, 1], got {value!r}")
        if not isinstance(self.method_options, dict):
            raise OptionError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        method = self.make_method()
        if self.rewind and not method.keeps_structure:
            raise OptionError("rewind sets the weights back to their initial values: it needs a method whose choices "
                              f"keep every weight's shape (a pruning method with collapse=False), not {self.method!r}")
        if self.rewind and self.anneal:
            raise OptionError("rewind and anneal cannot be combined: a rewound step has no earlier weights to blend "
                              "from")
        object.__setattr__(self, "method_options", method.option_values())

    def make_method(self) -> Method:
        method = make_method(self.method, self.selection, self.method_options)
        if self.only is not None:
            method.restrict(self.only)
        return method

    @property
    def latency(self) -> bool:
        return self.measure_latency or self.latency_ratio is not None


RESUMABLE = ("steps", "progress", "workers")  # settings a resumed run may change: its length, how it is shown


@dataclass
class Trajectory:
    settings: dict  # the LoopConfig
    training: dict = field(default_factory=dict)  # the built-in trainer's TrainConfig
    steps: list[dict] = field(default_factory=list)
    kept: int = 0  # the last step within the tolerance
    stopped: str = ""  # why the loop ended

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    model: torch.nn.Module  # the kept step's planned model (eval mode)
    plan: Plan
    trajectory: Trajectory


def removed_blocks(plan: Plan) -> int:
    """The modules whose residual adds `plan` removes: the blocks removed (a transformer layer has two adds)."""
    return len({module_of(target) for target in plan.targets("remove_block")})


def _decisions(choices: list) -> tuple[Decision, ...]:
    return tuple(decision for choice in choices for decision in choice.decisions)


def _masked(model: torch.nn.Module, choices: list) -> torch.nn.Module:
    """`model` with the weight masks of `choices` (pruning methods) set."""
    for choice in choices:
        set_masks(model, choice.masks or {})
    return model


class Runner(Protocol):
    """Who trains and scores for the loop: the built-in trainer on data (`_BuiltIn`) or the caller's callables
    (`_Callables`)."""

    device: str
    teacher: torch.nn.Module | None  # the dense model, once there is one (distillation)
    probe: Callable | None  # a short fine-tune and score of a candidate (the one-shot selection's probes)

    def finetune(self, model: torch.nn.Module, epochs: int, seed: int, regulariser=None, on_batch=None
                 ) -> list[dict]: ...

    def validation(self, model: torch.nn.Module) -> float: ...

    def test(self, model: torch.nn.Module) -> float | None: ...


class _BuiltIn:
    """Training and evaluation by the built-in trainer on `data` (train, validation, test splits): accuracy, or
    the `objective`'s score."""

    def __init__(self, data, config: TrainConfig, device: str, objective: Objective | None = None):
        self.data, self.config, self.device, self.objective = data, config, device, objective
        self.teacher = None  # the dense model, distilled where config.distill > 0

    def finetune(self, model: torch.nn.Module, epochs: int, seed: int, regulariser=None, on_batch=None
                 ) -> list[dict]:
        """Train `model` in place; distilling the dense model where asked, once there is one (the dense step
        trains plainly). Returns each epoch's mean loss and learning rate."""
        config = self.config if self.teacher is not None else dataclasses.replace(self.config, distill=0.0)
        trained = train(model, self.data.train, config, epochs, seed=seed, device=self.device,
                        find_unused_parameters=bool(plan_of(model).targets("remove_block")),
                        teacher=self.teacher if config.distill else None, regulariser=regulariser,
                        objective=self.objective, on_batch=on_batch)
        return [{"loss": loss, "lr": lr} for loss, lr in zip(trained["epoch_losses"], trained["epoch_lrs"])]

    def probe(self, model: torch.nn.Module, batches: int, samples: int, seed: int) -> float:
        """`model` trained for `batches` batches (no distillation), then scored on the first `samples` validation
        samples: the objective's score, or the negative cross-entropy (`oneshot.probe_costs`)."""
        config = dataclasses.replace(self.config, max_batches=batches, distill=0.0, progress=False)
        train(model, self.data.train, config, 1, seed=seed, device=self.device,
              find_unused_parameters=bool(plan_of(model).targets("remove_block")), objective=self.objective)
        split = self.data.validation
        if isinstance(split, DataLoader):
            loader_batches = math.ceil(samples / (split.batch_size or 1))
            split = list(itertools.islice(split, loader_batches))
        elif isinstance(split, ImageSet):
            split = split.subset(torch.arange(min(samples, len(split))))
        else:
            split = Subset(split, range(min(samples, len(split))))
        if self.objective is not None:
            return self.objective.score(model, _in_order(split, self.config.batch_size), self.device)
        return -evaluate_on(model, split, device=self.device).loss

    def validation(self, model: torch.nn.Module) -> float:
        return self.score(model, self.data.validation)

    def test(self, model: torch.nn.Module) -> float:
        return self.score(model, self.data.test)

    def score(self, model: torch.nn.Module, split) -> float:
        if self.objective is not None:
            return self.objective.score(model, _in_order(split, self.config.batch_size), self.device)
        return evaluate_on(model, split, device=self.device).accuracy


class _Callables:
    def __init__(self, finetune: Callable, evaluate: Callable, test: Callable | None, device: str):
        self.finetune_fn, self.evaluate_fn, self.test_fn = finetune, evaluate, test
        self.teacher, self.device = None, device

    probe = None  # the one-shot selection's probes need the built-in trainer

    def finetune(self, model: torch.nn.Module, epochs: int, seed: int, regulariser=None, on_batch=None
                 ) -> list[dict]:
        if on_batch is not None:
            raise OptionError("anneal blends decisions in batch by batch: it needs the built-in trainer (data=)")
        torch.manual_seed(seed)
        for _ in range(epochs):
            self.finetune_fn(model.train())
        return []  # the caller's training: its losses are its own

    def validation(self, model: torch.nn.Module) -> float:
        return _score(self.evaluate_fn, model, "evaluate")

    def test(self, model: torch.nn.Module) -> float | None:
        return None if self.test_fn is None else _score(self.test_fn, model, "test")


def _score(function: Callable, model: torch.nn.Module, name: str) -> float:
    with torch.no_grad():
        value = function(model.eval())
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return finite_number(f"the {name} callable's score (higher is better)", value)


def _in_order(split, batch_size: int) -> DataLoader:
    """A split's batches in order: a dataset's without augmentation, a DataLoader's as they come."""
    if isinstance(split, DataLoader):
        return split
    return DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=collate_fn(split, train=False))


def _calibration(data, count: int, batch_size: int, objective: Objective | None = None) -> tuple[list, tuple | None]:
    """The first `count` training batches (the model's inputs: the images, or the objective's inputs made from
    them with a fixed seed) and the first validation batch, fixed for the run."""
    batches = itertools.islice(_in_order(data.train, batch_size), count)
    if objective is None:
        return [(images,) for images, _ in batches], tuple(next(iter(_in_order(data.validation, batch_size))))
    generator = torch.Generator().manual_seed(objective.seed)
    return [objective.model_inputs(images, labels, generator) for images, labels in batches], None


class _Loop:
    def __init__(self, model, example_inputs, config: LoopConfig, method: Method, runner: Runner, calibration: list,
                 validation_batch, folder: RunFolder | None, progress: bool, hooks: tuple):
        self.example_inputs, self.config, self.method, self.runner = example_inputs, config, method, runner
        self.folder, self.calibration, self.progress = folder, calibration, progress
        self.hooks = ([StepLine()] if progress else []) + list(hooks) + \
            ([Checkpoint(self)] if folder is not None else [])
        self.measurements = [Costs(self)] + ([Latency(self)] if config.latency else [])
        self.validation_batch = validation_batch
        self.model = apply_plan(model, Plan(), example_inputs)
        self.template = copy.deepcopy(base_of(self.model))  # unpruned: checkpoints load into copies of it
        self.initial = plain_state_dict(self.template) if config.rewind else None  # what `rewind` restores
        self.trajectory = Trajectory(asdict(config))
        self.dense = None  # the dense model (eval), for latency
        self.kept_model = None

    def resume(self, training: dict) -> None:
        """Continue from the folder's checkpoint, if there is one. Settings that differ from the run's own are
        refused (all but `RESUMABLE`: a run may be extended, and shown differently), so its record stays true."""
        state = self.folder.checkpoint()
        if state is None:
            return
        saved = state["trajectory"]
        changed = [f"{name} {saved[part].get(name)!r} -> {value!r}"
                   for part, given in (("settings", asdict(self.config)), ("training", training))
                   for name, value in given.items() if name not in RESUMABLE and saved[part].get(name) != value]
        if changed:
            raise OptionError(f"{self.folder.path} holds a run with other settings ({'; '.join(changed)}): resume it "
                              "with its own, or start a new run in another folder (or over it with force)")
        self.dense = copy.deepcopy(self.template)
        self.dense.load_state_dict(state["dense_state_dict"])
        self.runner.teacher = self.dense.eval()
        self.model = self._load(state)
        self.initial = state.get("initial_state_dict")
        self.trajectory = Trajectory(**state["trajectory"])
        self.trajectory.settings["steps"] = self.config.steps
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    def _load(self, state: dict) -> torch.nn.Module:
        """The planned, pruned model of a checkpoint (`save`'s plan, plain state_dict and masks)."""
        base = copy.deepcopy(self.template)
        base.load_state_dict(state["state_dict"])
        set_masks(base, state["masks"])
        return apply_plan(base.eval(), Plan.from_dict(state["plan"]), self.example_inputs)

    def finetune(self, epochs: int, seed: int, since: torch.nn.Module | None = None) -> list[dict]:
        """Fine-tune the current model; with `anneal`, the decisions it makes and `since` does not are blended in
        over the first `anneal` of the batches. Returns each epoch's loss and learning rate (built-in trainer)."""
        if not epochs:
            return []
        regulariser = self.method.regulariser(self.model, self.example_inputs)
        if since is None or not self.config.anneal:
            return self.runner.finetune(self.model, epochs, seed, regulariser)
        with blending(self.model, since) as set_weight:
            return self.runner.finetune(self.model, epochs, seed, regulariser,
                                        on_batch=lambda done: set_weight(done / self.config.anneal))

    def dense_step(self) -> None:
        started = time.time()
        epochs = self.finetune(self.config.dense_epochs, self.config.seed)
        self.dense = copy.deepcopy(base_of(self.model)).eval()
        self.runner.teacher = self.dense
        self.record(0, [], started, epochs)

    def record(self, step: int, choices: list, started: float, epochs: list[dict]) -> None:
        """Evaluate the step's model, measure it (rank 0), and hand the record to the hooks."""
        model = self.model.eval()
        first = sum(len(entry.get("epochs", [])) for entry in self.trajectory.steps)
        entry = {"step": step, "decisions": [asdict(d) for c in choices for d in c.decisions],
                 "chosen": [c.target for c in choices],
                 "scores": {c.target: c.score for c in choices if not math.isnan(c.score)},
                 "epochs": [{"epoch": first + index, **epoch} for index, epoch in enumerate(epochs)],
                 "validation": self.runner.validation(model), "test": self.runner.test(model)}
        if distributed.is_main():
            compressed = compress(model, self.example_inputs)
            for measurement in self.measurements:
                entry.update(measurement(model, compressed))
        entry["seconds"] = round(time.time() - started, 1)
        entry = distributed.broadcast_object(entry)
        dense = self.trajectory.steps[0]["validation"] if self.trajectory.steps else entry["validation"]
        entry["drop"] = round(dense - entry["validation"], 12)  # accuracies are ratios: 0.9015 - 0.8915 is 0.01
        entry["within_tolerance"] = entry["drop"] <= self.config.max_drop
        self.trajectory.steps.append(entry)
        if entry["within_tolerance"]:
            self.trajectory.kept, self.kept_model = step, self.model
        self.notify("on_step", entry)

    def notify(self, event: str, value) -> None:
        if distributed.is_main():
            for hook in self.hooks:
                getattr(hook, event)(value)

    def choose(self, step: int, captured) -> list:
        choices = None
        if distributed.is_main():
            inputs = StepInputs(self.example_inputs, self.calibration, self.validation_batch,
                                random.Random(self.config.seed * 1000 + step), self.progress, self.config.lowering,
                                self.runner.device, self.config.latency_threads, self.runner.probe,
                                None if self.folder is None else self.folder.path,
                                self.config.latency_ratio, captured)
            choices = self.method.choose(self.model.eval(), inputs, self.config.per_step)
        return distributed.broadcast_object(choices)

    def apply(self, choices: list, captured) -> tuple[torch.nn.Module, list]:
        """The current model with `choices` applied, and the choices applied: all at once, else one by one,
        dropping those that cannot be applied together with the earlier ones (channels removed from a group in
        which a later choice zeroes channels)."""
        model = self.model.eval()

        def applied_with(choices: list) -> torch.nn.Module:
            return apply_plan(model, Plan(_decisions(choices)), self.example_inputs, captured)

        try:
            return _masked(applied_with(choices), choices), choices
        except (PlanError, PassError):
            if len(choices) == 1:
                raise
        applied = []
        for choice in choices:
            try:
                candidate = applied_with(applied + [choice])
            except (PlanError, PassError):
                continue
            applied.append(choice)
        return _masked(candidate if applied else model, applied), applied

    def run(self) -> Trajectory:
        """Step 0, then steps (capture once, choose, apply, fine-tune, record) until a stop rule holds."""
        steps = self.trajectory.steps
        if not steps:
            self.dense_step()
        while not (stop := self.stop_reason()):
            step = steps[-1]["step"] + 1
            started = time.time()
            captured = base_graph(self.model, self.example_inputs)  # scored and applied: weights unchanged
            choices = self.choose(step, captured)
            if not choices and self.method.name != "control":
                stop = "the method has nothing left to choose"
                break
            model, applied = self.apply(choices, captured)
            if choices and not applied:
                stop = "none of the chosen decisions can be applied"
                break
            if self.config.rewind:
                rewind(model, self.initial)
            previous, self.model, choices = self.model, model, applied
            epochs = self.finetune(self.config.epochs_per_step, self.config.seed * 1000 + step, since=previous)
            self.record(step, choices, started, epochs)
        self.trajectory.stopped = stop
        self.notify("on_end", self.trajectory)
        return self.trajectory

    def stop_reason(self) -> str:
        """The reason of the first stop rule that holds, or ""."""
        return next((reason for rule in STOP_RULES if (reason := rule(self))), "")

    def result(self) -> PruneResult:
        kept = self.trajectory.kept
        if self.trajectory.steps[-1]["step"] == kept:
            model = self.model
        elif self.folder is not None and (kept_model := self.folder.kept_model()) is not None:
            model = kept_model.to(next(self.model.parameters()).device)
        else:
            model = self.kept_model
        return PruneResult(model.eval(), plan_of(model), self.trajectory)


def _dropped_too_far(loop: _Loop) -> str:
    last = loop.trajectory.steps[-1]
    return "" if last["within_tolerance"] else \
        f"validation dropped {last['drop']:.4f} > max_drop {loop.config.max_drop}"


def _whole_plan_chosen(loop: _Loop) -> str:
    return f"method {loop.method.name!r} chose its whole plan in step 1" \
        if loop.method.once and loop.trajectory.steps[-1]["step"] > 0 else ""


def _budget_met(loop: _Loop) -> str:
    last, config = loop.trajectory.steps[-1], loop.config
    if last["step"] == 0:
        return ""
    if config.activations is not None and last["activations_linearised"] >= config.activations:
        return f"budget of {config.activations} activations met"
    if config.macs_ratio is not None and last["macs_ratio"] <= config.macs_ratio:
        return f"budget macs_ratio {config.macs_ratio} met"
    if config.latency_ratio is not None and last["latency_ratio"] <= config.latency_ratio:
        return f"budget latency_ratio {config.latency_ratio} met"
    return ""


def _steps_done(loop: _Loop) -> str:
    steps = loop.config.steps
    return f"{steps} steps done" if steps is not None and loop.trajectory.steps[-1]["step"] >= steps else ""


STOP_RULES = (_dropped_too_far, _whole_plan_chosen, _budget_met, _steps_done)  # checked before each step, in order


class Costs:
    """What the compressed step model costs against the dense one: layers, MACs, parameters; and what its plan
    removed."""

    def __init__(self, loop: _Loop):
        self.loop, self.dense = loop, None

    def __call__(self, model: torch.nn.Module, compressed) -> dict:
        if self.dense is None:
            self.dense = compressed.report.before if not self.loop.trajectory.steps else \
                compress(self.loop.dense, self.loop.example_inputs).report.before
        after = compressed.report.after
        return {"activations_linearised": len(plan_of(model).targets("linearize")),
                "blocks_removed": removed_blocks(plan_of(model)), "sparsity": weight_sparsity(model),
                "activations": after.activations, "weight_layers": after.weight_layers, "depth": after.depth,
                "params": after.params, "macs": after.macs, "macs_ratio": after.macs / self.dense.macs,
                "dense_weight_layers": self.dense.weight_layers}


class Latency:
    """The compressed step model's latency against the dense model's, on the loop's lowering and device."""

    def __init__(self, loop: _Loop):
        self.loop = loop

    def __call__(self, model: torch.nn.Module, compressed) -> dict:
        loop = self.loop
        timing = measure({"dense": loop.dense, "compressed": compressed.module}, loop.example_inputs,
                         lowering=loop.config.lowering, device=loop.runner.device,
                         threads=loop.config.latency_threads)["results"]
        return {"latency_ratio": timing["compressed"]["ratio"],
                "latency_ms": {name: result["median_ms"] for name, result in timing.items()}}


class Checkpoint:
    """The hook that keeps the run folder: after each step the checkpoint, the trajectory, the kept model where
    the step is within the tolerance, the step's model with `save_steps`; at the end the trajectory again."""

    def __init__(self, loop: _Loop):
        self.loop = loop

    def on_step(self, entry: dict) -> None:
        loop = self.loop
        base = base_of(loop.model)
        loop.folder.save_checkpoint({
            "plan": plan_of(loop.model).to_dict(), "state_dict": plain_state_dict(base), "masks": masks_of(base),
            "trajectory": loop.trajectory.to_dict(), "dense_state_dict": loop.dense.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            **({"initial_state_dict": loop.initial} if loop.initial is not None else {})})
        if entry["within_tolerance"]:
            loop.folder.save_model(loop.model)
        if loop.config.save_steps:
            loop.folder.save_model(loop.model, entry["step"])
        loop.folder.save_trajectory(loop.trajectory.to_dict())

    def on_end(self, trajectory: Trajectory) -> None:
        self.loop.folder.save_trajectory(trajectory.to_dict())


def loop_config(method: "str | Method", options: dict) -> LoopConfig:
    """The loop's settings for `method` (a name of `methods.METHODS`, or a method made with its options) and the
    `LoopConfig` fields in `options`; unknown names are an OptionError listing the valid ones."""
    options = known_fields("prune", options, LoopConfig)
    if isinstance(method, Method):
        given = sorted({"method_options", "selection", "only"} & set(options))
        if given:
            raise OptionError(f"give {', '.join(given)} to the method object, not to prune")
        options = {**options, "method_options": method.option_values(), "selection": method.selection,
                   "only": None if method.only is None else method.only.pattern}
        method = method.name
    return LoopConfig(method=method, **options)


def prune(model: torch.nn.Module, example_inputs, *, method: "str | Method" = "easier", data=None,
          train_config: TrainConfig | None = None, finetune: Callable | None = None,
          evaluate: Callable | None = None, test: Callable | None = None, calibration: list | None = None,
          objective: Objective | None = None, out: str | Path | None = None, resume: bool = False,
          device: str | None = None, progress: bool = True, hooks: tuple = (), **options) -> PruneResult:
    """Make `model` shallower with `method` (`methods.METHODS`: "easier", "tlc", "lacoot", "egp", "magnitude",
    "dsd2", "oneshot", "random", "control", or a method object such as `Tlc(rank="loss")`) by the fine-tuning loop
    (module docstring). A method's own options go in `method_options` (`Method.options`) or on the object. DSD²
    distils with its alpha and T unless `train_config` sets its own distillation. Options are the fields of
    `LoopConfig`. Give either `data`
    (an object with `train`, `validation` and `test`: datasets, as `data.fashion_mnist_splits` returns, or
    DataLoaders, used as they are, for the built-in trainer configured by `train_config`) or `finetune` and
    `evaluate` callables (then `calibration` batches for the methods that measure). With the built-in trainer,
    `objective` (`objectives.Denoising`: a diffusion model's denoiser) replaces classification: its loss trains,
    its score validates and tests, and calibration batches are its model inputs. `progress` prints a line per
    step (`hooks.StepLine`) and shows calibration bars (the trainer's bars follow `train_config.progress`); `hooks`
    (`hooks.CsvLog`, `hooks.TensorBoardLog`, or any with `on_step(entry)` and `on_end(trajectory)`) see each step's
    record, its training epochs' losses and learning rates included. A copy of the model, the
    example inputs and the calibration batches go to `device` ("cpu", "cuda", "cuda:N"; by default this rank's GPU
    where CUDA is available, else the CPU, as the command line does): the loop trains, scores,
    captures and measures latency there; its checkpoints load on a machine without that device. The caller's model
    is not modified."""
    config = loop_config(method, options)
    method = config.method
    device = str(distributed.device_for_rank()) if device is None else device
    if (data is None) == (finetune is None or evaluate is None):
        raise OptionError("give either data= (for the built-in trainer) or finetune= and evaluate= callables")
    if objective is not None and data is None:
        raise OptionError("an objective is trained by the built-in trainer: give data=, not finetune= callables")
    chosen = config.make_method()
    if objective is not None and chosen.distillation:
        raise OptionError(f"method {method!r} distils a classifier's logits: it cannot train the {objective.name} "
                          "objective")
    if data is None and chosen.needs_trainer:
        raise OptionError(f"method {method!r} trains with its own loss (distillation or a regulariser): it needs "
                          "the built-in trainer (data=), not finetune= callables")
    if data is not None:
        train_config = train_config or TrainConfig()
        if chosen.distillation and not train_config.distill:
            weight, temperature = chosen.distillation
            train_config = dataclasses.replace(train_config, distill=weight, temperature=temperature)
        runner = _BuiltIn(data, train_config, device, objective)
        calibration, validation_batch = _calibration(data, config.calibration_batches, train_config.batch_size,
                                                     objective)
    else:
        runner, validation_batch = _Callables(finetune, evaluate, test, device), None
        calibration = [batch if isinstance(batch, tuple) else (batch,) for batch in (calibration or [])]
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    model, example_inputs, calibration, validation_batch = _on_device(
        device, model, example_inputs, calibration, validation_batch)
    folder = _prepare_folder(out, resume)
    loop = _Loop(model, example_inputs, config, chosen, runner, calibration, validation_batch, folder, progress,
                 tuple(hooks))
    training = {} if data is None else train_config.to_dict()
    if objective is not None:
        training["objective"] = objective.describe()
    if resume:
        loop.resume(training)
    if not loop.trajectory.steps:
        loop.trajectory.training = training
    loop.run()
    return loop.result()


def _on_device(device: str, model: torch.nn.Module, *batches):
    """A copy of `model` and the tensors of `batches` (nested tuples and lists) on `device`: the loop trains,
    scores, captures and measures there."""
    return (private_copy(model).to(device),
            *(pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch) for batch in batches))


def _prepare_folder(out, resume: bool) -> RunFolder | None:
    if out is None:
        if resume:
            raise OptionError("resume needs the folder of the run (out=)")
        return None
    folder = RunFolder(out)
    if not resume and folder.holds_run():
        raise OptionError(f"{out} already holds a run; resume it or choose another folder")
    if distributed.is_main():
        folder.path.mkdir(parents=True, exist_ok=True)
    return folder
