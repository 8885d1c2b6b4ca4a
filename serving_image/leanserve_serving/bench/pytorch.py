"""PyTorch models for the bench: TorchScript files exported to ONNX with a dynamic batch axis.

Only TorchScript archives (``torch.jit.save``) are accepted. A plain pickled
``nn.Module`` (``torch.save(model)``) runs arbitrary code when it is loaded, and
leanserve never unpickles what it is given; script or trace the model first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PyTorchModelError(ValueError):
    """A PyTorch file that cannot be turned into ONNX, and why."""


def input_names(module: object) -> list[str]:
    """The argument names of the scripted module's ``forward`` (without ``self``)."""
    schema = module.forward.schema  # type: ignore[attr-defined]
    return [a.name for a in schema.arguments[1:]]


def export_to_onnx(path: Path, samples: dict[str, np.ndarray], out: Path) -> Path:
    """Load the TorchScript model at ``path`` and export it to ONNX at ``out``.

    ``samples`` maps input names to example arrays (rows first); the arrays of an
    ``.npz`` evaluation file named after ``forward``'s arguments, or the single
    array of a single-input model.
    """
    try:
        import torch
    except ImportError as exc:
        raise PyTorchModelError(
            "PyTorch models need torch, which is not installed here (the leanserve serving images leave it "
            "out: PyPI's build with its CUDA libraries is over 3 GB for one export). Export the model to ONNX "
            "(torch.onnx.export) and set format: onnx, or run leanserve bench where the torch extra is installed "
            "(pip install 'leanserve[torch]')"
        ) from exc
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and friends for non-TorchScript files
        raise PyTorchModelError(
            f"{path.name} is not a TorchScript archive ({type(exc).__name__}); a pickled nn.Module would run "
            "code on load, so it is refused: save the model with torch.jit.save(torch.jit.script(model), path)"
        ) from None
    module.eval()
    names = input_names(module)
    if len(names) == 1 and len(samples) == 1:
        samples = {names[0]: next(iter(samples.values()))}
    missing = [n for n in names if n not in samples]
    if missing:
        raise PyTorchModelError(f"{path.name}: forward() takes {names}; no evaluation arrays for {missing}")
    example = tuple(torch.from_numpy(np.ascontiguousarray(samples[n][:2])) for n in names)
    with torch.no_grad():
        outputs = module(*example)
    count = len(outputs) if isinstance(outputs, tuple | list) else 1
    output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    torch.onnx.export(
        module,
        example,
        str(out),
        input_names=names,
        output_names=output_names,
        opset_version=17,
        dynamic_axes={n: {0: "batch"} for n in names + output_names},
        dynamo=False,
    )
    return out
