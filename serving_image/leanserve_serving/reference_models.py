"""Reference models made on the spot: small, trained on synthetic tasks, deterministic.

Random weights make an accuracy gate meaningless, so these are trained (in
numpy, seconds on 2 cores) until they are good at a task with a known answer,
then written as ONNX with an evaluation set in the documented ``.npz`` format.
Nothing is downloaded.

- ``tabular``: a 64-128-64-4 MLP classifier (MatMul/Add/Relu, the ops ONNX
  Runtime quantizes), labels from a fixed random "teacher" network.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class ReferenceModel:
    """A model file, its evaluation data and the accuracy it reached on held-out data."""

    name: str
    model: Path
    evaluation: Path
    accuracy: float


def _teacher_labels(x: np.ndarray, rng: np.random.Generator, classes: int) -> np.ndarray:
    w1 = rng.normal(size=(x.shape[1], 16)) / np.sqrt(x.shape[1])
    w2 = rng.normal(size=(16, classes))
    return np.argmax(np.tanh(x @ w1) @ w2, axis=1)


Params = list[tuple[np.ndarray, np.ndarray]]


def _train_mlp(x: np.ndarray, y: np.ndarray, sizes: tuple[int, ...], rng: np.random.Generator,
               steps: int = 1500, lr: float = 3e-3, batch: int = 256) -> Params:  # fmt: skip
    """Softmax-cross-entropy MLP trained with Adam; returns [(W, b), ...]."""
    params = [
        (rng.normal(0, (2 / a) ** 0.5, (a, b)).astype(np.float32), np.zeros(b, np.float32))
        for a, b in itertools.pairwise(sizes)
    ]
    moments = [[np.zeros_like(p) for p in layer for _ in (0, 1)] for layer in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    onehot = np.eye(sizes[-1], dtype=np.float32)[y]
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x), batch)
        acts = [x[idx]]
        for i, (w, b) in enumerate(params):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0) if i < len(params) - 1 else z)
        logits = acts[-1] - acts[-1].max(1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        grad = (probs - onehot[idx]) / batch
        for i in reversed(range(len(params))):
            w, b = params[i]
            gw, gb = acts[i].T @ grad, grad.sum(0)
            if i:
                grad = (grad @ w.T) * (acts[i] > 0)
            new = []
            for j, (p, g) in enumerate(((w, gw), (b, gb))):
                m, v = moments[i][2 * j], moments[i][2 * j + 1]
                m[:] = beta1 * m + (1 - beta1) * g
                v[:] = beta2 * v + (1 - beta2) * g * g
                p = p - lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
                new.append(p.astype(np.float32))
            params[i] = (new[0], new[1])
    return params


def _mlp_onnx(params: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    nodes, inits, prev = [], [], "input"
    for i, (w, b) in enumerate(params):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == len(params) - 1
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], ["logits" if last else f"z{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "tabular_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", params[0][0].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", params[-1][0].shape[1]])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="leanserve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_tabular(out_dir: Path, seed: int = 7, eval_rows: int = 2000) -> ReferenceModel:
    """Train the tabular MLP classifier; write ``tabular.onnx`` and ``tabular-eval.npz``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = (64, 128, 64, 4)
    x = rng.normal(size=(12_000, sizes[0])).astype(np.float32)
    y = _teacher_labels(x, rng, sizes[-1])
    train_x, train_y = x[:-eval_rows], y[:-eval_rows]
    test_x, test_y = x[-eval_rows:], y[-eval_rows:]
    params = _train_mlp(train_x, train_y, sizes, rng)
    h = test_x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = np.maximum(h, 0)
    accuracy = float((h.argmax(1) == test_y).mean())
    model, evaluation = out_dir / "tabular.onnx", out_dir / "tabular-eval.npz"
    _mlp_onnx(params, model)
    np.savez(evaluation, input=test_x, labels=test_y.astype(np.int64))
    return ReferenceModel("tabular", model, evaluation, accuracy)
