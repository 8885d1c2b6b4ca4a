"""``leanserve bench``: profile a model's precision variants on the hardware it runs on.

Never assume an optimization helped: each variant's quality is measured on the
user's evaluation data against fp32, and its latency and throughput at growing
batch sizes, here, on this machine.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leanserve_serving.bench import flags, measure, quant_search
from leanserve_serving.bench.evaldata import EvalData, EvalDataError, load_eval_data, read_npz
from leanserve_serving.bench.pytorch import PyTorchModelError, export_to_onnx
from leanserve_serving.bench.stack import measure_stack, v2_bodies, v2_body
from leanserve_serving.bench.variants import BuiltVariant, build_variants
from leanserve_serving.cpus import cpu_limit
from leanserve_serving.fetch import sha256_of
from leanserve_serving.local import running_on
from leanserve_serving.model_server import spec_of
from leanserve_serving.profile import Profile, QuantRecipe, VariantProfile
from leanserve_serving.tensors import TensorSpec

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
    max_accuracy_drop: float | None = None
    """The accuracy gate INT8 variants are searched to keep (bench.quant_search): a whole-model INT8 variant
    over it is replaced by the fastest recipe found within it. None: whole-model INT8 only, no search."""
    quantization_search_s: float = quant_search.DEFAULT_BUDGET_S
    """Time budget of that search, per INT8 variant."""
    recipes: dict[str, QuantRecipe] = field(default_factory=dict)
    """INT8 variants to build by a recipe found before (another pod size of the same model), not searched."""
    pad_inputs: dict[str, float] = field(default_factory=dict)
    """Ragged batching in the stack run (the sidecar's setting): requests as long as their rows, padded in a
    batch to its longest. Empty: every request is the evaluation data's first row."""
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


@dataclass
class _Bench:
    """What every variant is measured with: the options, the evaluation data and fp32's outputs on it."""

    options: BenchOptions
    model: Path
    """The ONNX model (a TorchScript model's export)."""
    data: EvalData
    reference: np.ndarray
    specs: list[TensorSpec]
    threads: int
    gpu: bool
    work: Path
    progress: Progress


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
    bench = _Bench(options, model, data, reference, specs, threads, gpu, work, progress)
    results: list[VariantProfile] = []
    progress("building variants: " + ", ".join(options.variants))
    for built in build_variants(model, data, work, gpu, list(options.variants)):
        if built.status != "ok" or built.path is None:
            results.append(VariantProfile(name=built.name, status=built.status, reason=built.reason))  # type: ignore[arg-type]
            progress(f"{built.name}: {built.status} ({built.reason})")
            continue
        try:
            results.append(_profile_variant(bench, built, results))
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


def _profile_variant(bench: _Bench, built: BuiltVariant, done: list[VariantProfile]) -> VariantProfile:
    """Quality (after the accuracy-aware search, where the options ask for it), latency, memory, stack."""
    options, data = bench.options, bench.data
    assert built.path is not None

    def say(message: str) -> None:
        bench.progress(f"{built.name}: {message}")

    path, recipe = built.path, None
    known = options.recipes.get(built.name)
    if known is not None and known.outcome == "found":
        from leanserve_serving.bench.recipes import build_planned_variant

        say(f"built by the recipe found before ({known.excluded_count} node(s) in fp32)")
        path, recipe = build_planned_variant(bench.model, data, built.name, known, bench.work / "recipe"), known
    say(f"quality on {data.rows} rows")
    start = time.perf_counter()
    sess, load_s = measure.session(path, bench.threads, bench.gpu)
    outputs = measure.outputs(sess, data)
    value, drop = measure.quality(options.metric, outputs, data.labels, bench.reference)
    if recipe is None and options.max_accuracy_drop is not None and built.name in quant_search.METHODS:
        del sess
        found = quant_search.search_int8(
            _search_setup(bench, built.name, done, say),
            built.path,
            outputs,
            built.seconds + time.perf_counter() - start,
        )
        path, value, drop, recipe = found.path, found.value, found.drop, found.recipe
        sess, load_s = measure.session(path, bench.threads, bench.gpu)
    say("latency by batch size")
    curve = measure.latency_curve(sess, data, options.max_batch, options.seconds_per_point)
    rss, gpu_mb = measure.rss_mb(), measure.gpu_memory_mb()
    del sess
    stack_profile = None
    if options.stack_seconds > 0:
        say("through the serving stack (sidecar + model server)")
        bodies = v2_bodies(data.inputs, bench.specs) if options.pad_inputs else v2_body(data.inputs, bench.specs)
        figures = measure_stack(
            path,
            bodies,
            [p.batch_size for p in curve],
            options.stack_seconds,
            progress=say,
            cpus=options.cpus,
            client_cpus=options.client_cpus,
            pad_inputs=options.pad_inputs or None,
        )
        curve = [p.model_copy(update={"stack_ms": figures.batch_ms.get(p.batch_size)}) for p in curve]
        stack_profile = figures.profile
    return VariantProfile(
        name=built.name,  # type: ignore[arg-type]
        status="ok",
        size_bytes=path.stat().st_size,
        load_seconds=load_s,
        quality=value,
        quality_drop=drop,
        latency=curve,
        rss_mb=rss,
        gpu_memory_mb=gpu_mb,
        stack=stack_profile,
        recipe=recipe,
    )


#: Batch size at which the search times its candidates when fp32's best is not known (fp32 not benched).
SEARCH_BATCH = 8


def _search_setup(bench: _Bench, variant: str, done: list[VariantProfile], say: Progress) -> quant_search.SearchSetup:
    """The search of ``variant``, timing candidates at fp32's best batch size where fp32 is already measured."""
    options = bench.options
    fp32 = next((v.best() for v in done if v.name == "fp32"), None)
    batch = min(fp32.batch_size if fp32 else SEARCH_BATCH, options.max_batch)
    assert options.max_accuracy_drop is not None
    return quant_search.SearchSetup(
        variant=variant,
        model=bench.model,
        data=bench.data,
        reference=bench.reference,
        metric=options.metric,
        gate=options.max_accuracy_drop,
        budget_s=options.quantization_search_s,
        work=bench.work,
        threads=bench.threads,
        gpu=bench.gpu,
        batch=batch,
        progress=say,
    )
