#!/usr/bin/env bash
# Install the system packages the test suite needs, when they are missing.
#   openssl       - certificates for the test control plane
#   redis-server  - the real Redis the cache tests run against
#   hey           - the HTTP load generator of benchmarks/serving.py
#   go       - builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#              kwok and helm from the Go module proxy (go 1.24 or newer; Debian's
#              golang package is older, so it is checked, not installed)
#
# Usage: install-system-deps.sh [--with-go]   (--with-go: also check the Go toolchain; make test needs it)
set -euo pipefail

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v hey >/dev/null 2>&1 || need_apt+=(hey)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "error: missing system packages: ${need_apt[*]} (install them, or run as root on Debian/Ubuntu)" >&2
    exit 1
  fi
fi

[ "${1:-}" = "--with-go" ] || exit 0

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain (1.24+) is needed to build the test control plane; put 'go' on PATH." >&2
  exit 1
fi
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if [ "${go_minor:-0}" -lt 24 ]; then
  echo "error: Go $(go env GOVERSION) is too old to build Kubernetes 1.34; Go 1.24 or newer is needed." >&2
  exit 1
fi
