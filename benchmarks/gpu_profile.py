"""Profile the tabular reference model on a GPU machine with onnxruntime-gpu; write the profile as JSON.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu installed:

    PYTHONPATH=operator:serving_image python3 benchmarks/gpu_profile.py OUT_DIR

The profile's instance type is named after the GPU the machine actually has
(``nvidia-h200``, say), never after a cloud type it does not have: a profile
measured on an H200 says nothing about a g4dn.xlarge (T4).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.profile import summary_rows
from leanserve_serving.reference_models import make_tabular


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* Python packages
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise SystemExit(f"no CUDA provider in this onnxruntime ({ort.__version__}): {providers}")
    with tempfile.TemporaryDirectory() as tmp:
        ref = make_tabular(Path(tmp))
        profile = run_bench(
            BenchOptions(
                ref.model, ref.evaluation, instance_type="pending", gpu=True, seconds_per_point=0.5, max_batch=65536
            )
        )
    gpu = profile.hardware.gpu or "unknown-gpu"
    instance = "nvidia-" + re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
    profile = profile.model_copy(update={"instance_type": instance})
    path = out_dir / f"tabular-{instance}.json"
    path.write_text(profile.model_dump_json(indent=2))
    for row in summary_rows(profile):
        print(json.dumps(row))
    print(json.dumps({"profile": str(path), "gpu": gpu, "providers": providers, "onnxruntime": ort.__version__}))


if __name__ == "__main__":
    main()
