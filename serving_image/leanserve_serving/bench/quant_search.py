"""Accuracy-aware INT8 quantization: when the whole-model INT8 variant breaks the accuracy gate, search
for a recipe that keeps it, the fastest found, in bounded time.

The way Intel Neural Compressor's accuracy-aware tuning works with ONNX Runtime: first the quantizer's
knobs that cost nothing at run time (per-channel weights, reduced range, for static quantization the
calibration method and the op types), each a whole model built and measured; then the nodes whose
quantization moves the model's output most are kept in fp32, a few more at each step, with the knobs
that moved the output least, and once some set of them keeps the gate, each is tried back in INT8. Every
candidate is measured exactly as the bench measures a variant (``measure.quality`` on all evaluation rows,
against fp32) and checked against the gate as the planner checks it; among those within the gate the
fastest is kept, timed at a representative batch size.

Ranking by building one model per node would cost a build per node. Instead, one fp32 session emulates
quantization (weights rounded to INT8 in numpy, activations through DynamicQuantizeLinear and
DequantizeLinear), each node's emulation switched on by an input: ranking costs one pass per node over
a few evaluation rows, the rows fp32 decides by the thinnest margin.

Pure parts first (orders, schedules, the choice, the budget); ONNX Runtime after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from leanserve_serving.bench import measure
from leanserve_serving.bench.evaldata import EvalData
from leanserve_serving.bench.variants import (
    PLAIN_DYNAMIC,
    PLAIN_STATIC,
    QuantKnobs,
    build_dynamic,
    build_static,
    prepare_static,
    quiet_quantizer,
)
from leanserve_serving.profile import QuantRecipe

Method = Literal["dynamic", "static"]

#: The variants the search can improve, and the quantizer behind each.
METHODS: dict[str, Method] = {"int8-dynamic": "dynamic", "int8-static": "static"}

#: Default time budget of one variant's search, in seconds.
DEFAULT_BUDGET_S = 300.0

#: Op types whose weights (and inputs) are ranked and may be kept in fp32; static recipes may quantize only these.
MATMUL_OPS = ("MatMul", "Gemm", "Conv")

#: Throughputs closer than this are a tie (timing noise): fewer nodes kept in fp32 wins it.
THROUGHPUT_TIE = 0.03

#: Share of the budget left that the sensitivity ranking may use, and its fewest and most rows (past a few
#: dozen of the thinnest-margin rows, more rows change the order little and cost a pass per node each).
RANKING_SHARE = 1 / 4
MIN_PROBE_ROWS = 8
MAX_PROBE_ROWS = 64

#: Ranking entries a recipe keeps.
RECIPE_TOP = 5

Progress = Callable[[str], None]


# ---- pure: what to try, in which order, and what to keep ------------------------------------------------


def knob_order(method: Method, vnni: bool) -> list[QuantKnobs]:
    """Whole-model recipes to try before keeping any node in fp32, cheapest first.

    Per-channel weights first: they cut the weight error of transformers' outlier columns at no run-time
    cost. Reduced range (7-bit weights) only helps CPUs without VNNI, where 8-bit products can saturate;
    with VNNI (``vnni``) it only loses precision, so it is not tried. Static recipes quantize the matrix
    products only (attention masks and softmax rarely survive INT8) and reuse one calibration (ORT's
    calibration cache) before paying for a histogram one (Percentile, Entropy).
    """
    if method == "dynamic":
        knobs = [
            QuantKnobs(per_channel=True, reduce_range=False),
            QuantKnobs(per_channel=True, reduce_range=True),
            QuantKnobs(per_channel=False, reduce_range=True),
        ]
    else:
        knobs = [
            QuantKnobs(True, False, "MinMax", MATMUL_OPS),
            QuantKnobs(True, True, "MinMax", MATMUL_OPS),
            QuantKnobs(False, False, "MinMax", MATMUL_OPS),
            QuantKnobs(True, False, "Percentile", MATMUL_OPS),
            QuantKnobs(True, False, "Entropy", MATMUL_OPS),
        ]
    return [k for k in knobs if not (vnni and k.reduce_range)]


def last_resort_knobs(method: Method) -> list[QuantKnobs]:
    """Whole-model recipes tried only when nothing else kept the gate: static INT8 of every op type with a
    histogram calibration, the costliest builds and the likeliest to fail where MinMax already did."""
    if method == "dynamic":
        return []
    return [QuantKnobs(True, False, "Percentile", None), QuantKnobs(True, False, "Entropy", None)]


#: CPU flags of 8-bit dot-product instructions (no saturation: reduced range buys nothing).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies 8-bit integers without saturating (VNNI or AMX), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in VNNI_FLAGS)


def plain_knobs(method: Method) -> QuantKnobs:
    """The whole-model recipe the bench builds without a gate (variants.PLAIN_*)."""
    return PLAIN_DYNAMIC if method == "dynamic" else PLAIN_STATIC


def exclusion_schedule(nodes: int) -> list[int]:
    """How many of the most sensitive nodes to keep in fp32 at each step: one more at a time while each
    is a large share of the error, then half as many again, never all of them (that is fp32, slower)."""
    counts, k = [], 1
    while k < nodes:
        counts.append(k)
        k = k + 1 if k < 4 else k + k // 2
    return counts


def within_gate(drop: float, gate: float) -> bool:
    """The planner's own test (a drop over the gate rejects a variant), so what passes here passes there;
    a NaN drop never passes."""
    return drop <= gate


@dataclass
class Trial:
    """One recipe, built and measured."""

    knobs: QuantKnobs
    excluded: tuple[str, ...]
    value: float
    drop: float
    error: float
    """Squared output error against fp32 over the reference's mean square: ranks recipes whose drops tie."""
    seconds: float
    path: Path | None
    throughput: float | None = None
    """Rows per second at the search's batch size; measured only for trials within the gate."""


def fastest(trials: list[Trial], gate: float, floor: float = 0.0) -> Trial | None:
    """The fastest trial within the gate, and faster than ``floor`` (fp32's rows/s) by more than timing noise:
    a recipe no faster than fp32 buys nothing.

    One that keeps a superset of another's fp32 nodes with the same knobs cannot be faster (it only adds
    fp32 work), whatever its timing said; among the rest a near tie (timing noise) goes to the one keeping
    fewer nodes in fp32.
    """
    passing = [t for t in trials if within_gate(t.drop, gate) and (t.throughput or 0.0) > floor * (1 + THROUGHPUT_TIE)]
    undominated = [t for t in passing if not any(_dominates(other, t) for other in passing)]
    if not undominated:
        return None
    top = max(t.throughput or 0.0 for t in undominated)
    close = [t for t in undominated if (t.throughput or 0.0) >= top * (1 - THROUGHPUT_TIE)]
    return min(close, key=lambda t: (len(t.excluded), -(t.throughput or 0.0)))


def _dominates(a: Trial, b: Trial) -> bool:
    """``a`` is ``b`` with fewer nodes kept in fp32."""
    return a.knobs == b.knobs and set(a.excluded) < set(b.excluded)


def exclusion_base(trials: list[Trial]) -> QuantKnobs:
    """The knobs to keep nodes in fp32 with: those whose whole-model recipe moved the output least."""
    whole = [t for t in trials if not t.excluded]
    return min(whole, key=lambda t: (t.error, t.drop)).knobs


def ranked(scores: dict[str, float]) -> list[str]:
    """Node names, most sensitive first (ties by name, so the order is reproducible)."""
    return sorted(scores, key=lambda name: (-scores[name], name))


def output_error(out: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared difference from the reference over its mean square (scale-free)."""
    ref = reference.astype(np.float64)
    diff = out.reshape(ref.shape).astype(np.float64) - ref
    return float(np.mean(diff**2) / (np.mean(ref**2) or 1.0))


def probe_rows(reference: np.ndarray, metric: str, count: int) -> np.ndarray:
    """The rows the ranking runs on: for accuracy, those fp32 decides by the thinnest margin between its
    top two outputs, where a small change of output flips a prediction; otherwise the first rows."""
    rows = len(reference)
    count = min(count, rows)
    flat = reference.reshape(rows, -1)
    if metric not in ("accuracy", "top1") or flat.shape[1] < 2:
        return np.arange(count)
    top2 = np.sort(flat, axis=1)[:, -2:]
    return np.sort(np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:count])


def probe_row_count(seconds_per_row: float, nodes: int, seconds: float, rows: int) -> int:
    """Rows per ranking pass so that a pass per node (and one reference pass) fits ``seconds``."""
    fit = int(seconds / (nodes + 1) / max(seconds_per_row, 1e-9))
    return max(min(MIN_PROBE_ROWS, rows), min(fit, rows, MAX_PROBE_ROWS))


def describe(knobs: QuantKnobs, excluded: tuple[str, ...] = ()) -> str:
    """A recipe in a few words, for progress lines."""
    words = ["per-channel" if knobs.per_channel else "per-tensor"]
    if knobs.reduce_range:
        words.append("reduce-range")
    if knobs.calibration:
        words.append(knobs.calibration)
    if knobs.calibration and knobs.op_types:
        words.append("/".join(knobs.op_types) + " only")
    if excluded:
        head = ", ".join(excluded[:3]) + (", ..." if len(excluded) > 3 else "")
        words.append(f"{len(excluded)} node{'s' if len(excluded) > 1 else ''} in fp32 ({head})")
    return ", ".join(words)


@dataclass
class Budget:
    """Seconds the search may take from its start; a step starts only if it is expected to fit."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, expected_s: float) -> bool:
        return self.left() > 0 and self.left() >= expected_s


# ---- the model's quantizable nodes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A node the quantizer would quantize: which input is a weight, which are quantized from their range."""

    name: str
    weight: int | None
    activations: tuple[int, ...]
    channel_axis: int
    symmetric: bool = True
    """Weights are symmetric INT8; a Gather's table is quantized like an activation (asymmetric UINT8)."""


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name, ``OpType:first_output``: the quantizer excludes nodes by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for node in model.graph.node:
        if node.name:
            continue
        name = f"{node.op_type}:{node.output[0] if node.output else len(taken)}"
        while name in taken:
            name += "'"
        node.name = name
        taken.add(name)
    return model


def quantizable(model: onnx.ModelProto, method: Method, op_types: tuple[str, ...] | None = None) -> list[Target]:
    """The nodes ``quantize_dynamic`` or ``quantize_static`` would quantize that carry the error: matrix
    products and convolutions (dynamic: with constant weights only, Gemm not at all), and embedding tables."""
    constant = {init.name for init in model.graph.initializer}
    targets = []
    for node in model.graph.node:
        op = node.op_type
        if op_types is not None and op not in op_types:
            continue
        if op in MATMUL_OPS and len(node.input) > 1:
            const_b = node.input[1] in constant
            if method == "dynamic" and (op == "Gemm" or not const_b):
                continue
            activations = (0,) if const_b else (0, 1)
            targets.append(Target(node.name, 1 if const_b else None, activations, _channel_axis(node)))
        elif op == "Gather" and node.input and node.input[0] in constant:
            targets.append(Target(node.name, 0, (), 0, symmetric=False))
    return targets


def _channel_axis(node: onnx.NodeProto) -> int:
    """The weight axis of output channels: rows of a Conv kernel, columns of a MatMul's (or Gemm's) B."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return -1


# ---- sensitivity: one emulating fp32 session, one pass per node -------------------------------------------


def fake_quantized(weight: np.ndarray, target: Target, knobs: QuantKnobs) -> np.ndarray:
    """``weight`` rounded as the quantizer rounds it: symmetric INT8 (7-bit with reduce_range), per tensor
    or per output channel; a Gather's table as an asymmetric UINT8 tensor."""
    w = weight.astype(np.float32)
    if not target.symmetric:
        low, high = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        scale = (high - low) / 255 or 1.0
        zero = np.round(-low / scale)
        return ((np.clip(np.round(w / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)
    qmax = 64 if knobs.reduce_range else 127
    if knobs.per_channel and w.ndim >= 2:
        axis = target.channel_axis % w.ndim
        amax = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True)
    else:
        amax = np.abs(w).max()
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32)


SWITCH = "leanserve_quant_switch"


def emulation_model(model: onnx.ModelProto, targets: list[Target], knobs: QuantKnobs) -> onnx.ModelProto:
    """A copy of ``model`` with input ``SWITCH`` (float[len(targets)]): where its entry is 1 a target
    runs on fake-quantized weights and activations, where it is 0 exactly as in fp32."""
    emu = onnx.ModelProto()
    emu.CopyFrom(model)
    graph = emu.graph
    graph.input.append(helper.make_tensor_value_info(SWITCH, TensorProto.FLOAT, [len(targets)]))
    weights = {init.name: init for init in graph.initializer}
    index = {t.name: (k, t) for k, t in enumerate(targets)}
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.name in index:
            k, target = index[node.name]
            added, constants = _switched_inputs(node, k, target, knobs, weights)
            graph.node.extend(added)
            graph.initializer.extend(constants)
        graph.node.append(node)
    return emu


def _switched_inputs(
    node: onnx.NodeProto,
    k: int,
    target: Target,
    knobs: QuantKnobs,
    weights: dict[str, onnx.TensorProto],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and their constants) that feed ``node`` ``x + s * (q(x) - x)`` for its quantized inputs, ``s``
    the switch's entry k; rewires ``node`` to them."""
    p = f"leanserve_q{k}_"
    initializers = [numpy_helper.from_array(np.array(k, np.int64), p + "index")]
    added = [helper.make_node("Gather", [SWITCH, p + "index"], [p + "s"], axis=0)]
    if target.weight is not None:
        name = node.input[target.weight]
        w = numpy_helper.to_array(weights[name])
        initializers.append(numpy_helper.from_array(fake_quantized(w, target, knobs) - w, p + "wdelta"))
        added += [
            helper.make_node("Mul", [p + "wdelta", p + "s"], [p + "wds"]),
            helper.make_node("Add", [name, p + "wds"], [p + "w"]),
        ]
        node.input[target.weight] = p + "w"
    for i in target.activations:
        x, a = node.input[i], f"{p}a{i}_"
        added += [
            helper.make_node("DynamicQuantizeLinear", [x], [a + "q", a + "scale", a + "zero"]),
            helper.make_node("DequantizeLinear", [a + "q", a + "scale", a + "zero"], [a + "dq"]),
            helper.make_node("Sub", [a + "dq", x], [a + "delta"]),
            helper.make_node("Mul", [a + "delta", p + "s"], [a + "ds"]),
            helper.make_node("Add", [x, a + "ds"], [a + "x"]),
        ]
        node.input[i] = a + "x"
    return added, initializers


@dataclass
class Ranking:
    names: list[str]
    """Most sensitive first."""
    scores: dict[str, float]
    rows: int
    seconds: float


def rank_nodes(
    model: onnx.ModelProto,
    targets: list[Target],
    knobs: QuantKnobs,
    data: EvalData,
    reference: np.ndarray,
    metric: str,
    work: Path,
    threads: int,
    seconds: float,
) -> Ranking:
    """Each target's sensitivity: the output error (against fp32) of quantizing that node alone, on the
    evaluation rows fp32 is least sure of, as many rows as let every node's pass fit ``seconds``.
    Nodes not reached in time score 0 (ranked last)."""
    start = time.monotonic()
    path = work / "sensitivity-emulation.onnx"
    onnx.save(emulation_model(model, targets, knobs), str(path))
    sess, _ = measure.session(path, threads, gpu=False)
    switch = np.zeros(len(targets), np.float32)

    def run(rows: np.ndarray) -> np.ndarray:
        return sess.run(None, {**data.take(rows), SWITCH: switch})[0]

    first = probe_rows(reference, metric, MIN_PROBE_ROWS)
    timed = time.monotonic()
    run(first)
    per_row = (time.monotonic() - timed) / len(first)
    left = seconds - (time.monotonic() - start)
    rows = probe_rows(reference, metric, probe_row_count(per_row, len(targets), left, data.rows))
    base = run(rows)
    scores = {t.name: 0.0 for t in targets}
    deadline = start + seconds
    for k, target in enumerate(targets):
        if time.monotonic() > deadline:
            break
        switch[:] = 0
        switch[k] = 1
        score = output_error(run(rows), base)
        scores[target.name] = score if np.isfinite(score) else float("inf")
    path.unlink(missing_ok=True)
    return Ranking(ranked(scores), scores, len(rows), time.monotonic() - start)


# ---- the search ----------------------------------------------------------------------------------------------


@dataclass
class SearchSetup:
    """What the search needs: the fp32 model, the evaluation data and fp32's outputs, the gate, the budget."""

    variant: str
    """int8-dynamic or int8-static (METHODS)."""
    model: Path
    data: EvalData
    reference: np.ndarray
    metric: str
    gate: float
    budget_s: float
    work: Path
    threads: int
    gpu: bool = False
    batch: int = 8
    """Batch size at which candidates within the gate are timed: fp32's best, where the bench knows it."""
    timing_s: float = 0.5
    vnni: bool = field(default_factory=cpu_has_vnni)
    """Whether the CPU has 8-bit dot products (see knob_order)."""
    progress: Progress = lambda _: None


@dataclass
class SearchResult:
    """The variant to profile: the plain one or a searched one, with its recipe."""

    path: Path
    value: float
    drop: float
    recipe: QuantRecipe
    trials: list[Trial]


def search_int8(setup: SearchSetup, plain: Path, plain_outputs: np.ndarray, plain_seconds: float = 0.0) -> SearchResult:
    """Keep ``plain`` (the whole-model variant) if it keeps the gate; else search within the budget.

    Never returns a variant over the gate unless it is the plain one, flagged ``not_found``.
    ``plain_seconds`` (its build and measurement) is the first estimate of what a candidate costs.
    """
    method = METHODS[setup.variant]
    value, drop = measure.quality(setup.metric, plain_outputs, setup.data.labels, setup.reference)
    error = output_error(plain_outputs, setup.reference)
    first = Trial(plain_knobs(method), (), value, drop, error, plain_seconds, plain)
    search = _Search(setup, method, first)
    if within_gate(drop, setup.gate):
        return search.result()
    setup.progress(
        f"drop {drop:+.4f} > gate {setup.gate:g}: searching for a recipe that keeps it ({setup.budget_s:g} s budget)"
    )
    try:
        search.run()
    except Exception as exc:  # the search improves a variant; its failure must not lose the variant
        setup.progress(f"search stopped: {type(exc).__name__}: {exc}")
    return search.result()


class _Search:
    """The search's state: trials so far, the budget, the ranking once made."""

    def __init__(self, setup: SearchSetup, method: Method, plain: Trial) -> None:
        self.setup, self.method, self.plain = setup, method, plain
        self.trials = [plain]
        self.budget = Budget(setup.budget_s)
        self.ranking: Ranking | None = None
        self.fp32_rps: float | None = None
        """fp32's rows/s at the search's batch size, timed beside the first candidate within the gate."""
        self.folder = setup.work / f"{setup.variant}-search"
        self._source: tuple[Path, onnx.ModelProto] | None = None

    def run(self) -> None:
        """Knobs on the whole model first; if none keeps the gate, nodes kept in fp32 by sensitivity; if
        still none, the last-resort knobs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for knobs in knob_order(self.method, self.setup.vnni):
            if self._attempt(knobs, ()) is None:
                return
        if self._best() is None:
            self._exclude()
        for knobs in last_resort_knobs(self.method):
            if self._best() is not None or self._attempt(knobs, ()) is None:
                return

    def _best(self) -> Trial | None:
        return fastest(self.trials[1:], self.setup.gate, self.fp32_rps or 0.0)

    def _exclude(self) -> None:
        base = exclusion_base(self.trials)
        _, source = self._source_model()
        targets = quantizable(source, self.method, base.op_types)
        if not targets or not self.budget.allows(self._expected_s()):
            return
        share = self.budget.left() * RANKING_SHARE
        self.setup.progress(f"ranking {len(targets)} nodes by sensitivity ({describe(base)}, <= {share:.0f} s)")
        self.ranking = rank_nodes(
            source,
            targets,
            base,
            self.setup.data,
            self.setup.reference,
            self.setup.metric,
            self.folder,
            self.setup.threads,
            share,
        )
        top = ", ".join(self.ranking.names[:3])
        self.setup.progress(
            f"ranked on {self.ranking.rows} rows in {self.ranking.seconds:.1f} s; most sensitive: {top}"
        )
        for count in exclusion_schedule(len(targets)):
            excluded = tuple(self.ranking.names[:count])
            found = self._attempt(base, excluded)
            if found is None:
                return
            if found:
                self._refine(base, excluded)
                return

    def _refine(self, knobs: QuantKnobs, excluded: tuple[str, ...]) -> None:
        """Quantize again, one at a time and least sensitive first, the fp32 nodes the gate can spare, until
        none can be: each one back in INT8 is faster. (Neural Compressor's tuning does the same once a
        configuration meets its goal.) The ranking measures nodes alone; together their errors add or cancel,
        which only trying settles."""
        kept, spared = list(excluded), True
        while spared and len(kept) > 1:  # none at all is the whole-model recipe with these knobs, tried already
            spared = False
            for name in reversed(list(kept)):
                if len(kept) == 1:
                    return
                fewer = tuple(n for n in kept if n != name)
                found = self._attempt(knobs, fewer)
                if found is None:
                    return
                if found:
                    kept, spared = list(fewer), True

    def _attempt(self, knobs: QuantKnobs, excluded: tuple[str, ...]) -> bool | None:
        """Build and measure one recipe: True when within the gate, False when not, None when out of time.
        A recipe tried before (the same knobs and nodes, in any order) is answered from its trial."""
        before = next((t for t in self.trials if t.knobs == knobs and set(t.excluded) == set(excluded)), None)
        if before is not None:
            return within_gate(before.drop, self.setup.gate)
        if not self.budget.allows(self._expected_s()):
            return None
        say = self.setup.progress
        trial = self._trial(knobs, excluded)
        self.trials.append(trial)
        if trial.path is None:
            return False
        if not within_gate(trial.drop, self.setup.gate):
            edge = " (by float rounding, as the planner compares)" if trial.drop - self.setup.gate < 1e-9 else ""
            tried = f"tried {describe(knobs, excluded)}: drop {trial.drop:+.4f}"
            say(f"{tried}, over the gate{edge} ({trial.seconds:.1f} s)")
            trial.path.unlink(missing_ok=True)
            return False
        say(
            f"tried {describe(knobs, excluded)}: drop {trial.drop:+.4f}, within the gate, "
            f"{trial.throughput:.0f} rows/s at batch {self.setup.batch} (fp32 {self.fp32_rps:.0f}) "
            f"({trial.seconds:.1f} s)"
        )
        return True

    def _trial(self, knobs: QuantKnobs, excluded: tuple[str, ...]) -> Trial:
        start = time.monotonic()
        out = self.folder / f"try{len(self.trials)}.onnx"
        try:
            self._build(knobs, excluded, out)
            sess, _ = measure.session(out, self.setup.threads, self.setup.gpu)
            outputs = measure.outputs(sess, self.setup.data)
        except Exception as exc:  # a recipe ORT cannot build or run is one more tried, not the end
            self.setup.progress(f"tried {describe(knobs, excluded)}: failed ({type(exc).__name__}: {exc})")
            out.unlink(missing_ok=True)
            return Trial(knobs, excluded, float("nan"), float("inf"), float("inf"), time.monotonic() - start, None)
        value, drop = measure.quality(self.setup.metric, outputs, self.setup.data.labels, self.setup.reference)
        trial = Trial(knobs, excluded, value, drop, output_error(outputs, self.setup.reference), 0.0, out)
        if within_gate(drop, self.setup.gate):
            trial.throughput = rows_per_second(sess, self.setup.data, self.setup.batch, self.setup.timing_s)
            if self.fp32_rps is None:
                fp32, _ = measure.session(self.setup.model, self.setup.threads, self.setup.gpu)
                self.fp32_rps = rows_per_second(fp32, self.setup.data, self.setup.batch, self.setup.timing_s)
        trial.seconds = time.monotonic() - start
        return trial

    def _build(self, knobs: QuantKnobs, excluded: tuple[str, ...], out: Path) -> None:
        source, _ = self._source_model()
        with quiet_quantizer():
            if self.method == "dynamic":
                build_dynamic(source, out, knobs, excluded)
                return
            ops = "-".join(knobs.op_types) if knobs.op_types else "all"
            cache = self.folder / f"calibration-{knobs.calibration}-{ops}.json"
            build_static(source, out, self.setup.data, knobs, excluded, cache)

    def _source_model(self) -> tuple[Path, onnx.ModelProto]:
        """The model candidates are built from: nodes named, then (static) ORT's pre-processing, whose new
        nodes are named too. A recipe is rebuilt the same way (bench.recipes), so its node names resolve."""
        if self._source is None:
            path = self.folder / "source.onnx"
            onnx.save(name_nodes(onnx.load(str(self.setup.model))), str(path))
            if self.method == "static":
                with quiet_quantizer():
                    prepare_static(path, self.folder / "prepared.onnx")
                onnx.save(name_nodes(onnx.load(str(self.folder / "prepared.onnx"))), str(path))
            self._source = (path, onnx.load(str(path)))
        return self._source

    def _expected_s(self) -> float:
        """What the next trial is expected to cost: the mean of those so far."""
        return float(np.mean([t.seconds for t in self.trials]))

    def result(self) -> SearchResult:
        best = self._best()
        if within_gate(self.plain.drop, self.setup.gate):
            outcome, chosen = "not_needed", self.plain
        elif best is not None:
            outcome, chosen = "found", best
        else:
            outcome, chosen = "not_found", self.plain
        for trial in self.trials[1:]:
            if trial is not chosen and trial.path is not None:
                trial.path.unlink(missing_ok=True)
        recipe = self._recipe(chosen, outcome)
        self._report(chosen, outcome)
        assert chosen.path is not None
        return SearchResult(chosen.path, chosen.value, chosen.drop, recipe, self.trials)

    def _recipe(self, chosen: Trial, outcome: Literal["not_needed", "found", "not_found"]) -> QuantRecipe:
        knobs = chosen.knobs
        return QuantRecipe(
            method=self.method,
            per_channel=knobs.per_channel,
            reduce_range=knobs.reduce_range,
            calibration=knobs.calibration,  # type: ignore[arg-type]
            op_types=list(knobs.op_types) if knobs.op_types else None,
            nodes_excluded=list(chosen.excluded),
            excluded_count=len(chosen.excluded),
            outcome=outcome,
            search_seconds=round(self.budget.elapsed(), 3),
            tried=len(self.trials),
            most_sensitive=self.ranking.names[:RECIPE_TOP] if self.ranking else [],
        )

    def _report(self, chosen: Trial, outcome: str) -> None:
        if outcome == "not_needed":
            return
        took = f"{self.budget.elapsed():.0f} s, {len(self.trials)} recipes tried"
        if outcome == "found":
            self.setup.progress(f"kept {describe(chosen.knobs, chosen.excluded)}: drop {chosen.drop:+.4f} ({took})")
        elif any(within_gate(t.drop, self.setup.gate) for t in self.trials):
            self.setup.progress(
                f"no recipe within the gate was faster than fp32 ({took}): the whole-model variant stays"
            )
        else:
            best = min(self.trials, key=lambda t: t.drop)
            self.setup.progress(
                f"no recipe within the gate ({took}; best drop {best.drop:+.4f}): the whole-model variant stays"
            )


def rows_per_second(sess: ort.InferenceSession, data: EvalData, batch: int, seconds: float) -> float:
    """Throughput at ``batch`` from the median of repeated runs (the median shrugs off a busy neighbour)."""
    feed = data.batch(0, batch)
    for _ in range(2):
        sess.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))
