#!/usr/bin/env bash
# Generate the Python modules of the v2 gRPC protocol (serving_image/leanserve_serving/proto/) from
# grpc_predict_v2.proto with grpcio-tools (the dev extra; the images need only grpcio and protobuf).
# The modules are committed: tests/test_grpc.py regenerates them into a temporary folder and fails
# when they differ, so edit the .proto and run this, never the modules.
#   hack/gen-proto.sh [OUT]   OUT: where the leanserve_serving/proto/ tree is written (default serving_image)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/serving_image}"
python="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out/leanserve_serving/proto"
# -I at serving_image: the modules then import each other as leanserve_serving.proto.*, not as top-level names.
cd "$root/serving_image"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  leanserve_serving/proto/grpc_predict_v2.proto
