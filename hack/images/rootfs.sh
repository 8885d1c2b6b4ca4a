#!/usr/bin/env bash
# The base root filesystems of leanserve's images, from Debian packages alone
# (no Docker engine, no container registry): debootstrap of Debian bookworm.
#
#   rootfs.sh OUTDIR   ->  OUTDIR/runtime.tar  Python 3.11 (Debian's), its standard
#                                              library, CA certificates, user 10001;
#                                              no apt, no dpkg, no perl, no pip, no docs
#                          OUTDIR/build.tar    the same plus python3-venv and pip: the
#                                              build stage that installs the wheels
#                          OUTDIR/python-version  the interpreter's version (3.11.2)
#
# Debian's Python is the one the pinned cp311 wheels of requirements/constraints.txt
# are for, and the smallest correct one here (the runtime tar is about 80 MB).
# Needs root and debootstrap. DEBIAN_MIRROR overrides the mirror (default: the first
# one apt is configured with on this machine, else deb.debian.org).
set -euo pipefail

out="${1:?usage: rootfs.sh OUTDIR}"
suite=bookworm
# What runs in every image: Python, its standard library (python3-minimal alone lacks
# much of it), CA certificates for https:// model URIs.
runtime_pkgs=python3.11-minimal,libpython3.11-stdlib,ca-certificates
# The build stage only: a virtualenv without pip of its own, filled by Debian's pip;
# binutils strips the wheels' extension modules.
build_pkgs=(python3-venv python3-pip binutils)
# The runtime keeps the dependency closure of these packages and nothing else: Python, its
# libraries and certificates, plus a shell and coreutils for `kubectl exec` debugging. Every
# other package's files go (apt, dpkg, perl, login, mount, ...), then the dpkg database.
keep_pkgs="python3.11-minimal libpython3.11-stdlib ca-certificates libstdc++6 dash coreutils"
# Never kept, whatever declares a dependency on them (maintainer scripts do, not programs).
never_keep="dpkg apt debconf perl-base"
[ "$(id -u)" = 0 ] || { echo "error: building the base root filesystems needs root (debootstrap, chroot)." >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)." >&2; exit 2; }

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(grep -rhoE '^(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
            | awk '{print $2}' | head -n1 || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

mkdir -p "$out"
work="$(mktemp -d "$out/.work.XXXXXX")"
cleanup() {  # never leave a mount of ours behind, whatever failed
  for m in proc sys dev/pts; do
    for r in "$work/build" "$work/runtime"; do mountpoint -q "$r/$m" 2>/dev/null && umount -l "$r/$m"; done
  done
  rm -rf "$work"
}
trap cleanup EXIT

start=$SECONDS
echo "debootstrap $suite (minbase + $runtime_pkgs) from $mirror ..." >&2
debootstrap --variant=minbase --include="$runtime_pkgs" "$suite" "$work/runtime" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed (log above)." >&2; exit 3; }
echo "debootstrap done in $((SECONDS - start)) s" >&2

# The build stage: the same root plus venv and pip.
cp -a "$work/runtime" "$work/build"
chroot "$work/build" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${build_pkgs[@]}" >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; echo "error: apt-get in the build root failed." >&2; exit 3; }

# The runtime: the package manager out, with what only it needs, then the caches and docs.
r="$work/runtime"
drop="$(chroot "$r" /usr/bin/python3.11 - "$never_keep" $keep_pkgs <<'PY'
import re, sys
# Installed packages and their Depends/Pre-Depends, from dpkg's own database.
deps, cur = {}, None
for block in open("/var/lib/dpkg/status").read().split("\n\n"):
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", block, re.M))
    if "install ok installed" not in fields.get("Status", ""):
        continue
    names = [fields["Package"]] + [p.split()[0] for p in fields.get("Provides", "").split(",") if p.strip()]
    wanted = ",".join(fields.get(k, "") for k in ("Depends", "Pre-Depends"))
    alts = [re.split(r"[\s(:]", a.strip())[0] for d in wanted.split(",") for a in d.split("|")[:1] if a.strip()]
    for n in names:
        deps.setdefault(n, set()).update(alts + ([fields["Package"]] if n != fields["Package"] else []))
    deps.setdefault("pkg:" + fields["Package"], set())
never, keep, todo = set(sys.argv[1].split()), set(), list(sys.argv[2:])
while todo:
    p = todo.pop()
    if p not in keep and p not in never:
        keep.add(p)
        todo.extend(deps.get(p, ()))
print(" ".join(sorted(k[4:] for k in deps if k.startswith("pkg:") and k[4:] not in keep)))
PY
)"
echo "runtime root: dropping $(echo $drop | wc -w) packages not needed by $keep_pkgs" >&2
chroot "$r" dpkg-query -L $drop 2>/dev/null | sort -u | while IFS= read -r f; do
  # Files and file links only: /bin, /lib and /sbin are links to directories (merged /usr).
  if [ ! -d "$r$f" ] && { [ -f "$r$f" ] || [ -L "$r$f" ]; }; then rm -f "$r$f"; fi
done
rm -rf "$r"/var/lib/dpkg "$r"/var/lib/apt "$r"/var/cache/* "$r"/var/log/* "$r"/etc/apt "$r"/usr/share/perl* \
       "$r"/usr/share/man "$r"/usr/share/info "$r"/usr/share/locale "$r"/usr/share/lintian "$r"/usr/share/bug
# Keep the copyright files (licence notices), drop the rest of the docs.
find "$r"/usr/share/doc -type f ! -name copyright -delete 2>/dev/null || true
find "$r"/usr/share/doc -type d -empty -delete 2>/dev/null || true
# The interpreter under its usual name too (python3-minimal, which holds that link, is
# outside the closure).
ln -sf python3.11 "$r/usr/bin/python3"
# glibc's iconv modules: Python's codecs are its own, nothing here calls iconv.
rm -rf "$r"/usr/lib/x86_64-linux-gnu/gconv

for root in "$work/runtime" "$work/build"; do
  # The container runtime provides these.
  rm -rf "$root"/dev/* "$root"/etc/resolv.conf "$root"/etc/hostname
  # The user every leanserve process runs as (runAsUser in the pods).
  echo "leanserve:x:10001:10001:leanserve:/nonexistent:/usr/sbin/nologin" >>"$root/etc/passwd"
  echo "leanserve:x:10001:" >>"$root/etc/group"
done

# The wheelhouse is resolved for this exact interpreter (markers such as python_full_version).
chroot "$work/runtime" /usr/bin/python3.11 -c 'import platform; print(platform.python_version())' >"$out/python-version"
tar --numeric-owner -C "$work/runtime" -cf "$out/runtime.tar" .
tar --numeric-owner -C "$work/build" -cf "$out/build.tar" .
echo "base root filesystems in $out: runtime $(du -m "$out/runtime.tar" | cut -f1) MB, build $(du -m "$out/build.tar" | cut -f1) MB, $((SECONDS - start)) s" >&2
