#!/usr/bin/env bash
# The build context of the Prometheus image: `bash prometheus_image/build-context.sh DIR` fills DIR
# with a static prometheus built here from the Go module proxy (the version gomod/go.mod pins, its
# go.sum checked), its licence notices and the default prometheus.yml; `docker build` or
# `buildah bud -f prometheus_image/Dockerfile DIR` makes the image of it (hack/images/build.py does
# both). Debian's prometheus package cannot be used: Debian builds it without Kubernetes service
# discovery (its client-go is not packaged), and the kind cluster's Prometheus finds the serving
# pods with kubernetes_sd_configs.
#
# Only the Kubernetes discovery is compiled in (Prometheus's build tags remove_all_sd and
# enable_kubernetes_sd; file, HTTP and static targets stay): no cloud SDKs, a smaller binary and a
# shorter build. No web UI: its assets are built with npm (the builtinassets tag), which is not
# here; the HTTP API, /-/ready and /-/healthy are all there.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build-context.sh DIR}"
command -v go >/dev/null 2>&1 || { echo "error: the Go toolchain (see gomod/go.mod's go line) is needed to build prometheus" >&2; exit 3; }
module=github.com/prometheus/prometheus
pin="$(awk -v m="$module" '$1 == m {print $2} $1 == "require" && $2 == m {print $3}' "$here/gomod/go.mod" | head -n1)"
# The Go module's v0.3MM.P is Prometheus 3.MM.P (Prometheus's own tags are v3.MM.P).
minor="${pin#v0.}"; minor="${minor%%.*}"; patch="${pin##*.}"
[ "${minor:-0}" -ge 300 ] 2>/dev/null || { echo "error: cannot read a Prometheus 3 pin from gomod/go.mod ($pin)" >&2; exit 2; }
version="3.$((minor - 300)).$patch"

mkdir -p "$out"
start=$SECONDS
echo "building prometheus $version ($module $pin) ..." >&2
v=github.com/prometheus/common/version
ldflags="-s -w -X $v.Version=$version -X $v.Revision=unknown -X $v.Branch=HEAD -X $v.BuildUser=leanserve -X $v.BuildDate=20000101-00:00:00"
(cd "$here/gomod" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath" \
  go build -tags remove_all_sd,enable_kubernetes_sd -ldflags "$ldflags" -o "$out/prometheus" "$module/cmd/prometheus") \
  || { echo "error: building prometheus failed (see the go output above)" >&2; exit 4; }
src="$(cd "$here/gomod" && go list -m -f '{{.Dir}}' "$module")"
install -m 644 "$src/LICENSE" "$src/NOTICE" "$here/prometheus.yml" "$out/"
echo "built prometheus $version in $((SECONDS - start)) s" >&2
. "$here/../hack/go-cache-trim.sh" && trim_go_caches
