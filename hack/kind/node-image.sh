#!/usr/bin/env bash
# Build a kind node image for the pinned Kubernetes version without a Docker engine or a
# container registry: Debian bookworm packages (systemd, containerd 1.6, runc, CNI plugins,
# iptables, ...) by debootstrap, kind's own base files (from the kind module in the Go
# module cache), the binaries of hack/kind/build-bins.sh and hack/controlplane/build.sh,
# and every image kubeadm and the cluster add-ons ask for, built here from those same
# binaries and imported into the node's containerd store (pinned), as kind's node image
# builder does. The result is imported into podman's image store.
#
#   node-image.sh KIND_BIN_DIR CONTROLPLANE_BIN_DIR   -> prints the image reference
#
# Cached by the hash of its inputs: a second run with the same pins prints the reference
# at once. Needs root, debootstrap, buildah, podman and containerd (for ctr).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kbin="${1:?usage: node-image.sh KIND_BIN_DIR CONTROLPLANE_BIN_DIR}"
cbin="${2:?usage: node-image.sh KIND_BIN_DIR CONTROLPLANE_BIN_DIR}"

pinned() { awk -v m="$2" '$1 == m {print $2} $1 == "require" && $2 == m {print $3}' "$1" | head -n1; }
k8s_version="$(pinned "$repo/hack/controlplane/kubernetes/go.mod" k8s.io/kubernetes)"
kind_version="$(pinned "$here/gomod/kind/go.mod" sigs.k8s.io/kind)"
flannel_version="$(pinned "$here/gomod/flannel/go.mod" github.com/flannel-io/flannel)"
ms_version="$(pinned "$here/gomod/metrics-server/go.mod" sigs.k8s.io/metrics-server)"
# The images kubeadm asks for (`kubeadm config images list`), plus the add-ons'.
mapfile -t kubeadm_images < <("$kbin/kubeadm" config images list --kubernetes-version "$k8s_version" 2>/dev/null)
[ ${#kubeadm_images[@]} -ge 6 ] || { echo "error: kubeadm config images list gave: ${kubeadm_images[*]}" >&2; exit 2; }
image_of() { printf '%s\n' "${kubeadm_images[@]}" | grep -E "/$1:" | head -n1; }
flannel_image="ghcr.io/flannel-io/flannel:$flannel_version"
ms_image="registry.k8s.io/metrics-server/metrics-server:$ms_version"

stamp="$(cat "$0" "$here"/node/* "$kbin"/* "$cbin"/etcd "$cbin"/kube-apiserver "$cbin"/kube-controller-manager \
  "$cbin"/kube-scheduler | sha256sum | cut -c1-12)"
ref="localhost/leanserve/kind-node:$k8s_version-$stamp"
if podman image exists "$ref" 2>/dev/null; then
  echo "kind node image: cached ($ref)" >&2
  echo "$ref"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "error: building the kind node image needs root (debootstrap, chroot)." >&2; exit 2; }
for c in debootstrap buildah podman ctr containerd; do
  command -v "$c" >/dev/null || { echo "error: $c is missing (make system-deps-kind installs it)." >&2; exit 2; }
done
kind_src="$(cd "$here/gomod/kind" && go list -m -f '{{.Dir}}' sigs.k8s.io/kind)"
[ -d "$kind_src/images/base/files" ] || (cd "$here/gomod/kind" && go mod download sigs.k8s.io/kind)

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(grep -rhoE '^(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
            | awk '{print $2}' | head -n1 || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

cache="$repo/.cache/kind"
mkdir -p "$cache"
work="$(mktemp -d "$cache/.node.XXXXXX")"
root="$work/rootfs"
store=(--root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)
cpid=""
cleanup() {
  [ -z "$cpid" ] || { kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null || true; }
  for m in proc sys dev/pts dev; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
  rm -rf "$work"
}
trap cleanup EXIT
start=$SECONDS
step() { echo "[node image $((SECONDS - start))s] $*" >&2; }

# 1. The root: what kind's base image installs, from Debian.
pkgs=systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,conntrack,iptables,nftables
pkgs+=,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,ca-certificates,curl,jq,procps,socat,bash
pkgs+=,busybox-static
step "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed (log above)." >&2; exit 3; }

# 2. kind's base files and the steps of its base Dockerfile (images/base in the kind module).
step "kind $kind_version base files"
f="$kind_src/images/base/files"
install -m 0755 "$f"/usr/local/bin/* "$root/usr/local/bin/"
mkdir -p "$root/kind/bin" "$root/kind/manifests" "$root/LICENSES" "$root/etc/kubernetes/manifests"
cp -r "$f/kind/." "$root/kind/" && chmod 0755 "$root/kind/bin" "$root"/kind/bin/*
install -m 0644 "$f"/etc/crictl.yaml "$root/etc/"
install -m 0644 "$f"/etc/containerd/* -D -t "$root/etc/containerd/"
install -m 0644 "$f"/etc/default/* -t "$root/etc/default/"
install -m 0644 "$f"/etc/sysctl.d/* -t "$root/etc/sysctl.d/"
install -m 0644 "$f"/etc/systemd/system/*.service "$f"/etc/systemd/system/*.slice -t "$root/etc/systemd/system/"
install -m 0644 -D "$f"/etc/systemd/system/kubelet.service.d/* -t "$root/etc/systemd/system/kubelet.service.d/"
chroot "$root" sh -euc '
  find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete
  rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
        /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
        /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/*
  echo "ReadKMsg=no" >> /etc/systemd/journald.conf
  ln -sf "$(command -v systemd || echo /lib/systemd/systemd)" /sbin/init
  systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
  systemctl mask systemd-binfmt.service >/dev/null 2>&1
  update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
  update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null
'
# Debian's containerd, runc and CNI plugins where kind's files expect them.
ln -sf /usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 "$root/usr/local/bin/"
ln -sf /usr/sbin/runc "$root/usr/local/sbin/runc"
mkdir -p "$root/opt/cni/bin"
cp -a "$root"/usr/lib/cni/. "$root/opt/cni/bin/"
install -m 0755 "$kbin/flannel" "$root/opt/cni/bin/flannel"
chroot "$root" sh -euc 'ctr oci spec | jq ".hooks.createContainer[.hooks.createContainer | length] |= . + {\"path\": \"/kind/bin/mount-product-files.sh\"}" | jq "del(.process.rlimits)" > /etc/containerd/cri-base.json'
# This VM withholds CAP_SYS_RESOURCE even from root: runc cannot lower oom_score_adj, so the
# CRI must not ask it to (kind sets the same for rootless nodes). The pause image is the one
# kubeadm names.
pause_image="$(image_of pause)"
sed -i -e 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' \
       -e "s#sandbox_image = .*#sandbox_image = \"$pause_image\"#" "$root/etc/containerd/config.toml"
grep -q 'restrict_oom_score_adj = true' "$root/etc/containerd/config.toml"
for b in kubelet kubeadm kubectl; do install -m 0755 "$kbin/$b" "$root/usr/bin/$b"; done
install -m 0755 "$kbin/crictl" "$root/usr/local/bin/crictl"
echo "$k8s_version" > "$root/kind/version"
sed -e "s#@FLANNEL_IMAGE@#$flannel_image#g" "$here/node/flannel.yaml" > "$root/kind/manifests/default-cni.yaml"

# 3. The images, each from one binary built here; kube-proxy and flannel on a small base with
#    iptables (legacy, as the node selects when it starts with no rules) and busybox.
step "component images"
net="$work/netbase"
mkdir -p "$net/usr/sbin" "$net/bin" "$net/tmp" "$net/run"
chmod 1777 "$net/tmp"
copy_closure() {  # copy_closure FILE...: the files and the shared libraries they load, from the root
  local f lib
  for f in "$@"; do
    mkdir -p "$net$(dirname "$f")" && cp -aL "$root$f" "$net$f"
    for lib in $(chroot "$root" ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' | sort -u); do
      [ -e "$net$lib" ] || { mkdir -p "$net$(dirname "$lib")" && cp -aL "$root$lib" "$net$lib"; }
    done
  done
}
copy_closure /usr/sbin/xtables-legacy-multi $(cd "$root" && ls usr/lib/x86_64-linux-gnu/xtables/*.so | sed 's#^#/#')
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf xtables-legacy-multi "$net/usr/sbin/$t"
done
cp -a "$root/bin/busybox" "$net/bin/busybox"
for t in sh cp mkdir cat ls; do ln -sf busybox "$net/bin/$t"; done

archives="$work/images"
mkdir -p "$archives"
mkimage() {  # mkimage REF BASE(scratch|net) ENTRYPOINT_JSON SRC:DST...
  local ref="$1" base="$2" entry="$3"; shift 3
  local c spec
  c="$(buildah "${store[@]}" from --quiet scratch)"
  [ "$base" = net ] && buildah "${store[@]}" copy --quiet "$c" "$net" / >/dev/null
  for spec in "$@"; do buildah "${store[@]}" copy --quiet --chmod 0755 "$c" "${spec%%:*}" "${spec#*:}" >/dev/null; done
  buildah "${store[@]}" config --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --entrypoint "$entry" \
    --label org.opencontainers.image.source=leanserve/hack/kind "$c"
  buildah "${store[@]}" commit --quiet --rm "$c" "$ref" >/dev/null
  buildah "${store[@]}" push --quiet "$ref" "oci-archive:$archives/$(echo "$ref" | tr '/:' '__').tar:$ref"
  buildah "${store[@]}" rmi "$ref" >/dev/null
}
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  mkimage "$(image_of "$c")" scratch "[\"/usr/local/bin/$c\"]" "$cbin/$c:/usr/local/bin/$c"
done
mkimage "$(image_of kube-proxy)" net '["/usr/local/bin/kube-proxy"]' "$kbin/kube-proxy:/usr/local/bin/kube-proxy"
mkimage "$(image_of etcd)" scratch '["/usr/local/bin/etcd"]' "$cbin/etcd:/usr/local/bin/etcd"
mkimage "$pause_image" scratch '["/pause"]' "$kbin/pause:/pause"
mkimage "$(image_of coredns)" scratch '["/coredns"]' "$kbin/coredns:/coredns"
mkimage "$flannel_image" net '["/opt/bin/flanneld"]' "$kbin/flanneld:/opt/bin/flanneld"
mkimage "$ms_image" scratch '["/metrics-server"]' "$kbin/metrics-server:/metrics-server"

# 4. Into the node's containerd store, pinned, as kind's builder does (a containerd of our own
#    whose root is the node's /var/lib/containerd).
step "importing the images into the node's containerd store"
mkdir -p "$work/ctrd"
cat > "$work/ctrd/config.toml" <<EOF
version = 2
root = "$root/var/lib/containerd"
state = "$work/ctrd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/ctrd/sock"
EOF
containerd --config "$work/ctrd/config.toml" >"$work/ctrd/log" 2>&1 &
cpid=$!
for _ in $(seq 100); do [ -S "$work/ctrd/sock" ] && break; sleep 0.1; done
nctr() { ctr --address "$work/ctrd/sock" -n k8s.io "$@"; }
for a in "$archives"/*.tar; do nctr images import --no-unpack "$a" >/dev/null; done
# Pinned: the kubelet's image garbage collection never removes them (containerd 1.6's ctr has no
# import --label; the label is the same).
for i in $(nctr images ls -q | grep -v '^sha256'); do nctr images label "$i" io.cri-containerd.pinned=pinned >/dev/null; done
nctr images ls -q | grep -v '^sha256' >&2
kill "$cpid"; wait "$cpid" 2>/dev/null || true; cpid=""
rm -rf "$root/var/lib/containerd/tmpmounts"

# 5. One layer into podman's store, with the metadata of kind's node image.
step "importing the node image into podman"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" --numeric-owner --xattrs -cf "$work/rootfs.tar" .
podman import --quiet \
  --change 'ENV container=docker' --change 'STOPSIGNAL SIGRTMIN+3' \
  --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
  --change "LABEL io.leanserve.kind-node.kubernetes=$k8s_version" \
  "$work/rootfs.tar" "$ref" >/dev/null
step "done: $ref"
echo "$ref"
