"""Precision variants of a model: fp32 (as given), int8 dynamic, int8 static (QDQ), fp16 (GPU only).

A variant that cannot be built is reported with the reason, never dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve_serving.bench.evaldata import EvalData

log = logging.getLogger("leanserve.bench")

#: Rows of evaluation data used to calibrate static quantization, and rows per calibration batch (few: a
#: calibrator holds every quantized tensor of a batch, for 200 tensors of a transformer a few MB per row).
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 4


@dataclass(frozen=True)
class QuantKnobs:
    """The quantizer's settings that trade accuracy for nothing but build time (see bench.quant_search)."""

    per_channel: bool
    """One weight scale per output channel instead of one per tensor: smaller weight error."""
    reduce_range: bool
    """7-bit weights: avoids overflow on CPUs without VNNI, at some precision."""
    calibration: str | None = None
    """Static only: how activation ranges are read from calibration data (MinMax, Entropy, Percentile)."""
    op_types: tuple[str, ...] | None = None
    """Static only: op types quantized; None: every op type ORT's QDQ quantizer supports."""


#: The whole-model recipes behind ``int8-dynamic`` and ``int8-static`` when no gate asks for better.
PLAIN_DYNAMIC = QuantKnobs(per_channel=False, reduce_range=False)
PLAIN_STATIC = QuantKnobs(per_channel=True, reduce_range=False, calibration="MinMax")


@dataclass
class BuiltVariant:
    name: str
    path: Path | None
    status: str  # ok | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    """How long the build took: what one more build of a recipe search is expected to cost."""


class _Calibration:
    """ORT's CalibrationDataReader over the first rows of the evaluation data, a few at a time.

    ORT's calibrators keep every intermediate tensor of the batches of one ``collect_data`` call (gigabytes
    for a transformer over long sequences), so quantize_static is told to collect batch by batch
    (``CALIBRATION_STRIDE``): ``__len__`` and ``set_range`` are what it needs for that. Each batch is cut to
    its own longest row (EvalData.batch), which one batch per call allows.
    """

    def __init__(self, data: EvalData, rows: int = CALIBRATION_ROWS, batch: int = CALIBRATION_BATCH) -> None:
        self.batches = [data.batch(i, min(batch, data.rows - i)) for i in range(0, min(rows, data.rows), batch)]
        self.position, self.end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position, self.end = 0, len(self.batches)


#: Batches per calibration ``collect_data`` call: one, so memory holds one batch's intermediate tensors.
CALIBRATION_STRIDE = 1


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ORT's quantization tools log advice per tensor to the root logger, and its calibrators print to
    stdout (whose last line the CLI keeps for its JSON); keep the bench's output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def build_variants(model: Path, data: EvalData, out_dir: Path, gpu: bool, names: list[str]) -> list[BuiltVariant]:
    """Build the requested variants into ``out_dir``."""
    with quiet_quantizer():
        return _build(model, data, out_dir, gpu, names)


def _build(model: Path, data: EvalData, out_dir: Path, gpu: bool, names: list[str]) -> list[BuiltVariant]:
    built = []
    for name in names:
        start = time.perf_counter()
        variant = _build_one(name, model, data, out_dir, gpu)
        variant.seconds = time.perf_counter() - start
        built.append(variant)
    return built


def _build_one(name: str, model: Path, data: EvalData, out_dir: Path, gpu: bool) -> BuiltVariant:
    try:
        if name == "fp32":
            return BuiltVariant(name, model, "ok")
        if name == "int8-dynamic":
            return BuiltVariant(name, _int8_dynamic(model, out_dir), "ok")
        if name == "int8-static":
            return BuiltVariant(name, _int8_static(model, data, out_dir), "ok")
        if name == "fp16":
            if not gpu:
                return BuiltVariant(name, None, "skipped", "no GPU: fp16 is only measured on GPU types")
            return BuiltVariant(name, _fp16(model, out_dir), "ok")
        return BuiltVariant(name, None, "failed", f"unknown variant {name!r}")
    except Exception as exc:  # a variant that fails to build is reported, not fatal
        log.warning("variant %s failed to build: %s", name, exc)
        return BuiltVariant(name, None, "failed", f"{type(exc).__name__}: {exc}")


def _int8_dynamic(model: Path, out_dir: Path) -> Path:
    out = out_dir / "int8-dynamic.onnx"
    build_dynamic(model, out, PLAIN_DYNAMIC)
    return out


def _int8_static(model: Path, data: EvalData, out_dir: Path) -> Path:
    prepared = prepare_static(model, out_dir / "int8-static-prepared.onnx")
    out = out_dir / "int8-static.onnx"
    build_static(prepared, out, data, PLAIN_STATIC)
    return out


def build_dynamic(model: Path, out: Path, knobs: QuantKnobs, excluded: tuple[str, ...] = ()) -> None:
    """INT8 weights, activations quantized at run time; ``excluded`` nodes (by name) stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(model),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=knobs.per_channel,
        reduce_range=knobs.reduce_range,
        nodes_to_exclude=list(excluded),
    )


def prepare_static(model: Path, out: Path) -> Path:
    """Shape inference and the graph clean-up ORT recommends before static quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(model), str(out))
    return out


def build_static(
    prepared: Path,
    out: Path,
    data: EvalData,
    knobs: QuantKnobs,
    excluded: tuple[str, ...] = (),
    calibration_cache: Path | None = None,
) -> None:
    """QDQ INT8 with activation ranges calibrated on the evaluation data's first rows.

    ``calibration_cache`` (a JSON file ORT writes on the first call and reads after) saves re-running
    calibration when only the nodes or the weight knobs change; it is only valid for one calibration
    method and one set of op types.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    assert knobs.calibration is not None, "static quantization needs a calibration method"
    quantize_static(
        str(prepared),
        str(out),
        _Calibration(data),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(knobs.op_types) if knobs.op_types else None,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=knobs.per_channel,
        reduce_range=knobs.reduce_range,
        nodes_to_exclude=list(excluded),
        calibrate_method=CalibrationMethod[knobs.calibration],
        calibration_cache_path=str(calibration_cache) if calibration_cache else None,
        extra_options={"CalibStridedMinMax": CALIBRATION_STRIDE},
    )


def _fp16(model: Path, out_dir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = out_dir / "fp16.onnx"
    converted = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    onnx.save(converted, str(out))
    return out
