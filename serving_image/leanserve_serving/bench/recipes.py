"""Build the variant a plan chose exactly as its profile was measured: the INT8 recipe included.

The accuracy-aware search (bench.quant_search) may keep some nodes in fp32, or change the quantizer's
knobs, to hold the accuracy gate. The profile records that recipe; whoever serves the variant (the
serving pod's init container, ``leanserve demo``) must build the same model, or it serves a plain INT8
variant the gate rejected. Node names are the search's own (``OpType:first_output`` for unnamed nodes),
so the model is named the same way before the quantizer sees it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from leanserve_serving.bench.evaldata import EvalData
from leanserve_serving.bench.variants import QuantKnobs, build_dynamic, build_static, build_variants, prepare_static
from leanserve_serving.profile import QuantRecipe


class RecipeError(ValueError):
    """A recipe that cannot be built as recorded (nodes the model does not have, static without data)."""


def build_planned_variant(
    model: Path,
    data: EvalData | None,
    name: str,
    recipe: QuantRecipe | None,
    out_dir: Path,
    gpu: bool = False,
) -> Path:
    """The variant ``name`` of ``model`` in ``out_dir``: by ``recipe`` when the search found one, else the
    plain variant (fp32, fp16, a whole-model INT8 that kept the gate)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe is None or recipe.outcome != "found" or not name.startswith("int8"):
        (built,) = build_variants(model, data, out_dir, gpu, [name])  # type: ignore[arg-type]
        if built.status != "ok" or built.path is None:
            raise RecipeError(f"variant {name}: {built.status}: {built.reason}")
        return built.path
    import onnx

    from leanserve_serving.bench.quant_search import name_nodes

    if recipe.excluded_count != len(recipe.nodes_excluded):
        raise RecipeError(
            f"the recipe lists {len(recipe.nodes_excluded)} of its {recipe.excluded_count} excluded nodes "
            "(a compact profile's): it cannot be rebuilt"
        )
    named_model = name_nodes(onnx.load(str(model)))
    known = {node.name for node in named_model.graph.node}
    missing = [n for n in recipe.nodes_excluded if n not in known]
    if missing:
        raise RecipeError(f"the recipe excludes nodes this model does not have: {', '.join(missing[:3])}")
    knobs = QuantKnobs(
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        calibration=recipe.calibration,
        op_types=tuple(recipe.op_types) if recipe.op_types else None,
    )
    out = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory(prefix="leanserve-recipe-", dir=out_dir) as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(named_model, str(named))
        if recipe.method == "dynamic":
            build_dynamic(named, out, knobs, tuple(recipe.nodes_excluded))
        else:
            if data is None:
                raise RecipeError("a static INT8 recipe needs the evaluation data to calibrate on")
            prepared = prepare_static(named, Path(tmp) / "prepared.onnx")
            build_static(prepared, out, data, knobs, tuple(recipe.nodes_excluded))
    return out
