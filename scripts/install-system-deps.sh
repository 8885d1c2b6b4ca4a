#!/usr/bin/env bash
# Install the system packages the test suite needs, when they are missing.
#   openssl       - certificates for the test control plane
#   redis-server  - the real Redis the cache tests run against
#   hey           - the load generator of `leanserve demo` where Go is missing (leanserve.loadgen)
#   prometheus    - the real Prometheus (and promtool, for backfilled blocks) the observer tests start;
#                   installed without leaving a service running or enabled (see below)
#   buildah, debootstrap, binutils - build the images without a Docker engine (make images)
#   containerd, runc - run them in the container tests (a containerd of the suite's own)
#   podman, netavark, aardvark-dns, gcc, libc6-dev - the kind cluster of the end-to-end tests (podman is kind's provider
#              where no Docker engine runs; gcc compiles Kubernetes' pause.c)
#   go       - builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#              kwok and helm from the Go module proxy (go 1.24 or newer; Debian's
#              golang package is older, so it is checked, not installed)
#
# Usage: install-system-deps.sh [--with-go] [--with-images] [--with-kind]
#   --with-go      also check the Go toolchain (make test needs it)
#   --with-images  also install what builds and runs the images (make images, make test)
#   --with-kind    also install what builds and runs the kind cluster (make kind-up, make test)
set -euo pipefail

with_go=0; with_images=0; with_kind=0
for arg in "$@"; do
  case "$arg" in
    --with-go) with_go=1 ;;
    --with-images) with_images=1 ;;
    --with-kind) with_kind=1; with_images=1 ;;
    *) echo "usage: install-system-deps.sh [--with-go] [--with-images] [--with-kind]" >&2; exit 2 ;;
  esac
done

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v hey >/dev/null 2>&1 || need_apt+=(hey)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "$with_images" = 1 ]; then
  command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
  command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
  command -v strip >/dev/null 2>&1 || need_apt+=(binutils)
  command -v containerd >/dev/null 2>&1 || need_apt+=(containerd)
  command -v runc >/dev/null 2>&1 || need_apt+=(runc)
fi
if [ "$with_kind" = 1 ]; then
  if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    command -v podman >/dev/null 2>&1 || need_apt+=(podman)
    # netavark + aardvark-dns: container networks with DNS (kind's nodes join by name)
    [ -x /usr/lib/podman/netavark ] || need_apt+=(netavark)
    [ -x /usr/lib/podman/aardvark-dns ] || need_apt+=(aardvark-dns)
  fi
  command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
  [ -e /usr/include/stdio.h ] || need_apt+=(libc6-dev)
fi

# Debian's prometheus package starts a Prometheus service at once and enables it at boot. The tests start
# their own, on free loopback ports with temporary storage; a host service would only hold port 9090 and
# fill /var/lib/prometheus. So it is installed under a policy-rc.d that forbids starting services (exit 101,
# invoke-rc.d's "action forbidden"; a policy-rc.d the host already has is kept as it is), and then stopped,
# in case one started anyway, and disabled (systemd unit and SysV links), so it does not come back at boot.
install_prometheus_without_service() {
  local policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by install-system-deps.sh while it installs prometheus\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when the install fails or is interrupted
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null || rc=$?
  if [ "$ours" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  [ "$rc" = 0 ] || return "$rc"
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  else
    service prometheus stop >/dev/null 2>&1 || true
    if command -v systemctl >/dev/null 2>&1; then systemctl disable prometheus.service >/dev/null 2>&1 || true; fi
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
}

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need_apt[*]}"
    apt-get update -qq
    others=()
    for pkg in "${need_apt[@]}"; do [ "$pkg" = prometheus ] || others+=("$pkg"); done
    if [ ${#others[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${others[@]}" >/dev/null
    fi
    [ ${#others[@]} = ${#need_apt[@]} ] || install_prometheus_without_service
  else
    echo "error: missing system packages: ${need_apt[*]} (install them, or run as root on Debian/Ubuntu)" >&2
    exit 1
  fi
fi

[ "$with_go" = 1 ] || exit 0

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain (1.24+) is needed to build the test control plane; put 'go' on PATH." >&2
  exit 1
fi
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if [ "${go_minor:-0}" -lt 24 ]; then
  echo "error: Go $(go env GOVERSION) is too old to build Kubernetes 1.34; Go 1.24 or newer is needed." >&2
  exit 1
fi
