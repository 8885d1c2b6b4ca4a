"""Small ONNX models made by the suite (no downloads): built with onnx.helper from seeded weights.

- ``mlp``: the 64-512-512-2 classifier of the serving benchmark (input ``input``
  FP32 [batch, 64], output ``logits`` FP32 [batch, 2]);
- ``seq``: input FP32 [batch, seq, 8] with a free sequence length, mean over the
  sequence then a linear layer (requests of different lengths must not batch together);
- ``text``: input BYTES [batch], output the upper-cased text (for the semantic cache).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="leanserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_mlp(path: Path, sizes: tuple[int, ...] = (64, 512, 512, 2), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = rng.normal(0, (2 / fan_in) ** 0.5, (fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0, 0.01, fan_out).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = "logits" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if last else f"z{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return _save(graph, path)


def make_seq(path: Path, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 2)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["scores"]),
        ],
        "seq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    return _save(graph, path)


def make_text(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("StringNormalizer", ["text"], ["normalized"], case_change_action="UPPER", locale="C")],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("normalized", TensorProto.STRING, ["batch"])],
    )
    return _save(graph, path)


def make_log(path: Path) -> Path:
    """``log``: the natural log of an FP32 [batch, 4] input, so that negative inputs give NaN, zero gives
    -inf and infinity gives inf (for the non-finite outputs JSON cannot carry)."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path)


def make_kinds(path: Path) -> Path:
    """``kinds``: BOOL, FP16 and INT64 inputs [batch, 3], each answered in its own datatype (not, doubled,
    negated): the fixed-size datatypes of the binary extension other than FP32."""
    graph = helper.make_graph(
        [
            helper.make_node("Not", ["flag"], ["flag_out"]),
            helper.make_node("Add", ["half", "half"], ["half_out"]),
            helper.make_node("Neg", ["count"], ["count_out"]),
        ],
        "kinds",
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, ["batch", 3]),
            helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", 3]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("flag_out", TensorProto.BOOL, ["batch", 3]),
            helper.make_tensor_value_info("half_out", TensorProto.FLOAT16, ["batch", 3]),
            helper.make_tensor_value_info("count_out", TensorProto.INT64, ["batch", 3]),
        ],
    )
    return _save(graph, path)
