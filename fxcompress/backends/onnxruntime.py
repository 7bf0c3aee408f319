"""ONNX export (torch.onnx's dynamo exporter), `onnx.checker`, and an ONNX Runtime session wrapped to take and
return torch tensors: on the CPU, or on ONNX Runtime's CUDA provider for CUDA inputs (an error where that provider
is not installed, never a silent fall back to the CPU)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..capture import EXPORT_LOCK, export_arguments, private_copy
from ..errors import MissingDependencyError


def _require():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise MissingDependencyError(f"the onnxruntime lowering needs {error.name}: "
                                     "pip install 'fxcompress[onnx]'") from error
    return onnx, onnxruntime


def export_onnx(model, example_inputs, path: str | Path, dynamic_batch: bool = False, *, opset: int | None = None,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write a private copy of `model` as a self-contained .onnx file (weights inside), with a symbolic batch
    axis if asked, the given opset, input and output names and metadata (string properties), and check it. The
    exporter traces with torch.export: it holds the same lock."""
    onnx, _ = _require()
    path = Path(path)
    example_inputs, dynamic_shapes = export_arguments(example_inputs, dynamic_batch)
    with EXPORT_LOCK:
        torch.onnx.export(private_copy(model), example_inputs, str(path), dynamo=True, external_data=False,
                          dynamic_shapes=dynamic_shapes, opset_version=opset, input_names=input_names,
                          output_names=output_names, verbose=False)
    if metadata:
        exported = onnx.load(str(path))
        for key, value in metadata.items():
            exported.metadata_props.add(key=key, value=value)
        onnx.save(exported, str(path))
    onnx.checker.check_model(str(path))
    return path


class OnnxRuntimeModule:
    """Runs an exported model in ONNX Runtime, with torch tensors in and out."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        _, ort = _require()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # idle worker threads must not spin: they would steal the cores of whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingDependencyError("the onnxruntime lowering on CUDA inputs needs ONNX Runtime's CUDA "
                                             "provider (pip install onnxruntime-gpu); none is installed here")
            providers.insert(0, "CUDAExecutionProvider")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs):
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs)}
        device = inputs[0].device if inputs else torch.device("cpu")
        outputs = [torch.from_numpy(array).to(device) for array in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def module(model, example_inputs, path: str | Path | None = None, dynamic_batch: bool = False):
    """An ONNX Runtime session of `model`, on the CUDA provider for CUDA inputs (through host copies), else on
    the CPU."""
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="fxcompress-")) / "model.onnx"
    device = example_inputs[0].device.type if example_inputs else "cpu"
    return OnnxRuntimeModule(export_onnx(model, example_inputs, path, dynamic_batch), device)
