# Sourced by the scripts that build Go binaries (hack/controlplane/build.sh, hack/kind/build-bins.sh,
# prometheus_image/build-context.sh), after a build. Their binaries are kept in .cache/ by the hash
# of their pins, so Go's own caches (the build cache and the module cache: about 15 GB after the
# Kubernetes builds) only speed up a rebuild after a pin changes. Where the disk is short, they go:
# the images built next need the room more (the GPU image's build needs about 15 GB at its peak).
# LEANSERVE_GO_CACHE_MIN_FREE_GB (default 30): below that much free space, the caches are cleaned.
trim_go_caches() {
  local min_gb="${LEANSERVE_GO_CACHE_MIN_FREE_GB:-30}" gocache free_kb before
  gocache="$(go env GOCACHE)"
  [ -d "$gocache" ] || return 0
  free_kb="$(df -Pk "$gocache" | awk 'NR == 2 {print $4}')"
  [ "$free_kb" -lt $((min_gb * 1024 * 1024)) ] || return 0
  before="$(du -scm "$gocache" "$(go env GOMODCACHE)" 2>/dev/null | awk 'END {print $1}')"
  go clean -cache -modcache
  echo "go caches: ${before} MB removed (less than ${min_gb} GB was free; the binaries built are kept in .cache)" >&2
}
