"""The planned variant is built as its profile's recipe says, in the demo and in the serving pod's init container.

A recipe the accuracy-aware search found keeps some nodes in fp32: the built model must keep exactly those
(their MatMul on float weights) and quantize the rest. A recipe whose node list a compact profile cut short
cannot be rebuilt, and says so rather than serve another model.
"""

from __future__ import annotations

import onnx
import pytest

from leanserve_serving.bench.quant_search import name_nodes
from leanserve_serving.bench.recipes import RecipeError, build_planned_variant
from leanserve_serving.fetch import FetchError, prepare
from leanserve_serving.profile import QuantRecipe
from leanserve_serving.reference_models import make_tabular


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    return make_tabular(tmp_path_factory.mktemp("tabular"))


def matmul_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in name_nodes(model).graph.node if n.op_type == "MatMul"]


def found(excluded: list[str], **knobs) -> QuantRecipe:
    return QuantRecipe(
        method="dynamic",
        per_channel=knobs.get("per_channel", False),
        reduce_range=knobs.get("reduce_range", False),
        nodes_excluded=excluded,
        excluded_count=len(excluded),
        outcome="found",
        tried=3,
    )


def test_the_excluded_nodes_stay_fp32_and_the_others_are_quantized(tabular, tmp_path):
    matmuls = matmul_names(onnx.load(str(tabular.model)))
    assert len(matmuls) == 3
    built = build_planned_variant(tabular.model, None, "int8-dynamic", found([matmuls[0]]), tmp_path)
    graph = onnx.load(str(built)).graph
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul"]
    assert float_matmuls == [matmuls[0]]
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node) == 2


def test_a_plain_recipe_or_none_builds_the_plain_variant(tabular, tmp_path):
    plain = build_planned_variant(tabular.model, None, "int8-dynamic", None, tmp_path / "a")
    graph = onnx.load(str(plain)).graph
    assert not [n for n in graph.node if n.op_type == "MatMul"]
    fp32 = build_planned_variant(tabular.model, None, "fp32", None, tmp_path / "b")
    assert fp32 == tabular.model


def test_a_recipe_cut_short_by_a_compact_profile_is_refused(tabular, tmp_path):
    matmuls = matmul_names(onnx.load(str(tabular.model)))
    cut = found(matmuls[:1]).model_copy(update={"excluded_count": 2})
    with pytest.raises(RecipeError, match="1 of its 2 excluded nodes"):
        build_planned_variant(tabular.model, None, "int8-dynamic", cut, tmp_path)
    with pytest.raises(RecipeError, match="does not have: MatMul:nowhere"):
        build_planned_variant(tabular.model, None, "int8-dynamic", found(["MatMul:nowhere"]), tmp_path)


def test_the_init_container_builds_the_recipe_it_is_given(tabular, tmp_path):
    """``python -m leanserve_serving.fetch --recipe JSON``: what the operator's Deployment runs."""
    matmuls = matmul_names(onnx.load(str(tabular.model)))
    recipe = found(matmuls[1:], per_channel=True).model_dump_json(exclude_defaults=True)
    out = prepare(tabular.model.as_uri(), tmp_path / "model.onnx", "int8-dynamic", recipe=recipe)
    assert [n.name for n in onnx.load(str(out)).graph.node if n.op_type == "MatMul"] == matmuls[1:]
    with pytest.raises(FetchError, match="not a quantization recipe"):
        prepare(tabular.model.as_uri(), tmp_path / "other.onnx", "int8-dynamic", recipe='{"method": "magic"}')


def test_the_bench_builds_a_variant_by_a_recipe_found_before_and_measures_that_model(tabular):
    """Another pod size of the same model: no search, the recipe's model is what gets measured."""
    from leanserve_serving.bench.run import BenchOptions, run_bench

    matmuls = matmul_names(onnx.load(str(tabular.model)))
    recipe = found(matmuls[:1])
    options = BenchOptions(
        tabular.model,
        tabular.evaluation,
        variants=("int8-dynamic",),
        max_accuracy_drop=0.5,
        recipes={"int8-dynamic": recipe},
        seconds_per_point=0.02,
        max_batch=4,
        stack_seconds=0.0,
    )
    said: list[str] = []
    (variant,) = run_bench(options, progress=said.append).variants
    assert variant.status == "ok" and variant.recipe == recipe
    assert any("built by the recipe found before (1 node(s) in fp32)" in line for line in said), said
    assert not any("searching" in line for line in said), said
