#!/usr/bin/env bash
# Build what a kind cluster needs beyond the test control plane's binaries, from the Go
# module proxy, with the versions pinned in the go.mod files under hack/kind/gomod and
# hack/controlplane/kubernetes:
#   kind                       the CLI (sigs.k8s.io/kind)
#   kubelet kubeadm kubectl kube-proxy   the same Kubernetes module as the test control plane
#   crictl                     sigs.k8s.io/cri-tools
#   coredns metrics-server flanneld      the cluster add-ons (DNS, the HPA's CPU metric, the CNI)
#   flannel                    the flannel CNI plugin (containernetworking/plugins v0.9.1, the
#                              last release that carried it; flannel's own repository is not a
#                              Go module)
#   pause                      Kubernetes' own pause.c, compiled static (build/pause in the module)
#
# Binaries land in .cache/kind/bin/<stamp>/, <stamp> a hash of the pins and of this script.
# Prints the folder on its last line; progress and timings on stderr.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cp_dir="$repo/hack/controlplane"

pinned() {  # pinned GOMOD MODULE: the version of MODULE required in GOMOD
  awk -v m="$2" '$1 == m {print $2} $1 == "require" && $2 == m {print $3}' "$1" | head -n1
}
k8s_version="$(pinned "$cp_dir/kubernetes/go.mod" k8s.io/kubernetes)"
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
kind_version="$(pinned "$here/gomod/kind/go.mod" sigs.k8s.io/kind)"
[ -n "$k8s_version" ] && [ -n "$kind_version" ] || { echo "error: could not read the pinned versions" >&2; exit 2; }
command -v go >/dev/null 2>&1 || { echo "error: the Go toolchain (1.24+) is needed to build the kind pieces" >&2; exit 3; }
command -v gcc >/dev/null 2>&1 || { echo "error: gcc is needed to build the pause binary (apt-get install gcc libc6-dev)" >&2; exit 3; }

stamp="$(cat "$0" "$cp_dir/kubernetes/go.mod" "$cp_dir/kubernetes/go.sum" "$here"/gomod/*/go.mod "$here"/gomod/*/go.sum | sha256sum | cut -c1-12)"
bin="${LEANSERVE_KIND_BIN:-$repo/.cache/kind/bin/$stamp}"
tools=(kind kubelet kubeadm kubectl kube-proxy crictl coredns metrics-server flanneld flannel pause)

missing=()
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "kind binaries: cached in $bin" >&2
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath"
build_date="2000-01-01T00:00:00Z"

timed() {  # timed LABEL DIR -- go build args...
  local label="$1" dir="$2"; shift 3
  local start=$SECONDS
  echo "building $label ..." >&2
  (cd "$dir" && go build "$@") || { echo "error: building $label failed (see the go output above)." >&2; exit 4; }
  echo "built $label in $((SECONDS - start)) s" >&2
}
ver() {
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=%s ' \
      "$pkg" "$k8s_version" "$pkg" "$pkg" "$k8s_minor" "$pkg" "$pkg" "$build_date"
  done
}
total_start=$SECONDS
g="$here/gomod"
[ -x "$bin/kind" ] || timed "kind $kind_version" "$g/kind" -- -ldflags "-s -w" -o "$bin/kind" sigs.k8s.io/kind
todo=()
for t in kubelet kubeadm kubectl kube-proxy; do [ -x "$bin/$t" ] || todo+=("k8s.io/kubernetes/cmd/$t"); done
[ ${#todo[@]} -eq 0 ] || timed "${todo[*]##*/} $k8s_version" "$cp_dir/kubernetes" -- -ldflags "-s -w $(ver)" -o "$bin/" "${todo[@]}"
[ -x "$bin/crictl" ] || timed "crictl" "$g/crictl" -- -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$(pinned "$g/crictl/go.mod" sigs.k8s.io/cri-tools)" \
  -o "$bin/crictl" sigs.k8s.io/cri-tools/cmd/crictl
[ -x "$bin/coredns" ] || timed "coredns" "$g/coredns" -- -ldflags "-s -w" -o "$bin/coredns" github.com/coredns/coredns
[ -x "$bin/metrics-server" ] || timed "metrics-server" "$g/metrics-server" -- -ldflags "-s -w" -o "$bin/metrics-server" sigs.k8s.io/metrics-server/cmd/metrics-server
# flannel's UDP backend is C (cgo): linked statically, so the image needs no libc.
[ -x "$bin/flanneld" ] || CGO_ENABLED=1 timed "flanneld" "$g/flannel" -- -tags netgo,osusergo \
  -ldflags "-s -w -extldflags -static -X github.com/flannel-io/flannel/pkg/version.Version=$(pinned "$g/flannel/go.mod" github.com/flannel-io/flannel)" \
  -o "$bin/flanneld" github.com/flannel-io/flannel
[ -x "$bin/flannel" ] || timed "flannel CNI plugin" "$g/cni" -- -ldflags "-s -w" -o "$bin/flannel" github.com/containernetworking/plugins/plugins/meta/flannel
if [ ! -x "$bin/pause" ]; then
  src="$(cd "$cp_dir/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  [ -f "$src" ] || (cd "$cp_dir/kubernetes" && go mod download k8s.io/kubernetes)
  gcc -Os -Wall -Werror -static -DVERSION=v3.10.1-leanserve -o "$bin/pause" "$src"
  strip "$bin/pause"
fi
echo "kind binaries: built in $((SECONDS - total_start)) s into $bin" >&2
. "$repo/hack/go-cache-trim.sh" && trim_go_caches
echo "$bin"
