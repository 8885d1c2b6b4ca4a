"""Accuracy-aware INT8 search benchmark: on the text reference model, fp32, whole-model int8-dynamic and the
searched int8-dynamic (bench.quant_search): accuracy, drop, throughput at batch 1 and at the best batch,
the ratio to fp32, the recipe and how long the search took, on this machine.

    .venv/bin/python benchmarks/quantization_search.py [--gate 0.01] [--budget 300] [--seconds-per-point 0.3]

The bench's own figures come from two bench runs (without and with the gate), minutes apart; on a shared
machine their load differs, so the three models are also timed interleaved, round after round, rebuilt
from the recorded recipe (which also checks that the recipe reproduces the variant's accuracy).

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from leanserve_serving.bench import measure
from leanserve_serving.bench.evaldata import EvalData, load_eval_data
from leanserve_serving.bench.quant_search import name_nodes
from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.bench.variants import PLAIN_DYNAMIC, QuantKnobs, build_dynamic, quiet_quantizer
from leanserve_serving.cpus import cpu_limit
from leanserve_serving.model_server import spec_of
from leanserve_serving.profile import Profile, QuantRecipe, VariantProfile
from leanserve_serving.reference_models import ReferenceModel, make_text_classifier

#: Interleaved timing: rounds, and seconds per model per round.
ROUNDS, SECONDS_PER_ROUND = 7, 1.0


def _bench(ref: ReferenceModel, args: argparse.Namespace, **extra: object) -> Profile:
    options = BenchOptions(
        ref.model,
        ref.evaluation,
        variants=("fp32", "int8-dynamic"),
        seconds_per_point=args.seconds_per_point,
        max_batch=args.max_batch,
        stack_seconds=0,
        **extra,  # type: ignore[arg-type]
    )
    return run_bench(options, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))


def _row(label: str, v: VariantProfile, fp32: VariantProfile) -> dict[str, object]:
    best, base = v.best(), fp32.best()
    assert best is not None
    assert base is not None
    return {
        "variant": label,
        "accuracy": v.quality,
        "drop": v.quality_drop,
        "b1_rows_s": v.latency[0].throughput_rps,
        "best_batch": best.batch_size,
        "best_rows_s": best.throughput_rps,
        "x_fp32_b1": v.latency[0].throughput_rps / fp32.latency[0].throughput_rps,
        "x_fp32_best": best.throughput_rps / base.throughput_rps,
        "recipe": v.recipe.model_dump() if v.recipe else None,
    }


def _rebuild(ref: ReferenceModel, recipe: QuantRecipe | None, work: Path) -> dict[str, Path]:
    """fp32, whole-model int8 and the searched recipe, built again from the model (nodes named as the search
    names them)."""
    source = work / "named.onnx"
    onnx.save(name_nodes(onnx.load(str(ref.model))), str(source))
    models = {"fp32": ref.model, "int8 whole": work / "whole.onnx", "int8 searched": work / "searched.onnx"}
    knobs = QuantKnobs(recipe.per_channel, recipe.reduce_range) if recipe else PLAIN_DYNAMIC
    with quiet_quantizer():
        build_dynamic(source, models["int8 whole"], PLAIN_DYNAMIC)
        build_dynamic(source, models["int8 searched"], knobs, tuple(recipe.nodes_excluded) if recipe else ())
    return models


def _interleaved(models: dict[str, Path], data: EvalData, batches: list[int]) -> dict[str, dict[int, float]]:
    """Rows/s of each model at each batch size: median over rounds that time every model in turn."""
    threads = cpu_limit()
    sessions = {name: measure.session(path, threads, False)[0] for name, path in models.items()}
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in models}
    for _ in range(ROUNDS):
        for batch in batches:
            feeds = [data.batch(i * batch, batch) for i in range(8)]
            for name, sess in sessions.items():
                sess.run(None, feeds[0])
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < SECONDS_PER_ROUND or runs < 2:
                    sess.run(None, feeds[runs % len(feeds)])
                    runs += 1
                samples[name][batch].append(runs * batch / (time.perf_counter() - start))
    return {name: {b: float(np.median(v)) for b, v in by.items()} for name, by in samples.items()}


def _drop(path: Path, data: EvalData, reference: np.ndarray) -> float:
    sess, _ = measure.session(path, cpu_limit(), False)
    return measure.quality("accuracy", measure.outputs(sess, data), data.labels, reference)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", type=float, default=0.01, help="max accuracy drop")
    parser.add_argument("--budget", type=float, default=300.0, help="search budget, seconds")
    parser.add_argument("--seconds-per-point", type=float, default=0.3)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ref = make_text_classifier(Path(tmp) / "text")
        print(f"[text] trained: accuracy {ref.accuracy:.4f}; fp32 and whole-model int8 ...", file=sys.stderr)
        plain = _bench(ref, args)
        print(f"[text] searched int8 (gate {args.gate:g}, budget {args.budget:g} s) ...", file=sys.stderr)
        searched = _bench(ref, args, max_accuracy_drop=args.gate, quantization_search_s=args.budget)
        fp32, fp32_again = plain.variant("fp32"), searched.variant("fp32")
        found = searched.variant("int8-dynamic")
        assert fp32 is not None
        assert fp32_again is not None
        assert found is not None
        print("[text] rebuilding from the recipe, timing the three interleaved ...", file=sys.stderr)
        models = _rebuild(ref, found.recipe, Path(tmp))
        sess, _ = measure.session(ref.model, cpu_limit(), False)
        data = load_eval_data(ref.evaluation, [spec_of(i) for i in sess.get_inputs()], "accuracy")
        rebuilt_drop = _drop(models["int8 searched"], data, measure.outputs(sess, data))
        best_batch = fp32.best().batch_size  # type: ignore[union-attr]
        batches = sorted({1, best_batch})
        timed = _interleaved(models, data, batches)
    # Each INT8 variant against the fp32 of the same bench run.
    rows = [
        _row("fp32", fp32, fp32),
        _row("int8 whole", plain.variant("int8-dynamic"), fp32),  # type: ignore[arg-type]
        _row("int8 searched", found, fp32_again),
    ]
    hw = plain.hardware
    print(f"\ntext: {hw.cpu_model}, {hw.vcpus} vCPU, ISA {' '.join(hw.isa_flags) or '-'}, ORT {hw.onnxruntime}")
    print("bench runs (fp32 of the same run; the searched variant's run is a second one):")
    print(
        f"{'variant':<14} {'accuracy':>9} {'drop':>8} {'b=1 rows/s':>10} {'best b':>7} {'best rows/s':>12} "
        f"{'x fp32 b=1':>10} {'x fp32 best':>11}"
    )
    for r in rows:
        print(
            f"{r['variant']:<14} {r['accuracy']:>9.4f} {r['drop']:>+8.4f} {r['b1_rows_s']:>10.1f} "
            f"{r['best_batch']:>7} {r['best_rows_s']:>12.1f} {r['x_fp32_b1']:>10.2f} {r['x_fp32_best']:>11.2f}"
        )
    print(f"interleaved ({ROUNDS} rounds, median rows/s; fp32's best batch {best_batch}):")
    for name, by in timed.items():
        cells = "  ".join(f"b={b}: {by[b]:7.1f} rows/s ({by[b] / timed['fp32'][b]:.2f}x fp32)" for b in batches)
        print(f"  {name:<14} {cells}")
    print(f"recipe: {json.dumps(found.recipe.model_dump() if found.recipe else None)}")
    print(f"rebuilt from the recipe: drop {rebuilt_drop:+.4f} (bench measured {found.quality_drop:+.4f})")
    print(f"(took {time.monotonic() - started:.0f} s)")
    figures = {"benchmark": "quantization_search", "gate": args.gate, "budget_s": args.budget}
    interleaved = {name: {str(b): v for b, v in by.items()} for name, by in timed.items()}
    print(
        json.dumps(
            {
                **figures,
                "hardware": hw.model_dump(),
                "trained_accuracy": ref.accuracy,
                "variants": rows,
                "interleaved_rows_s": interleaved,
                "fp32_best_batch": best_batch,
                "rebuilt_drop": rebuilt_drop,
            }
        )
    )


if __name__ == "__main__":
    main()
