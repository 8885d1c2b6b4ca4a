#!/usr/bin/env bash
# Build the control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok, helm) from the Go module proxy, with the versions pinned
# in the go.mod files beside this script.
#
# Binaries land in .cache/controlplane/bin/<stamp>/, where <stamp> is a hash of
# the pins (go.mod, go.sum) and of this script: they are reused while the pins
# stay the same, and rebuilt when they change. Prints the path of the folder on
# its last line, and how long each part took on stderr.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# One source of truth for the versions: the go.mod files.
pinned() {  # pinned DIR MODULE: the version of MODULE required in DIR/go.mod
  awk -v m="$2" '$1 == m {print $2} $1 == "require" && $2 == m {print $3}' "$here/$1/go.mod" | head -n1
}
k8s_version="$(pinned kubernetes k8s.io/kubernetes)"
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
helm_version="$(pinned helm helm.sh/helm/v3)"
kwok_version="$(pinned kwok sigs.k8s.io/kwok)"
for v in "$k8s_version" "$helm_version" "$kwok_version"; do
  [ -n "$v" ] || { echo "error: could not read a pinned version from $here/*/go.mod" >&2; exit 2; }
done

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is required to build the test control plane (go 1.24 or newer, 'go' on PATH)." >&2
  echo "       Install it (https://go.dev/dl or your distribution's golang package) and run again." >&2
  exit 3
fi

stamp="$(cat "$0" "$here"/*/go.mod "$here"/*/go.sum | sha256sum | cut -c1-12)"
bin="${LEANSERVE_CONTROLPLANE_BIN:-$repo/.cache/controlplane/bin/$stamp}"
tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok helm)

missing=()
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "control plane binaries: cached in $bin" >&2
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath"  # the pins are the committed go.mod/go.sum, never rewritten
build_date="2000-01-01T00:00:00Z"  # fixed: the same pins give the same binaries

timed() {  # timed LABEL DIR -- go build args...
  local label="$1" dir="$2"; shift 3
  local start=$SECONDS
  echo "building $label ..." >&2
  (cd "$here/$dir" && go build "$@") || {
    echo "error: building $label failed (see the go output above)." >&2
    exit 4
  }
  echo "built $label in $((SECONDS - start)) s" >&2
}

total_start=$SECONDS
ver() {  # ldflags that make a Kubernetes binary report its real version
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=%s ' \
      "$pkg" "$k8s_version" "$pkg" "$pkg" "$k8s_minor" "$pkg" "$pkg" "$build_date"
  done
}
timed "etcd" etcd -- -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
timed "kube-apiserver, kube-controller-manager, kube-scheduler $k8s_version" kubernetes -- \
  -ldflags "-s -w $(ver)" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
timed "kwok $kwok_version" kwok -- \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v}" -o "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok
timed "helm $helm_version" helm -- \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" -o "$bin/helm" helm.sh/helm/v3/cmd/helm
echo "control plane binaries: built in $((SECONDS - total_start)) s into $bin" >&2
. "$repo/hack/go-cache-trim.sh" && trim_go_caches
echo "$bin"
