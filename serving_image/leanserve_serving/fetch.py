"""The serving pod's init container: fetch the model, check it, and build the planned precision variant.

    python -m leanserve_serving.fetch --uri URI --variant int8-dynamic --out /models/model.onnx \
        [--sha256 HEX] [--format onnx|pytorch] [--evaluation URI]

The operator writes this command into every serving Deployment; the model
server then loads ``--out``. Only the schemes the API allows are fetched
(``https``, ``http``, ``pvc``, ``configmap``, ``file``); ``pvc://CLAIM/PATH``
and ``configmap://NAME/KEY`` are read from where the builder mounts them
(``/mnt/pvc/CLAIM`` and ``/mnt/configmap/NAME``). A digest given in the spec is
checked before anything loads the file. PyTorch models are TorchScript files
exported to ONNX (never unpickled).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("https", "http", "pvc", "configmap", "file")
PVC_ROOT = Path("/mnt/pvc")
CONFIGMAP_ROOT = Path("/mnt/configmap")
#: Largest download accepted: models above this are a misconfiguration here, not a model to serve.
MAX_BYTES = 4 * 1024**3


class FetchError(RuntimeError):
    """Why the model could not be made ready, said so the pod's termination message explains it."""


def local_path(uri: str, pvc_root: Path = PVC_ROOT, configmap_root: Path = CONFIGMAP_ROOT) -> Path | None:
    """Where a ``file``, ``pvc`` or ``configmap`` URI is on this filesystem; None for http(s)."""
    parts = urlsplit(uri)
    if parts.scheme not in ALLOWED_SCHEMES:
        raise FetchError(f"{uri}: scheme {parts.scheme!r} is not allowed; use one of {', '.join(ALLOWED_SCHEMES)}")
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme in ("pvc", "configmap"):
        root = pvc_root if parts.scheme == "pvc" else configmap_root
        relative = Path(parts.netloc) / parts.path.lstrip("/")
        if ".." in relative.parts or not parts.netloc:
            raise FetchError(f"{uri}: expected {parts.scheme}://NAME/PATH without '..'")
        return root / relative
    return None


def fetch(uri: str, dest: Path, timeout_s: float = 300.0) -> Path:
    """Copy the object at ``uri`` to ``dest`` (streamed, size-bounded)."""
    source = local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        if not source.is_file():
            raise FetchError(f"{uri}: no such file at {source}")
        shutil.copyfile(source, dest)
        return dest
    request = urllib.request.Request(uri, headers={"User-Agent": "leanserve-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, dest.open("wb") as out:
            total = 0
            while chunk := response.read(1 << 20):
                total += len(chunk)
                if total > MAX_BYTES:
                    raise FetchError(f"{uri}: larger than {MAX_BYTES >> 30} GiB")
                out.write(chunk)
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        raise FetchError(f"{uri}: download failed: {exc}") from None
    return dest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_model(uri: str, work: Path, model_format: str = "onnx", sha256: str | None = None) -> Path:
    """The model file in ``work``, its digest checked against the spec's when one is given."""
    model = fetch(uri, work / ("model.pt" if model_format == "pytorch" else "model.onnx"))
    if sha256 is not None:
        actual = sha256_of(model)
        if actual != sha256.lower():
            raise FetchError(f"{uri}: sha256 {actual} does not match spec.model.sha256 {sha256}")
    return model


def fetch_evaluation(uri: str, work: Path) -> Path:
    """The evaluation data in ``work``, keeping its suffix (.npz, .jsonl: the reader goes by it)."""
    return fetch(uri, work / ("evaluation" + Path(urlsplit(uri).path).suffix))


def prepare(
    uri: str,
    out: Path,
    variant: str = "fp32",
    sha256: str | None = None,
    model_format: str = "onnx",
    evaluation: str | None = None,
    gpu: bool = False,
    recipe: str | None = None,
) -> Path:
    """Fetch, verify and convert the model; write the variant to ``out``. Returns ``out``.

    ``recipe`` (a QuantRecipe as JSON, from the profile the plan chose) builds an INT8 variant the way the
    accuracy-aware search found it keeps the gate, rather than the plain one."""
    from leanserve_serving.bench.evaldata import EvalDataError, load_eval_data, read_npz
    from leanserve_serving.bench.recipes import RecipeError, build_planned_variant
    from leanserve_serving.profile import QuantRecipe

    try:
        quant_recipe = QuantRecipe.model_validate_json(recipe) if recipe else None
    except ValueError as exc:
        raise FetchError(f"--recipe: not a quantization recipe: {exc}") from None
    static = variant == "int8-static"

    with tempfile.TemporaryDirectory(prefix="leanserve-fetch-", dir=out.parent) as tmp:
        work = Path(tmp)
        model = fetch_model(uri, work, model_format, sha256)
        data = None
        if evaluation is not None and (model_format == "pytorch" or static):
            data_path = fetch_evaluation(evaluation, work)
        if model_format == "pytorch":
            from leanserve_serving.bench.pytorch import PyTorchModelError, export_to_onnx

            if evaluation is None:
                raise FetchError("exporting a PyTorch model needs model.evaluation (.npz example inputs)")
            try:
                model = export_to_onnx(model, read_npz(data_path).inputs, work / "exported.onnx")
            except (PyTorchModelError, EvalDataError) as exc:
                raise FetchError(str(exc)) from None
        if static:
            if evaluation is None:
                raise FetchError("int8-static needs model.evaluation to calibrate on")
            import onnxruntime as ort

            from leanserve_serving.model_server import spec_of

            session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            try:
                data = load_eval_data(data_path, [spec_of(i) for i in session.get_inputs()], "cosine")
            except EvalDataError as exc:
                raise FetchError(f"{evaluation}: {exc}") from None
            del session
        try:
            built = build_planned_variant(model, data, variant, quant_recipe, work / "variant", gpu)
        except RecipeError as exc:
            raise FetchError(str(exc)) from None
        shutil.move(str(built), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanserve_serving.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="fp32", choices=["fp32", "int8-dynamic", "int8-static", "fp16"])
    parser.add_argument("--sha256", default=None)
    parser.add_argument("--format", dest="model_format", default="onnx", choices=["onnx", "pytorch"])
    parser.add_argument("--evaluation", default=None)
    parser.add_argument("--gpu", action="store_true", help="build for the CUDA provider (fp16)")
    parser.add_argument("--recipe", default=None, help="the INT8 recipe of the planned variant's profile (JSON)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        prepare(
            args.uri, args.out, args.variant, args.sha256, args.model_format, args.evaluation, args.gpu, args.recipe
        )
    except FetchError as exc:
        message = f"fetch failed: {exc}"
        print(message, file=sys.stderr)
        _termination_message(message)
        return 1
    print(
        f"model ready: {args.out} ({args.variant}, {args.out.stat().st_size} bytes, {time.monotonic() - start:.1f} s)"
    )
    return 0


def _termination_message(message: str) -> None:
    # Kubernetes shows /dev/termination-log in the pod's status: the reason reaches `kubectl describe`.
    with contextlib.suppress(OSError):
        Path("/dev/termination-log").write_text(message[:4000])


if __name__ == "__main__":
    sys.exit(main())
