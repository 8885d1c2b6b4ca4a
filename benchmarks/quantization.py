"""Quantization benchmark: each variant's throughput at its best batch size against fp32 at batch 1,
and its accuracy drop, for every reference model, on this machine.

    .venv/bin/python benchmarks/quantization.py [--seconds-per-point 0.3]

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.profile import summary_rows
from leanserve_serving.reference_models import make_tabular, make_text_classifier

#: The reference models (a small CNN is still to come).
REFERENCE_MODELS = {"tabular": make_tabular, "text": make_text_classifier}
#: Largest batch timed per model: the text encoder is ~1000x the tabular MLP's work per row.
MAX_BATCH = {"tabular": 1024, "text": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-point", type=float, default=0.3)
    parser.add_argument("--max-batch", type=int, default=1024)
    args = parser.parse_args()
    figures = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in REFERENCE_MODELS.items():
            ref = make(Path(tmp) / name)
            print(f"[{name}] trained: accuracy {ref.accuracy:.4f}; profiling ...", file=sys.stderr)
            options = BenchOptions(
                ref.model,
                ref.evaluation,
                seconds_per_point=args.seconds_per_point,
                max_batch=min(args.max_batch, MAX_BATCH[name]),
            )
            profile = run_bench(options)
            hw = profile.hardware
            print(
                f"\n{name}: {hw.cpu_model}, {hw.vcpus} vCPU, ISA {' '.join(hw.isa_flags) or '-'}, "
                f"ONNX Runtime {hw.onnxruntime}"
            )
            print(
                f"{'variant':<13} {'status':<8} {'accuracy':>9} {'drop':>8} {'b=1 p50 ms':>10} {'best b':>7} "
                f"{'best rows/s':>12} {'x fp32 b=1':>10} {'x fp32 best':>11}"
            )
            for r in summary_rows(profile):
                if r["best_rps"] is None:
                    print(f"{r['variant']:<13} {r['status']}")
                    continue
                print(
                    f"{r['variant']:<13} {'ok':<8} {r['quality']:>9.4f} {r['drop']:>+8.4f} {r['p50_b1_ms']:>10.4f} "
                    f"{r['best_batch']:>7} {r['best_rps']:>12.0f} {r['vs_fp32_b1']:>10.1f} "
                    f"{r['vs_fp32_best']:>11.2f}"
                )
            figures.append(
                {
                    "model": name,
                    "trained_accuracy": ref.accuracy,
                    "hardware": hw.model_dump(),
                    "variants": summary_rows(profile),
                }
            )
    print(f"(took {time.monotonic() - started:.0f} s)")
    print(json.dumps({"benchmark": "quantization", "models": figures}))


if __name__ == "__main__":
    main()
