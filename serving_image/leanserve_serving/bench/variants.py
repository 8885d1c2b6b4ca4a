"""Precision variants of a model: fp32 (as given), int8 dynamic, int8 static (QDQ), fp16 (GPU only).

A variant that cannot be built is reported with the reason, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve_serving.bench.evaldata import EvalData

log = logging.getLogger("leanserve.bench")

#: Rows of evaluation data used to calibrate static quantization.
CALIBRATION_ROWS = 256


@dataclass
class BuiltVariant:
    name: str
    path: Path | None
    status: str  # ok | failed | skipped
    reason: str = ""


class _Calibration:
    """ORT's CalibrationDataReader over the first rows of the evaluation data, a few at a time."""

    def __init__(self, data: EvalData, rows: int = CALIBRATION_ROWS, batch: int = 16) -> None:
        self.batches = [data.batch(i, batch) for i in range(0, min(rows, data.rows), batch)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantization tools log advice per tensor to the root logger; keep the bench's output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_variants(model: Path, data: EvalData, out_dir: Path, gpu: bool, names: list[str]) -> list[BuiltVariant]:
    """Build the requested variants into ``out_dir``."""
    with _quiet_quantizer():
        return _build(model, data, out_dir, gpu, names)


def _build(model: Path, data: EvalData, out_dir: Path, gpu: bool, names: list[str]) -> list[BuiltVariant]:
    built = []
    for name in names:
        try:
            if name == "fp32":
                built.append(BuiltVariant(name, model, "ok"))
            elif name == "int8-dynamic":
                built.append(BuiltVariant(name, _int8_dynamic(model, out_dir), "ok"))
            elif name == "int8-static":
                built.append(BuiltVariant(name, _int8_static(model, data, out_dir), "ok"))
            elif name == "fp16":
                if not gpu:
                    built.append(BuiltVariant(name, None, "skipped", "no GPU: fp16 is only measured on GPU types"))
                else:
                    built.append(BuiltVariant(name, _fp16(model, out_dir), "ok"))
            else:
                built.append(BuiltVariant(name, None, "failed", f"unknown variant {name!r}"))
        except Exception as exc:  # a variant that fails to build is reported, not fatal
            log.warning("variant %s failed to build: %s", name, exc)
            built.append(BuiltVariant(name, None, "failed", f"{type(exc).__name__}: {exc}"))
    return built


def _int8_dynamic(model: Path, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = out_dir / "int8-dynamic.onnx"
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    return out


def _int8_static(model: Path, data: EvalData, out_dir: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_dir / "int8-static-prepared.onnx"
    quant_pre_process(str(model), str(prepared))  # shape inference and graph clean-up ORT recommends first
    out = out_dir / "int8-static.onnx"
    quantize_static(
        str(prepared),
        str(out),
        _Calibration(data),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out


def _fp16(model: Path, out_dir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = out_dir / "fp16.onnx"
    converted = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    onnx.save(converted, str(out))
    return out
