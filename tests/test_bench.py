"""leanserve bench on real ONNX Runtime sessions: variants, quality against fp32, latency curves, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leanserve_serving.bench.evaldata import EvalDataError
from leanserve_serving.bench.run import BenchError, BenchOptions, run_bench
from leanserve_serving.local import cli_flags
from leanserve_serving.profile import TERMINATION_MESSAGE_LIMIT, LatencyPoint, Profile, VariantProfile
from leanserve_serving.reference_models import ReferenceModel, make_tabular

FAST = {"seconds_per_point": 0.02, "max_batch": 64, "stack_seconds": 0.1}


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    return make_tabular(tmp_path_factory.mktemp("tabular"))


@pytest.fixture(scope="module")
def profile(tabular: ReferenceModel) -> Profile:
    return run_bench(BenchOptions(tabular.model, tabular.evaluation, instance_type="test", **FAST))


def test_reference_model_is_trained_and_deterministic(tabular, tmp_path):
    assert 0.75 < tabular.accuracy < 0.99, "trained well enough that an accuracy drop means something"
    again = make_tabular(tmp_path)
    assert again.model.read_bytes() == tabular.model.read_bytes()
    assert again.accuracy == tabular.accuracy


def test_every_cpu_variant_profiles_and_fp16_is_reported_skipped(profile):
    status = {v.name: v.status for v in profile.variants}
    assert status == {"fp32": "ok", "int8-dynamic": "ok", "int8-static": "ok", "fp16": "skipped"}
    assert "no GPU" in profile.variant("fp16").reason
    assert profile.hardware.vcpus >= 1 and profile.hardware.onnxruntime
    assert profile.model_digest.startswith("sha256:")


def test_quality_drops_are_exact_and_within_sane_bounds(profile, tabular):
    fp32 = profile.variant("fp32")
    assert fp32.quality == pytest.approx(tabular.accuracy, abs=1e-9)
    assert fp32.quality_drop == 0
    for name in ("int8-dynamic", "int8-static"):
        v = profile.variant(name)
        assert v.quality_drop == pytest.approx(fp32.quality - v.quality, abs=1e-12)
        assert -0.02 <= v.quality_drop <= 0.05, f"{name} drop {v.quality_drop}"


def test_latency_curves_grow_batch_by_batch(profile):
    for v in profile.variants:
        if v.status != "ok":
            continue
        sizes = [p.batch_size for p in v.latency]
        assert sizes[0] == 1 and len(sizes) >= 3
        assert sizes == [2**i for i in range(len(sizes))]
        assert all(p.p50_ms <= p.p95_ms <= p.p99_ms for p in v.latency)
        assert v.best().throughput_rps > v.latency[0].throughput_rps  # batching pays on this model
        assert v.load_seconds > 0 and v.rss_mb > 0 and v.size_bytes > 0


def test_the_serving_stack_is_timed_for_every_variant(profile):
    """Real sidecar + model server processes: a batch through them costs more than the model alone, more rows
    cost more, the jitter is a spread around 1, and a request's time outside the batch path is positive."""
    for v in profile.variants:
        if v.status != "ok":
            continue
        assert v.stack is not None
        timed = [p for p in v.latency if p.stack_ms is not None]
        assert [p.batch_size for p in timed] == [p.batch_size for p in v.latency if p.batch_size <= 128]
        for p in timed:
            assert p.stack_ms > p.batch_size / p.throughput_rps * 1000  # HTTP and JSON are not free
        assert timed[-1].stack_ms > timed[0].stack_ms
        assert v.stack.jitter == sorted(v.stack.jitter) and v.stack.jitter[0] <= 1.0 <= v.stack.jitter[-1]
        assert v.stack.outside_ms == sorted(v.stack.outside_ms) and v.stack.outside_ms[-1] > 0


def test_compact_profile_fits_a_termination_message_and_round_trips(profile):
    text = profile.to_compact()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = Profile.from_compact(text)
    assert back.model_digest == profile.model_digest
    assert [v.name for v in back.variants] == [v.name for v in profile.variants]
    assert back.variant("fp32").quality == pytest.approx(profile.variant("fp32").quality, rel=1e-3)
    assert back.variant("fp32").stack.outside_ms[-1] == pytest.approx(
        profile.variant("fp32").stack.outside_ms[-1], rel=1e-2
    )


def test_compact_profile_thins_long_curves_but_keeps_the_best_point(profile):
    points = [
        LatencyPoint(
            batch_size=2**i,
            p50_ms=1.123456 * i + 1,
            p95_ms=2.0 * i + 2,
            p99_ms=3.0 * i + 3,
            throughput_rps=1000.0 + (500 if i == 7 else i),
        )
        for i in range(11)
    ]
    variants = [
        VariantProfile(name=n, status="ok", latency=points, reason="x" * 1000, quality=0.9, quality_drop=0.0)
        for n in ("fp32", "int8-dynamic", "int8-static", "fp16")
    ]
    big = profile.model_copy(update={"variants": variants})
    text = big.to_compact()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    for v in Profile.from_compact(text).variants:
        assert v.best().batch_size == 128
        assert len(v.reason) <= 300


def test_corrupt_model_file_is_a_clear_error(tabular, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    with pytest.raises(BenchError, match="not a loadable ONNX model"):
        run_bench(BenchOptions(bad, tabular.evaluation, **FAST))


def _torch_mlp_from(tabular: ReferenceModel):
    """The tabular reference model's weights in a torch.nn.Sequential (so its accuracy is known)."""
    import onnx
    import torch
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tabular.model)).graph.initializer}
    layers: list[torch.nn.Module] = []
    for i in range(3):
        w = weights[f"W{i}"]
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(weights[f"B{i}"]))
        layers += [linear, torch.nn.ReLU()] if i < 2 else [linear]
    return torch.nn.Sequential(*layers).eval()


def test_torchscript_model_is_exported_to_onnx_and_profiled(tabular, tmp_path):
    import torch

    path = tmp_path / "tabular.pt"
    torch.jit.save(torch.jit.script(_torch_mlp_from(tabular)), str(path))
    profile = run_bench(BenchOptions(path, tabular.evaluation, variants=("fp32", "int8-dynamic"), **FAST))
    assert profile.model_name == "tabular"
    assert profile.variant("fp32").quality == pytest.approx(tabular.accuracy, abs=1e-9)  # the same function
    assert profile.variant("int8-dynamic").status == "ok"
    assert profile.model_digest.startswith("sha256:")


def test_pickled_pytorch_module_is_refused(tabular, tmp_path):
    """torch.save(model) is a pickle: loading it would run code, so the bench refuses it."""
    import torch

    path = tmp_path / "pickled.pt"
    torch.save(_torch_mlp_from(tabular), str(path))
    with pytest.raises(BenchError, match="not a TorchScript archive"):
        run_bench(BenchOptions(path, tabular.evaluation, **FAST))


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"features": np.zeros((10, 64), np.float32), "labels": np.zeros(10, np.int64)}, "no array for model input"),
        ({"input": np.zeros((10, 63), np.float32), "labels": np.zeros(10, np.int64)}, "the model expects [-1, 64]"),
        ({"input": np.zeros((10, 64), np.float32), "labels": np.zeros(9, np.int64)}, "9 labels for 10 rows"),
        ({"input": np.zeros((10, 64), np.float32)}, "needs labels"),
        ({"input": np.array([["a"] * 64] * 10), "labels": np.zeros(10, np.int64)}, "must hold numbers"),
    ],
    ids=["missing-input", "wrong-shape", "label-count", "no-labels", "strings"],
)
def test_mismatched_evaluation_data_is_a_clear_error(tabular, tmp_path, arrays, message):
    data = _npz(tmp_path / "eval.npz", **arrays)
    with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_bench(BenchOptions(tabular.model, data, **FAST))


def test_pickled_evaluation_data_is_refused(tabular, tmp_path):
    data = _npz(tmp_path / "eval.npz", input=np.array([object()] * 10, dtype=object), labels=np.zeros(10))
    with pytest.raises(BenchError, match="object arrays are refused"):
        run_bench(BenchOptions(tabular.model, data, **FAST))
    assert issubclass(EvalDataError, ValueError)


def test_cli_writes_full_and_compact_profiles(tabular, tmp_path):
    exe = shutil.which("leanserve", path=str(Path(sys.executable).parent))
    full, compact = tmp_path / "profile.json", tmp_path / "termination-log"
    flags = cli_flags(
        eval=tabular.evaluation,
        instance_type="c6i.2xlarge",
        variants="fp32,int8-dynamic",
        seconds_per_point=0.02,
        max_batch=16,
        stack_seconds=0.1,
        out=full,
        compact_out=compact,
    )
    proc = subprocess.run(
        [exe, "bench", str(tabular.model), *flags], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [v["variant"] for v in summary["variants"]] == ["fp32", "int8-dynamic"]
    assert Profile.model_validate_json(full.read_text()).instance_type == "c6i.2xlarge"
    assert len(compact.read_bytes()) <= TERMINATION_MESSAGE_LIMIT
    assert "int8-dynamic" in proc.stderr  # the summary table


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    from leanserve_serving.reference_models import make_text_classifier

    return make_text_classifier(tmp_path_factory.mktemp("text"))


def test_text_reference_model_encoder_matches_minilm_and_is_trained(text_model):
    """The ONNX encoder is the same function as the numpy MiniLM embedder, and the head learned the task."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from leanserve_serving.embedders import MiniLMEmbedder

    assert 0.8 < text_model.accuracy < 0.99
    model = onnx.load(str(text_model.model))
    model.graph.output.append(helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, ["batch", 384]))
    sess = ort.InferenceSession(model.SerializeToString())
    embedder = MiniLMEmbedder()
    text = "the battery is not great"
    ids = np.array([embedder.tokenizer.encode(text).ids], np.int64)
    pooled = sess.run(["pooled"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
    assert float(pooled @ embedder.embed(text)) > 0.9999


def test_text_model_variants_profile_with_their_real_accuracy(text_model):
    profile = run_bench(
        BenchOptions(
            text_model.model,
            text_model.evaluation,
            variants=("fp32", "int8-dynamic", "int8-static"),
            seconds_per_point=0.05,
            max_batch=2,
        )
    )
    fp32 = profile.variant("fp32")
    assert fp32.quality == pytest.approx(text_model.accuracy, abs=1e-9)
    for name in ("int8-dynamic", "int8-static"):
        v = profile.variant(name)
        assert v.status == "ok", v.reason
        assert v.quality_drop == pytest.approx(fp32.quality - v.quality, abs=1e-12)
    # Dynamic INT8 keeps the encoder close; static QDQ (MinMax) is allowed to be bad: the gate must see it.
    assert abs(profile.variant("int8-dynamic").quality_drop) < 0.1


GPU_FIXTURE = Path(__file__).parent / "fixtures" / "profiles" / "tabular-nvidia-h200.json"


def test_gpu_profile_fixture_is_labelled_with_the_hardware_it_came_from():
    """Measured on the device machine (one H200) by benchmarks/gpu_profile.py with onnxruntime-gpu."""
    profile = Profile.model_validate_json(GPU_FIXTURE.read_text())
    assert profile.hardware.gpu == "NVIDIA H200"
    assert profile.instance_type == "nvidia-h200"  # never a cloud type it was not measured on (g4dn = T4)
    assert "CUDAExecutionProvider" in profile.hardware.providers
    assert {v.name: v.status for v in profile.variants} == {
        n: "ok" for n in ("fp32", "int8-dynamic", "int8-static", "fp16")
    }
    fp16 = profile.variant("fp16")
    assert abs(fp16.quality_drop) < 0.01
    assert len(profile.to_compact().encode()) <= TERMINATION_MESSAGE_LIMIT


def test_regression_and_embedding_metrics():
    from leanserve_serving.bench.measure import quality

    labels = np.array([1.0, 2.0, 3.0, 4.0])
    reference = labels + 0.1
    value, drop = quality("mse", labels + 0.2, labels, reference)  # relative error: mse / mean(label^2)
    assert value == pytest.approx(0.04 / 7.5)
    assert drop == pytest.approx((0.04 - 0.01) / 7.5)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]])
    value, drop = quality("cosine", np.array([[1.0, 0.0], [1.0, 1.0]]), None, vectors)
    assert value == pytest.approx((1 + 2**-0.5) / 2)
    assert drop == pytest.approx(1 - value)


def test_the_closed_loop_runs_its_time_after_a_slow_first_reply():
    """Opening many connections and a first full batch can outlast a short run: the run is timed from the first
    reply, so the window after the warm-up cut (which starts at the first reply) is never empty."""
    import asyncio
    import time

    from leanserve_serving.bench.stack import closed_loop

    async def scenario() -> list[float]:
        first = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    if not first.is_set():
                        await asyncio.sleep(0.5)  # the slow start
                        first.set()
                    await first.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await closed_loop(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 4, 0.3)

    start = time.perf_counter()
    done = asyncio.run(scenario())
    assert done[0] - start >= 0.5
    assert max(done) - min(done) >= 0.3 - 0.02  # the whole run after the first reply, not what the start left


def _bench_cli(tabular: ReferenceModel, **outputs: Path) -> list[str]:
    flags = cli_flags(eval=tabular.evaluation, variants="fp32", seconds_per_point=0.02, max_batch=4, stack_seconds=0.1)
    return ["bench", str(tabular.model), *flags, *cli_flags(**outputs)]


@pytest.mark.parametrize("option", ["out", "compact_out"])
def test_cli_refuses_an_unwritable_output_before_benching(tabular, tmp_path, monkeypatch, capsys, option):
    from leanserve import cli
    from leanserve_serving.bench import run as bench_run

    def no_bench(*_args: object, **_kwargs: object) -> Profile:
        raise AssertionError("benched although the output cannot be written")

    monkeypatch.setattr(bench_run, "run_bench", no_bench)
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "profile.json"  # its parent is a file: neither created nor written
    assert cli.main(_bench_cli(tabular, **{option: target})) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot write {target}" in " ".join(err.split())


def test_cli_creates_the_output_folders(tabular, tmp_path, capsys):
    from leanserve import cli

    full, compact = tmp_path / "prof" / "lr.json", tmp_path / "logs" / "deep" / "termination-log"
    assert cli.main(_bench_cli(tabular, out=full, compact_out=compact)) == 0
    capsys.readouterr()
    assert Profile.model_validate_json(full.read_text()).variants[0].name == "fp32"
    assert 0 < len(compact.read_bytes()) <= TERMINATION_MESSAGE_LIMIT


def test_sequence_batches_are_cut_to_their_own_longest_row():
    """A batch of right-padded token rows runs at its longest row's width, as a server pads a batch; inputs
    not shaped like the mask (and data without a mask) come unchanged; trim=False keeps the set's width."""
    from leanserve_serving.bench.evaldata import EvalData

    lengths = np.array([3, 7, 2, 5])
    mask = (np.arange(9) < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, 1000, 0)
    pooled_bias = np.ones((4, 3), np.float32)
    data = EvalData({"input_ids": ids, "attention_mask": mask, "bias": pooled_bias}, np.zeros(4, np.int64))
    short = data.batch(2, 2)  # rows 2 and 3: lengths 2 and 5
    assert short["input_ids"].shape == short["attention_mask"].shape == (2, 5)
    assert short["bias"].shape == (2, 3)
    np.testing.assert_array_equal(short["attention_mask"].sum(1), [2, 5])
    assert data.batch(0, 4)["input_ids"].shape == (4, 7)
    assert data.batch(3, 2)["input_ids"].shape == (2, 5)  # wraps: rows 3 and 0
    assert data.batch(2, 2, trim=False)["input_ids"].shape == (2, 9)
    assert data.take(np.array([1]))["attention_mask"].shape == (1, 7)
    plain = EvalData({"input": np.zeros((4, 9), np.float32)}, None)
    assert plain.batch(0, 2)["input"].shape == (2, 9)


def test_latency_batches_are_drawn_from_the_whole_set_with_a_fixed_seed():
    from leanserve_serving.bench.evaldata import EvalData
    from leanserve_serving.bench.measure import SAMPLED_BATCHES, sample_batches

    lengths = np.arange(1, 101)  # row i has i+1 tokens
    mask = (np.arange(100) < lengths[:, None]).astype(np.int64)
    data = EvalData({"input_ids": mask * 7, "attention_mask": mask}, None)
    batches = sample_batches(data, 1)
    assert len(batches) == SAMPLED_BATCHES
    widths = [b["input_ids"].shape[1] for b in batches]
    assert len(set(widths)) > 10 and max(widths) - min(widths) > 50, "single rows of many lengths, not the first"
    assert [b["input_ids"].shape for b in sample_batches(data, 8)] == [
        b["input_ids"].shape for b in sample_batches(data, 8)
    ]
    assert all(b["input_ids"].shape[0] == 200 for b in sample_batches(data, 200))  # more rows than the set
