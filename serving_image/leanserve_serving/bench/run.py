"""``leanserve bench``: profile a model's precision variants on the hardware it runs on.

Never assume an optimization helped: each variant's quality is measured on the
user's evaluation data against fp32, and its latency and throughput at growing
batch sizes, here, on this machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from leanserve_serving.bench import flags, measure
from leanserve_serving.bench.evaldata import EvalData, EvalDataError, load_eval_data, read_npz
from leanserve_serving.bench.pytorch import PyTorchModelError, export_to_onnx
from leanserve_serving.bench.stack import measure_stack, v2_body
from leanserve_serving.bench.variants import build_variants
from leanserve_serving.cpus import cpu_limit
from leanserve_serving.fetch import sha256_of
from leanserve_serving.local import running_on
from leanserve_serving.model_server import spec_of
from leanserve_serving.profile import Profile, VariantProfile

DEFAULT_VARIANTS = ["fp32", "int8-dynamic", "int8-static", "fp16"]


class BenchError(ValueError):
    """A model or data problem the user must fix, said plainly."""


@dataclass
class BenchOptions:
    model: Path
    evaluation: Path
    instance_type: str = "local"
    metric: str = "accuracy"
    variants: tuple[str, ...] = tuple(DEFAULT_VARIANTS)
    threads: int = 0
    max_batch: int = flags.MAX_BATCH
    seconds_per_point: float = flags.SECONDS_PER_POINT
    stack_seconds: float = flags.STACK_SECONDS
    """Load per batch size when timing the whole serving stack (bench.stack); 0 skips the stack."""
    cpus: frozenset[int] | None = None
    """Run the model (and the stack) on these CPUs only, as a pod with that many CPUs; None: all."""
    client_cpus: frozenset[int] | None = None
    """Where the stack run's client goes (see local.split_cpus); None: wherever the OS puts it."""
    gpu: bool | None = None
    """None: use the GPU when ONNX Runtime has the CUDA provider."""
    # model: an ONNX file, or a TorchScript file (.pt/.pth), exported to ONNX with a dynamic batch axis


Progress = Callable[[str], None]


def digest(path: Path) -> str:
    """``sha256:HEX`` of the file: the profile's model digest (the hex part is what spec.model.sha256 holds)."""
    return f"sha256:{sha256_of(path)}"


PYTORCH_SUFFIXES = (".pt", ".pth", ".torchscript")


def _onnx_model(options: BenchOptions, work: Path) -> Path:
    """The ONNX file to profile: the model itself, or its export when it is a TorchScript file."""
    if not options.model.is_file():
        raise BenchError(f"model file not found: {options.model}")
    if options.model.suffix not in PYTORCH_SUFFIXES:
        return options.model
    if options.evaluation.suffix != ".npz":
        raise BenchError("exporting a PyTorch model needs .npz evaluation data (example inputs)")
    try:
        samples = read_npz(options.evaluation).inputs
        return export_to_onnx(options.model, samples, work / f"{options.model.stem}.onnx")
    except (EvalDataError, PyTorchModelError) as exc:
        raise BenchError(str(exc)) from None


def _load_fp32(model: Path, threads: int, gpu: bool) -> tuple[ort.InferenceSession, float]:
    try:
        return measure.session(model, threads, gpu)
    except Exception as exc:  # ORT's own exception types for corrupt files
        raise BenchError(f"{model.name}: not a loadable ONNX model: {exc}") from None


def run_bench(options: BenchOptions, progress: Progress = lambda _: None) -> Profile:
    """Build, check and time every variant; return the Profile."""
    with tempfile.TemporaryDirectory(prefix="leanserve-bench-") as tmp, running_on(options.cpus):
        return _run(options, Path(tmp), progress)


def _run(options: BenchOptions, work: Path, progress: Progress) -> Profile:
    gpu = options.gpu if options.gpu is not None else "CUDAExecutionProvider" in ort.get_available_providers()
    threads = options.threads or cpu_limit()
    progress(f"loading {options.model.name}")
    model = _onnx_model(options, work)
    fp32_session, _ = _load_fp32(model, threads, gpu)
    specs = [spec_of(i) for i in fp32_session.get_inputs()]
    try:
        data: EvalData = load_eval_data(options.evaluation, specs, options.metric)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    try:
        reference = measure.outputs(fp32_session, data)
    except Exception as exc:
        raise BenchError(f"the model cannot run on the evaluation data: {exc}") from None
    del fp32_session
    results = []
    progress("building variants: " + ", ".join(options.variants))
    for built in build_variants(model, data, work, gpu, list(options.variants)):
        if built.status != "ok" or built.path is None:
            results.append(VariantProfile(name=built.name, status=built.status, reason=built.reason))  # type: ignore[arg-type]
            progress(f"{built.name}: {built.status} ({built.reason})")
            continue
        progress(f"{built.name}: quality on {data.rows} rows")
        try:
            sess, load_s = measure.session(built.path, threads, gpu)
            value, drop = measure.quality(options.metric, measure.outputs(sess, data), data.labels, reference)
            progress(f"{built.name}: latency by batch size")
            curve = measure.latency_curve(sess, data, options.max_batch, options.seconds_per_point)
            rss, gpu_mb = measure.rss_mb(), measure.gpu_memory_mb()
            del sess
            stack_profile = None
            if options.stack_seconds > 0:
                progress(f"{built.name}: through the serving stack (sidecar + model server)")
                sizes = [p.batch_size for p in curve]
                say = lambda m, n=built.name: progress(f"{n}: {m}")  # noqa: E731
                figures = measure_stack(
                    built.path,
                    v2_body(data.inputs, specs),
                    sizes,
                    options.stack_seconds,
                    progress=say,
                    cpus=options.cpus,
                    client_cpus=options.client_cpus,
                )
                curve = [p.model_copy(update={"stack_ms": figures.batch_ms.get(p.batch_size)}) for p in curve]
                stack_profile = figures.profile
            results.append(
                VariantProfile(
                    name=built.name,
                    status="ok",
                    size_bytes=built.path.stat().st_size,
                    load_seconds=load_s,  # type: ignore[arg-type]
                    quality=value,
                    quality_drop=drop,
                    latency=curve,
                    rss_mb=rss,
                    gpu_memory_mb=gpu_mb,
                    stack=stack_profile,
                )
            )
        except Exception as exc:  # a variant that builds but cannot run is a failed variant
            results.append(VariantProfile(name=built.name, status="failed", reason=f"{type(exc).__name__}: {exc}"))  # type: ignore[arg-type]
    return Profile(
        model_name=options.model.stem,
        model_digest=digest(options.model),
        instance_type=options.instance_type,
        metric=options.metric,
        evaluation_rows=data.rows,
        threads=threads,  # type: ignore[arg-type]
        hardware=measure.hardware(cpu_limit()),
        variants=results,
    )
