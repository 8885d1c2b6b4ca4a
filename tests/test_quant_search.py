"""The accuracy-aware INT8 search (bench.quant_search) on real ONNX Runtime builds: it finds a recipe within
the gate on the text model, stops at once where the whole-model recipe keeps the gate, never hands back a
variant over the gate unflagged, and its recipe fits the termination message."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanserve_serving.bench import measure
from leanserve_serving.bench.evaldata import EvalData, load_eval_data
from leanserve_serving.bench.quant_search import (
    MAX_PROBE_ROWS,
    MIN_PROBE_ROWS,
    SearchSetup,
    exclusion_schedule,
    fastest,
    knob_order,
    last_resort_knobs,
    probe_row_count,
    probe_rows,
    search_int8,
    within_gate,
)
from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.bench.variants import PLAIN_DYNAMIC, build_variants
from leanserve_serving.model_server import spec_of
from leanserve_serving.profile import (
    COMPACT_NODE_NAME_CHARS,
    COMPACT_RECIPE_NODES,
    TERMINATION_MESSAGE_LIMIT,
    Hardware,
    LatencyPoint,
    Profile,
    QuantRecipe,
    StackProfile,
    VariantProfile,
)
from leanserve_serving.reference_models import ReferenceModel, make_tabular, make_text_classifier

GATE = 0.01
#: The text model's search budget here: the default (300 s) is for real benches.
TEXT_BUDGET_S = 120.0


class Plain:
    """A reference model, its evaluation data, fp32's outputs, and its whole-model int8-dynamic build."""

    def __init__(self, ref: ReferenceModel, work: Path) -> None:
        self.ref, self.work = ref, work
        sess, _ = measure.session(ref.model, 2, False)
        self.data: EvalData = load_eval_data(ref.evaluation, [spec_of(i) for i in sess.get_inputs()], "accuracy")
        self.reference = measure.outputs(sess, self.data)
        start = time.perf_counter()
        [built] = build_variants(ref.model, self.data, work, False, ["int8-dynamic"])
        assert built.path is not None
        self.path = built.path
        int8, _ = measure.session(built.path, 2, False)
        self.outputs = measure.outputs(int8, self.data)
        self.seconds = time.perf_counter() - start
        _, self.drop = measure.quality("accuracy", self.outputs, self.data.labels, self.reference)

    def setup(self, gate: float, budget_s: float, **extra: object) -> SearchSetup:
        return SearchSetup(
            "int8-dynamic", self.ref.model, self.data, self.reference, "accuracy", gate, budget_s, self.work, 2, **extra
        )


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> Plain:
    work = tmp_path_factory.mktemp("tabular")
    return Plain(make_tabular(work), work)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    return make_text_classifier(tmp_path_factory.mktemp("text"))


# ---- the search on real models ------------------------------------------------------------------------------


def test_text_model_gets_an_int8_variant_within_the_gate(text_model):
    """Whole-model INT8 loses more than a point on the text model; the bench's search replaces it with a
    recipe within the gate, measured on all evaluation rows, and records how it got there."""
    lines: list[str] = []
    profile = run_bench(
        BenchOptions(
            text_model.model,
            text_model.evaluation,
            variants=("fp32", "int8-dynamic"),
            seconds_per_point=0.05,
            max_batch=4,
            stack_seconds=0,
            max_accuracy_drop=GATE,
            quantization_search_s=TEXT_BUDGET_S,
        ),
        progress=lines.append,
    )
    fp32, int8 = profile.variant("fp32"), profile.variant("int8-dynamic")
    assert int8.status == "ok", int8.reason
    recipe = int8.recipe
    assert recipe is not None and recipe.method == "dynamic"
    report = "\n".join(lines)
    assert recipe.outcome in ("found", "not_needed"), report
    assert int8.quality_drop <= GATE, report
    assert int8.quality_drop == pytest.approx(fp32.quality - int8.quality, abs=1e-12)
    assert recipe.excluded_count == len(recipe.nodes_excluded)
    assert recipe.search_seconds <= TEXT_BUDGET_S + 60  # the last trial may start just before the end
    assert fp32.recipe is None
    if recipe.outcome == "found":
        assert recipe.tried >= 2 and "searching for a recipe" in report and "kept " in report
    best = fp32.best()
    print(
        f"\nint8-dynamic searched: drop {int8.quality_drop:+.4f}, recipe {recipe.model_dump()}, "
        f"{int8.best().throughput_rps / best.throughput_rps:.2f}x fp32 at best batch\n{report}"
    )


def test_the_search_stops_at_once_when_the_whole_model_recipe_keeps_the_gate(tabular):
    gate = max(tabular.drop, 0.0) + 0.05
    start = time.perf_counter()
    result = search_int8(tabular.setup(gate, 300), tabular.path, tabular.outputs, tabular.seconds)
    took = time.perf_counter() - start
    assert took < 0.5
    assert result.path == tabular.path and result.drop == tabular.drop
    recipe = result.recipe
    assert (recipe.outcome, recipe.tried, recipe.nodes_excluded, recipe.excluded_count) == ("not_needed", 1, [], 0)
    assert (recipe.per_channel, recipe.reduce_range) == (PLAIN_DYNAMIC.per_channel, PLAIN_DYNAMIC.reduce_range)
    assert len(result.trials) == 1  # nothing built


def test_the_bench_records_the_whole_model_recipe_when_it_keeps_the_gate(tabular):
    profile = run_bench(
        BenchOptions(
            tabular.ref.model,
            tabular.ref.evaluation,
            variants=("fp32", "int8-dynamic", "int8-static"),
            seconds_per_point=0.02,
            max_batch=8,
            stack_seconds=0,
            max_accuracy_drop=0.5,
        )
    )
    for name, method in (("int8-dynamic", "dynamic"), ("int8-static", "static")):
        recipe = profile.variant(name).recipe
        assert recipe is not None and (recipe.method, recipe.outcome, recipe.tried) == (method, "not_needed", 1)
        assert recipe.search_seconds < 0.5
    assert profile.variant("int8-static").recipe.calibration == "MinMax"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    below=st.sampled_from([0.002, 0.001, 0.0005, 0.0, -0.0005]), budget=st.sampled_from([0.0, 0.01]) | st.floats(0, 2)
)
def test_whatever_the_budget_the_search_never_returns_a_variant_over_the_gate_unflagged(tabular, below, budget):
    """Gates from just over the whole-model drop to a few rows under it (one row is 0.0005), budgets from
    none to many builds: the result is within the gate, or the whole-model variant flagged not_found; the
    drop it reports is what its file measures; it ends about when its budget does."""
    gate = tabular.drop - below
    start = time.perf_counter()
    result = search_int8(tabular.setup(gate, budget), tabular.path, tabular.outputs, tabular.seconds)
    took = time.perf_counter() - start
    recipe = result.recipe
    if recipe.outcome == "not_found":
        assert result.path == tabular.path and result.drop == tabular.drop and result.drop > gate
    else:
        assert result.drop <= gate
        sess, _ = measure.session(result.path, 2, False)
        out = measure.outputs(sess, tabular.data)
        assert measure.quality("accuracy", out, tabular.data.labels, tabular.reference)[1] == result.drop
    assert recipe.tried == len(result.trials) >= 1
    if budget == 0:
        assert recipe.tried == 1
    assert took <= budget + 2 * max(t.seconds for t in result.trials) + 1  # one step may start near the end


# ---- pure parts --------------------------------------------------------------------------------------------


def test_exclusion_schedule_grows_and_never_excludes_every_node():
    assert exclusion_schedule(39) == [1, 2, 3, 4, 6, 9, 13, 19, 28]
    assert exclusion_schedule(3) == [1, 2]
    assert exclusion_schedule(1) == []


def test_reduce_range_is_only_tried_without_vnni():
    assert not any(k.reduce_range for k in knob_order("dynamic", vnni=True))
    assert any(k.reduce_range for k in knob_order("dynamic", vnni=False))
    assert knob_order("dynamic", vnni=True)[0].per_channel
    static = knob_order("static", vnni=True)
    assert static[0].calibration == "MinMax" and {k.calibration for k in static} == {"MinMax", "Percentile", "Entropy"}
    assert all(k.op_types == ("MatMul", "Gemm", "Conv") for k in static)
    assert [k.op_types for k in last_resort_knobs("static")] == [None, None] and last_resort_knobs("dynamic") == []


def test_the_gate_is_the_planners_and_a_nan_drop_never_passes():
    assert within_gate(0.01, 0.01) and not within_gate(0.010000000000000009, 0.01)
    assert not within_gate(float("nan"), 0.01)


def test_the_fastest_within_the_gate_wins_a_near_tie_goes_to_fewer_fp32_nodes_and_supersets_or_slower_than_fp32_never():
    from leanserve_serving.bench.quant_search import Trial

    def trial(drop: float, rps: float | None, *excluded: str) -> Trial:
        return Trial(PLAIN_DYNAMIC, excluded, 0.9, drop, 0.0, 1.0, None, rps)

    over = trial(0.02, 500.0)
    one, two_others = trial(0.005, 300.0, "a"), trial(0.0, 305.0, "b", "c")
    assert fastest([over, one, two_others], 0.01) is one  # 305 vs 300 is noise
    faster = trial(0.0, 400.0, "b", "c")
    assert fastest([over, one, faster], 0.01) is faster
    superset = trial(0.0, 450.0, "a", "b")  # "a" alone kept in fp32 does strictly less fp32 work
    assert fastest([one, superset], 0.01) is one
    assert fastest([over], 0.01) is None
    assert fastest([one, faster], 0.01, floor=400.0) is None  # no faster than fp32: nothing to keep


def test_ranking_rows_are_those_fp32_decides_by_the_thinnest_margin():
    reference = np.array([[0.0, 3.0], [1.0, 1.1], [2.0, 0.0], [0.5, 0.45]])
    assert probe_rows(reference, "accuracy", 2).tolist() == [1, 3]
    assert probe_rows(reference, "mse", 2).tolist() == [0, 1]


def test_ranking_rows_fit_the_ranking_time_within_bounds():
    assert probe_row_count(seconds_per_row=0.01, nodes=39, seconds=10.0, rows=400) == 25  # 40 passes of 0.25 s
    assert probe_row_count(seconds_per_row=1.0, nodes=39, seconds=10.0, rows=400) == MIN_PROBE_ROWS
    assert probe_row_count(seconds_per_row=1e-6, nodes=3, seconds=10.0, rows=400) == MAX_PROBE_ROWS
    assert probe_row_count(seconds_per_row=1.0, nodes=3, seconds=0.0, rows=5) == 5


# ---- the recipe in the compact profile ----------------------------------------------------------------------


def _variant(name: str, recipe: QuantRecipe | None) -> VariantProfile:
    curve = [
        LatencyPoint(
            batch_size=2**i,
            p50_ms=1.234567 * 2**i,
            p95_ms=1.5 * 2**i,
            p99_ms=1.7 * 2**i,
            throughput_rps=812.3456 * (1 + i),
            stack_ms=2.345678 * 2**i,
        )
        for i in range(8)
    ]
    levels = [0.9 + 0.01234 * i for i in range(15)]
    return VariantProfile(
        name=name,  # type: ignore[arg-type]
        status="ok",
        size_bytes=90_286_570,
        load_seconds=0.4567,
        quality=0.8825,
        quality_drop=0.0075,
        latency=curve,
        rss_mb=612.25,
        stack=StackProfile(jitter=levels, outside_ms=levels),
        recipe=recipe,
    )


NODES = [f"/encoder/layer.{i // 6}/attention/output/dense/MatMul_{i}_with_a_long_exporter_name" for i in range(37)]


def _recipe() -> QuantRecipe:
    return QuantRecipe(
        method="static",
        per_channel=True,
        reduce_range=False,
        calibration="Percentile",
        op_types=["MatMul", "Gemm", "Conv"],
        nodes_excluded=NODES,
        excluded_count=len(NODES),
        outcome="found",
        search_seconds=287.123456,
        tried=17,
        most_sensitive=NODES[:5],
    )


def test_a_recipe_with_many_excluded_nodes_keeps_the_compact_profile_under_4_kib():
    """Three variants with full curves and stack figures already fill most of 4 KiB: the recipes' names go
    before any latency point does, and their counts stay."""
    profile = Profile(
        model_name="text",
        model_digest="sha256:" + "ab" * 32,
        instance_type="c7i.2xlarge",
        metric="accuracy",
        evaluation_rows=400,
        threads=2,
        hardware=Hardware(cpu_model="AMD EPYC 9R45", vcpus=2, onnxruntime="1.32.0", providers=["CPUExecutionProvider"]),
        variants=[_variant("fp32", None), _variant("int8-dynamic", _recipe()), _variant("int8-static", _recipe())],
    )
    assert len(profile.model_dump_json()) > TERMINATION_MESSAGE_LIMIT  # the full lists would not fit
    text = profile.to_compact()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = Profile.from_compact(text)
    assert back.variant("fp32").recipe is None
    got = back.variant("int8-static").recipe
    assert (got.excluded_count, got.calibration, got.outcome, got.tried) == (37, "Percentile", "found", 17)
    assert got.op_types == ["MatMul", "Gemm", "Conv"] and got.search_seconds == 287.1
    for v in back.variants:
        assert v.latency[0].batch_size == 1 and v.best().batch_size == 128


def test_a_measured_profile_keeps_its_curves_and_the_first_names_of_its_recipes():
    """A real text-model profile (tests/fixtures) with a recipe on each INT8 variant: nothing is thinned."""
    measured = Profile.model_validate_json((Path(__file__).parent / "fixtures/profiles/text-local.json").read_text())
    variants = [v.model_copy(update={"recipe": _recipe() if v.name != "fp32" else None}) for v in measured.variants]
    profile = measured.model_copy(update={"variants": variants})
    back = Profile.from_compact(profile.to_compact())
    for v, full in zip(back.variants, measured.variants, strict=True):
        assert [p.batch_size for p in v.latency] == [p.batch_size for p in full.latency]
        if v.name != "fp32":
            assert (
                v.recipe.nodes_excluded == [n[:COMPACT_NODE_NAME_CHARS] for n in NODES[:COMPACT_RECIPE_NODES]]
                and v.recipe.excluded_count == 37
            )


def test_a_profile_without_recipes_has_no_recipe_key_in_its_compact_form():
    """Profiles benched without a gate stay byte-for-byte what readers from before recipes parse."""
    profile = Profile(
        model_name="m",
        model_digest="sha256:00",
        instance_type="local",
        metric="accuracy",
        evaluation_rows=10,
        threads=1,
        hardware=Hardware(cpu_model="cpu", vcpus=1, onnxruntime="1", providers=[]),
        variants=[_variant("fp32", None)],
    )
    assert "recipe" not in profile.to_compact()
    assert Profile.from_compact(profile.to_compact()).variant("fp32").recipe is None
