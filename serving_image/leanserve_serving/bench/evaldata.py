"""Evaluation data for the accuracy gate, checked against the model's inputs.

Formats:

- ``.npz`` (numpy ``savez``): one array per model input, named like the input
  (a model with a single input may call it ``x`` or ``inputs`` instead), all
  with the same number of rows, and ``labels`` (or ``y``) with one label per row:
  integer class ids for accuracy/top1, target values for mse. For the cosine
  metric labels are optional (the fp32 outputs are the reference).
  Sequence data (with an ``attention_mask`` input) may be right-padded to the set's longest
  row, as tokenizers pad: :meth:`EvalData.batch` cuts each batch back to its own longest.
- ``.jsonl``: one JSON object per line, ``{"text": "...", "label": 1}``, for
  models with a single string (BYTES) input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve_serving.tensors import TensorSpec

#: The input that marks real tokens (1) and padding (0) in sequence data, as transformers name it.
MASK_INPUT = "attention_mask"


class EvalDataError(ValueError):
    """Evaluation data that does not fit the model, with what to fix."""


@dataclass
class EvalData:
    """Inputs by model input name, and labels (or None), ``rows`` rows each."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def lengths(self) -> np.ndarray | None:
        """Tokens per row of sequence data (up to the row's last attended column), None without an
        ``attention_mask`` [N, seq] input."""
        mask = self.inputs.get(MASK_INPUT)
        if mask is None or mask.ndim != 2:
            return None
        attended = mask != 0
        last = mask.shape[1] - np.argmax(attended[:, ::-1], axis=1)
        return np.where(attended.any(axis=1), last, 0)

    def batch(self, start: int, size: int, trim: bool = True) -> dict[str, np.ndarray]:
        """Rows ``start .. start+size`` (wrapping around), for latency runs at any batch size.

        Sequence data is cut to the batch's own longest row unless ``trim`` is False: see :meth:`take`.
        """
        return self.take(np.arange(start, start + size) % self.rows, trim)

    def take(self, rows: np.ndarray, trim: bool = True) -> dict[str, np.ndarray]:
        """The given rows, as a batch for the model.

        Where the data has an ``attention_mask`` input of shape [N, seq], every input of that same shape
        (``input_ids``, ``token_type_ids``...) loses the trailing columns no row of this batch attends to: the
        model runs each batch padded to its own longest row, as a server that pads a batch does, so latency by
        batch size follows the evaluation set's length distribution instead of all rows at the set's longest.
        (A transformer's masked outputs do not depend on that padding.) Other data comes unchanged.

        ``trim=False`` keeps the set's full width, for consumers that stack batches and need one shape:
        ONNX Runtime's histogram calibrators (Entropy, Percentile) refuse batches of different widths.
        """
        batch = {name: array[rows] for name, array in self.inputs.items()}
        mask = batch.get(MASK_INPUT)
        if not trim or mask is None or mask.ndim != 2:
            return batch
        attended = np.flatnonzero(mask.any(axis=0))
        width = int(attended[-1]) + 1 if len(attended) else 1
        if width == mask.shape[1]:
            return batch
        return {name: a[:, :width] if a.shape == mask.shape else a for name, a in batch.items()}


def load_eval_data(path: Path, specs: list[TensorSpec], metric: str) -> EvalData:
    """Load ``path`` and check it against the model's input specs."""
    if not path.is_file():
        raise EvalDataError(f"evaluation data not found: {path}")
    if path.suffix == ".npz":
        data = _load_npz(path, specs)
    elif path.suffix in (".jsonl", ".ndjson"):
        data = _load_jsonl(path, specs)
    else:
        raise EvalDataError(f"{path.name}: unknown evaluation format {path.suffix!r}; use .npz or .jsonl")
    if data.labels is None and metric != "cosine":
        raise EvalDataError(f"{path.name}: metric {metric} needs labels ('labels' or 'y' in the .npz)")
    return data


LABEL_KEYS = ("labels", "y")


def read_npz(path: Path) -> EvalData:
    """An ``.npz`` as it is: every array but the labels is an input (not yet checked against a model)."""
    try:
        archive = dict(np.load(path, allow_pickle=False))  # never unpickle data from outside
    except ValueError as exc:
        raise EvalDataError(f"{path.name}: not a plain .npz (object arrays are refused): {exc}") from None
    except OSError as exc:
        raise EvalDataError(f"{path.name}: cannot read: {exc}") from None
    labels = next((archive.pop(k) for k in LABEL_KEYS if k in archive), None)
    for k in LABEL_KEYS:
        archive.pop(k, None)
    return EvalData(archive, labels)


def _load_npz(path: Path, specs: list[TensorSpec]) -> EvalData:
    raw = read_npz(path)
    archive, labels = dict(raw.inputs), raw.labels
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        array = archive.pop(spec.name, None)
        if array is None and len(specs) == 1:
            array = archive.pop("x", archive.pop("inputs", None))
        if array is None:
            raise EvalDataError(
                f"{path.name}: no array for model input '{spec.name}' "
                f"(found {sorted(archive) or 'nothing else'}); name arrays after the model's inputs"
            )
        _check(path.name, spec, array)
        inputs[spec.name] = array.astype(np.float32) if spec.datatype == "FP32" and array.dtype != np.float32 else array
    rows = {len(a) for a in inputs.values()}
    if len(rows) != 1:
        raise EvalDataError(f"{path.name}: inputs have different row counts {sorted(rows)}")
    if labels is not None and len(labels) != rows.pop():
        raise EvalDataError(f"{path.name}: {len(labels)} labels for {len(next(iter(inputs.values())))} rows")
    return EvalData(inputs, labels)


def _check(source: str, spec: TensorSpec, array: np.ndarray) -> None:
    if array.ndim != len(spec.shape):
        raise EvalDataError(
            f"{source}: '{spec.name}' has shape {list(array.shape)}, the model expects {list(spec.shape)} (rows first)"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if axis and want not in (-1, got):
            raise EvalDataError(
                f"{source}: '{spec.name}' has shape {list(array.shape)}, the model expects {list(spec.shape)}"
            )
    if spec.datatype == "BYTES" and array.dtype.kind not in "US":
        raise EvalDataError(f"{source}: '{spec.name}' must hold strings for a BYTES input")
    if spec.datatype != "BYTES" and array.dtype.kind not in "biuf":
        raise EvalDataError(f"{source}: '{spec.name}' must hold numbers, found {array.dtype}")


def _load_jsonl(path: Path, specs: list[TensorSpec]) -> EvalData:
    if len(specs) != 1 or specs[0].datatype != "BYTES":
        raise EvalDataError(f"{path.name}: JSON Lines data is for models with one string input; use .npz")
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            labels.append(row.get("label"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvalDataError(f'{path.name}:{number}: expected {{"text": ..., "label": ...}}: {exc}') from None
    if not texts:
        raise EvalDataError(f"{path.name}: no rows")
    has_labels = all(label is not None for label in labels)
    return EvalData({specs[0].name: np.array(texts, dtype=object)}, np.array(labels) if has_labels else None)
