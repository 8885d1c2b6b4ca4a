#!/usr/bin/env bash
# On the device machine: gather the carried parts (onnxruntime-gpu and the serving stack's missing wheels, plus
# the reference models built off the device), install the wheels under /tmp/site, run benchmarks/gpu_stack.py.
# The parts travel one per call (each call carries at most 64 MiB) and are kept in /tmp/gpuparts while the
# machine stays warm; `hack/gpu/run.sh stash` only stashes this call's part.
#
# Making the parts here (build/ is ignored by git):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d build/gpu/pack/whl onnxruntime-gpu==1.31.1 (plus the serving stack's wheels the device lacks)
#   build the reference models into build/gpu/pack/models (text.onnx, text-eval.npz, tabular.onnx,
#     tabular-eval.npz: serving_image/leanserve_serving/reference_models.py)
#   tar c -C build/gpu/pack whl models | split -b 60M -d -a 1 - build/gpu/p0   (p00..p05; then each into a folder cN of its own)
# then one device call per part with `carry: [build/gpu/cN]` running `bash hack/gpu/run.sh stash`, and a last
# one running `bash hack/gpu/run.sh` (its figures come back under $OUT).
set -uo pipefail
mkdir -p /tmp/gpuparts
cp build/gpu/c*/p0* /tmp/gpuparts/ 2>/dev/null || true
ls -la /tmp/gpuparts
[ "${1:-}" = stash ] && exit 0
for i in 0 1 2 3 4 5; do [ -f /tmp/gpuparts/p0$i ] || { echo "missing part p0$i"; exit 3; }; done
if [ ! -d /tmp/site/onnxruntime ]; then
  mkdir -p /tmp/pack && cat /tmp/gpuparts/p0[0-5] | tee >(md5sum >&2) | tar x -C /tmp/pack || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/pack/whl/*.whl || exit 5
fi
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/serving_image PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
python3 benchmarks/gpu_stack.py /tmp/pack/models "$OUT" "$@" 2>&1 | tee "$OUT/gpu-stack.log"
