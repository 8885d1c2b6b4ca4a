"""Ragged batching: requests of different sequence lengths batch together, padded to the batch's longest.

Unit tests of the batcher's signature, merge, split and padding bound, of the ``pad_inputs`` setting, and one
test against real processes (the ONNX Runtime model server behind the sidecar, over real HTTP, JSON and
binary) with a small text-like model built here.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from leanserve_serving.batcher import (
    MAX_PADDING_RATIO,
    PADDED,
    BatchStats,
    DynamicBatcher,
    PaddedSize,
    merge,
    padded_length,
    signature,
    split,
)
from leanserve_serving.cache import exact_key
from leanserve_serving.config import SidecarConfig, load_config, parse_pad_inputs
from leanserve_serving.sidecar import main as sidecar_main
from leanserve_serving.tensors import HEADER_LENGTH, InferRequest, Tensor, TensorSpec, decode_outputs, encode_request
from tests.serving_harness import Process, metric, model_server, post, post_raw, sidecar

PAD = {"input_ids": 0, "attention_mask": 0}


def text(ids: list[list[int]], mask: list[list[int]] | None = None, **extra: Any) -> InferRequest:
    """A BERT-like request: input_ids and attention_mask, INT64 [rows, seq]."""
    a = np.asarray(ids, dtype=np.int64)
    m = np.asarray(mask, dtype=np.int64) if mask is not None else np.ones_like(a)
    inputs = [Tensor("input_ids", "INT64", a.shape, a), Tensor("attention_mask", "INT64", m.shape, m)]
    return InferRequest(inputs=inputs, **extra)


def tensor(name: str, data: np.ndarray, datatype: str = "FP32") -> Tensor:
    return Tensor(name, datatype, tuple(data.shape), data)


# ---- off by default: exactly as before -------------------------------------------------------------------


def test_without_pad_inputs_the_signature_is_the_exact_one_as_before():
    request = text([[1, 2, 3]], outputs=["logits"], parameters={"b": 1, "a": 2})
    expected = (
        "bert",
        (("attention_mask", "INT64", (3,)), ("input_ids", "INT64", (3,))),
        ("logits",),
        orjson.dumps({"a": 2, "b": 1}),
    )
    assert signature("bert", request) == expected
    assert signature("bert", request, {}) == expected
    assert signature("bert", request, None) == expected
    assert signature("bert", text([[1, 2]])) != signature("bert", text([[1, 2, 3]]))


def test_without_pad_inputs_merge_concatenates_byte_for_byte_as_before():
    requests = [text([[1, 2, 3]]), text([[4, 5, 6], [7, 8, 9]], [[1, 1, 0], [1, 0, 0]])]
    before = [np.concatenate([r.inputs[i].data for r in requests]) for i in range(2)]
    for merged in (merge(requests), merge(requests, {})):
        assert [(t.name, t.datatype, t.shape) for t in merged.inputs] == [
            ("input_ids", "INT64", (3, 3)),
            ("attention_mask", "INT64", (3, 3)),
        ]
        for got, want in zip(merged.inputs, before, strict=True):
            assert got.data.dtype == want.dtype and got.data.tobytes() == want.tobytes()
        wire = encode_request(merged, True, True)
        assert wire == encode_request(merge(requests, None), True, True)


def test_without_pad_inputs_split_is_by_rows_only():
    logits = tensor("logits", np.arange(12, dtype=np.float32).reshape(3, 4))
    parts = split([logits], [1, 2])
    assert [p[0].shape for p in parts] == [(1, 4), (2, 4)]
    for a, b in zip(parts, split([logits], [1, 2], [None, None]), strict=True):
        assert a[0].shape == b[0].shape and a[0].data.tobytes() == b[0].data.tobytes()


# ---- signature ---------------------------------------------------------------------------------------------


def test_requests_differing_only_in_the_padded_length_share_a_signature():
    short, long_ = text([[1, 2]]), text([[1, 2, 3, 4, 5]])
    assert signature("bert", short, PAD) == signature("bert", long_, PAD)
    assert signature("bert", short, PAD) != signature("bert", short)  # a padded signature is its own
    inputs = signature("bert", short, PAD)[1]  # type: ignore[index]
    assert inputs == (("attention_mask", "INT64", (PADDED,)), ("input_ids", "INT64", (PADDED,)))
    assert padded_length(short, PAD) == 2 and padded_length(long_, PAD) == 5


def test_a_request_that_cannot_be_padded_keeps_its_exact_signature():
    """Named inputs of different lengths, of another rank, of BYTES, or a pad value the datatype cannot hold:
    no 400 from the batcher (the model's own checks answer a malformed request), just no padding."""
    uneven = text([[1, 2, 3]], [[1, 1]])
    assert padded_length(uneven, PAD) is None
    assert signature("bert", uneven, PAD) == signature("bert", uneven)

    cube = np.zeros((1, 3, 2), dtype=np.float32)
    rank3 = InferRequest(inputs=[tensor("input_ids", cube)])
    assert signature("m", rank3, PAD) == signature("m", rank3)

    words = np.array([["a", "b"]], dtype=object)
    bytes_ = InferRequest(inputs=[Tensor("input_ids", "BYTES", (1, 2), words)])
    assert signature("m", bytes_, PAD) == signature("m", bytes_)

    request = text([[1, 2, 3]])
    assert signature("bert", request, {"input_ids": 0.5}) == signature("bert", request)
    assert signature("bert", request, {"input_ids": 2**70}) == signature("bert", request)
    assert padded_length(request, {"input_ids": -1}) == 3  # any integer an INT64 holds


def test_inputs_not_named_keep_their_shape_in_the_signature():
    """token_type_ids [1, seq] not named: requests of different lengths stay apart (name every sequence input)."""
    types = [Tensor("token_type_ids", "INT64", (1, n), np.zeros((1, n), np.int64)) for n in (2, 3)]
    a, b = text([[1, 2]]), text([[1, 2, 3]])
    a.inputs.append(types[0])
    b.inputs.append(types[1])
    assert signature("bert", a, PAD) != signature("bert", b, PAD)
    assert signature("bert", text([[1]]), {"input_ids": 0}) != signature("bert", text([[1, 2]]), {"input_ids": 0})


def test_a_scalar_input_still_cannot_batch():
    request = InferRequest(inputs=[Tensor("input_ids", "INT64", (), np.array(3, dtype=np.int64))])
    assert signature("m", request, PAD) is None


# ---- merge ---------------------------------------------------------------------------------------------------


def test_merge_right_pads_each_named_input_with_its_value_to_the_longest():
    requests = [text([[1, 2]]), text([[3, 4, 5, 6]]), text([[7, 8, 9], [10, 11, 12]])]
    merged = merge(requests, {"input_ids": 99, "attention_mask": 0})
    ids, mask = (t.data for t in merged.inputs)
    assert merged.inputs[0].shape == (4, 4) and ids.dtype == np.int64
    assert ids.tolist() == [[1, 2, 99, 99], [3, 4, 5, 6], [7, 8, 9, 99], [10, 11, 12, 99]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]


def test_merge_leaves_the_requests_and_their_exact_cache_keys_as_they_were():
    requests = [text([[1, 2]]), text([[3, 4, 5, 6]])]
    keys = [exact_key("bert", "1", r, set()) for r in requests]
    merge(requests, PAD)
    assert [r.inputs[0].shape for r in requests] == [(1, 2), (1, 4)]
    assert requests[0].inputs[0].data.tolist() == [[1, 2]]
    assert [exact_key("bert", "1", r, set()) for r in requests] == keys
    assert keys[0] != exact_key("bert", "1", merge(requests, PAD), set())


def test_merge_pads_a_float_input_with_a_float_value():
    parts = [InferRequest(inputs=[tensor("x", np.ones((1, n), np.float32))]) for n in (1, 3)]
    data = merge(parts, {"x": -0.5}).inputs[0].data
    assert data.dtype == np.float32 and data.tolist() == [[1.0, -0.5, -0.5], [1.0, 1.0, 1.0]]


# ---- split ---------------------------------------------------------------------------------------------------


def test_split_cuts_outputs_carrying_the_sequence_axis_back_to_each_members_length():
    tokens = tensor("tokens", np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2))
    logits = tensor("logits", np.arange(6, dtype=np.float32).reshape(3, 2))
    parts = split([tokens, logits], [1, 2], [4, 2])
    assert [t.shape for t in parts[0]] == [(1, 4, 2), (1, 2)]
    assert [t.shape for t in parts[1]] == [(2, 2, 2), (2, 2)]
    np.testing.assert_array_equal(parts[1][0].data, tokens.data[1:, :2])
    assert parts[1][0].data.flags.c_contiguous


def test_split_never_cuts_an_output_the_model_declares_of_fixed_width():
    """[batch, 2] logits in a batch whose longest length is 2: a shape that looks like the sequence axis."""
    logits = tensor("logits", np.arange(6, dtype=np.float32).reshape(3, 2))
    tokens = tensor("tokens", np.zeros((3, 2), np.float32))
    parts = split([logits, tokens], [1, 2], [1, 2], sequence_outputs={"tokens"})
    assert [t.shape for t in parts[0]] == [(1, 2), (1, 1)]
    assert split([logits], [1, 2], [1, 2])[0][0].shape == (1, 1)  # model unknown: any such output is cut


def test_split_of_a_batch_of_one_length_cuts_nothing():
    tokens = tensor("tokens", np.zeros((2, 3), np.float32))
    assert [p[0].shape for p in split([tokens], [1, 1], [3, 3])] == [(1, 3), (1, 3)]


# ---- the padding bound ---------------------------------------------------------------------------------------


def test_the_padding_bound_keeps_a_long_request_from_padding_many_short_ones():
    batch = PaddedSize()
    batch.add(1, 4096)
    assert batch.admits(1, 1)  # 2 x 4096 padded for 4097 brought: within twice
    batch.add(1, 1)
    assert not batch.admits(1, 1)  # 3 x 4096 for 4098: more than twice
    assert PaddedSize().admits(1, 4096)  # the first member always
    assert batch.admits(5, None)  # an unpadded request is not padding's business
    near = PaddedSize()
    for n in range(10, 22):  # lengths within a factor of two batch without limit
        assert near.admits(1, n)
        near.add(1, n)


def fake_model(request: InferRequest) -> list[Tensor]:
    """What a masked encoder answers: logits from the masked sum of ids, tokens the ids per position."""
    ids, mask = (t.data for t in request.inputs)
    logits = np.stack([(ids * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)
    tokens = (ids * 2).astype(np.float32)[..., None]
    return [tensor("logits", logits), tensor("tokens", tokens)]


def run_batcher(requests: list[InferRequest], **settings: Any) -> tuple[list[list[Tensor]], list[tuple], int]:
    """Submit ``requests`` at once to a batcher over :func:`fake_model`; its answers, the merged input shapes
    sent upstream and the pad values counted."""
    sent: list[tuple[int, ...]] = []
    padded = [0]

    async def upstream(_: str, merged: InferRequest) -> list[Tensor]:
        sent.append(merged.inputs[0].shape)
        return fake_model(merged)

    async def go() -> list[list[Tensor]]:
        specs = [TensorSpec("logits", "FP32", (-1, 2)), TensorSpec("tokens", "FP32", (-1, -1, 1))]
        batcher = DynamicBatcher(
            upstream,
            max_batch_size=settings.pop("max_batch_size", 64),
            max_wait_s=0.05,
            max_queue=1000,
            concurrency=1,
            stats=BatchStats(on_padding=lambda _, n: padded.__setitem__(0, padded[0] + n)),
            declared_outputs=lambda model: specs,
            **settings,
        )
        return await asyncio.gather(*(batcher.submit("bert", r, 5.0) for r in requests))

    return asyncio.run(go()), sent, padded[0]


def test_the_batcher_batches_lengths_together_and_answers_each_as_alone():
    requests = [text([[i + 1] * n], [[1] * n]) for i, n in enumerate([3, 5, 4, 5, 2])]
    answers, sent, padded = run_batcher(requests, pad_inputs=PAD)
    assert sent == [(5, 5)]
    assert padded == 2 * (2 + 0 + 1 + 0 + 3)  # two padded inputs
    for request, answer in zip(requests, answers, strict=True):
        alone = fake_model(request)
        for got, want in zip(answer, alone, strict=True):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got.data, want.data)


def test_the_batcher_without_pad_inputs_batches_only_equal_lengths():
    requests = [text([[1] * n]) for n in (3, 5, 3)]
    _, sent, padded = run_batcher(requests)
    assert sorted(sent) == [(1, 5), (2, 3)] and padded == 0


def test_the_batcher_sends_a_long_request_with_few_short_ones():
    """One 4096-token request and 31 one-token requests: the padding bound gives the long one a single
    companion, the short ones batch together."""
    requests = [text([[7] * 4096]), *(text([[i]]) for i in range(1, 32))]
    answers, sent, _ = run_batcher(requests, pad_inputs=PAD)
    assert sent == [(2, 4096), (30, 1)]
    for shape in sent:
        assert shape[0] * shape[1] <= MAX_PADDING_RATIO * (4097 if shape[1] == 4096 else shape[0])
    assert answers[0][1].shape == (1, 4096, 1) and answers[1][1].shape == (1, 1, 1)


# ---- the setting -------------------------------------------------------------------------------------------


def test_pad_inputs_is_off_by_default_and_read_from_file_environment_and_flags(tmp_path):
    assert SidecarConfig().pad_inputs == {}
    assert load_config(SidecarConfig, environ={}).pad_inputs == {}
    file = tmp_path / "sidecar.json"
    file.write_text('{"pad_inputs": {"input_ids": 0, "attention_mask": 0}}')
    assert load_config(SidecarConfig, environ={"LEANSERVE_CONFIG_FILE": str(file)}).pad_inputs == PAD
    env = {"LEANSERVE_CONFIG_FILE": str(file), "LEANSERVE_PAD_INPUTS": " input_ids = 1 , scores=-0.5 "}
    assert load_config(SidecarConfig, environ=env).pad_inputs == {"input_ids": 1, "scores": -0.5}
    assert load_config(SidecarConfig, environ={"LEANSERVE_PAD_INPUTS": '{"x": 2.5}'}).pad_inputs == {"x": 2.5}
    assert load_config(SidecarConfig, environ={"LEANSERVE_PAD_INPUTS": ""}).pad_inputs == {}
    assert load_config(SidecarConfig, {"pad_inputs": None}, environ={}).pad_inputs == {}
    off = tmp_path / "sidecar.yaml"
    off.write_text("pad_inputs: null\n")
    assert load_config(SidecarConfig, environ={"LEANSERVE_CONFIG_FILE": str(off)}).pad_inputs == {}
    flags = load_config(SidecarConfig, {"pad_inputs": "input_ids=3"}, environ=env)
    assert flags.pad_inputs == {"input_ids": 3} and isinstance(flags.pad_inputs["input_ids"], int)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("input_ids", "'input_ids' in 'input_ids' is not name=value"),
        ("=0", "an input name must be a non-empty string, got ''"),
        ("input_ids=zero", "the pad value of 'input_ids' must be a number, got 'zero'"),
        ("input_ids=nan", "the pad value of 'input_ids' must be a finite number, got nan"),
        ("a=0,a=1", "input 'a' is named twice in 'a=0,a=1'"),
        ({"a": True}, "the pad value of 'a' must be a finite number, got True"),
        ({"a": "0"}, None),
        (["a"], "expected a mapping of input name to pad value, got ['a']"),
        ("{not json", "'{not json' is not a JSON object"),
    ],
)
def test_a_bad_pad_inputs_setting_is_refused_naming_the_setting_and_the_culprit(value, reason):
    if reason is None:
        assert parse_pad_inputs(value) == {"a": 0}
        return
    with pytest.raises(ValueError, match=r"^pad_inputs: ") as err:
        load_config(SidecarConfig, {"pad_inputs": value}, environ={})
    assert reason in str(err.value)


def test_the_sidecar_flag_refuses_a_bad_value_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exit_:
        sidecar_main(["--pad-inputs", "input_ids=zero"])
    assert exit_.value.code == 2
    assert "pad_inputs: the pad value of 'input_ids' must be a number, got 'zero'" in capsys.readouterr().err


# ---- real processes ------------------------------------------------------------------------------------------


def make_encoder(path: Path, vocab: int = 50, width: int = 4, seed: int = 3) -> Path:
    """A masked text encoder: input_ids and attention_mask INT64 [batch, seq]; ``logits`` FP32 [batch, 2] from
    the masked sum of embeddings, ``tokens`` FP32 [batch, seq, 2] per position (masked)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (vocab, width)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.normal(0, 1, (width, 2)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("MatMul", ["masked", "w"], ["tokens"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", 2]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="leanserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def body_of(ids: list[int]) -> dict[str, Any]:
    n = len(ids)
    return {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, n], "data": ids},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, n], "data": [1] * n},
        ]
    }


def binary_post(url: str, ids: list[int]) -> tuple[int, dict[str, np.ndarray]]:
    """The same request with binary inputs and outputs (the binary tensor data extension)."""
    request = text([ids])
    payload, header_length = encode_request(request, binary_outputs=True, binary_inputs=True)
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
    status, raw, answer_headers = post_raw(url, payload, headers, timeout=30)
    assert status == 200, raw[:300]
    outputs = decode_outputs(raw, answer_headers.get(HEADER_LENGTH))
    return status, {t.name: t.data.reshape(t.shape) for t in outputs}


def test_requests_of_different_lengths_batch_through_the_real_sidecar_and_each_gets_its_own_answer(
    tmp_path: Path, started: list[Process]
):
    """24 concurrent requests of 10 to 21 tokens (any mix within the padding bound), half JSON, half binary:
    each answer, the token-level output cut to its own length included, equals the model server's answer to
    that request alone; the sidecar's metrics show batches of several rows and pad values added."""
    upstream = model_server(make_encoder(tmp_path / "encoder.onnx"), "encoder", tmp_path).start()
    started.append(upstream)
    car = sidecar(upstream.url, tmp_path, max_batch_size=32, max_wait_ms=300, pad_inputs="input_ids=0,attention_mask=0")
    started.append(car.start())
    infer = car.url + "/v2/models/encoder/infer"
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 50, n).tolist() for n in [*range(10, 22), *range(10, 22)]]
    assert post(infer, body_of(sequences[0]))[0] == 200  # the model's metadata read before the burst
    before = metric(car.url, "leanserve_batch_size_count", 'model="encoder"')

    def ask(i: int) -> dict[str, np.ndarray]:
        if i % 2:
            return binary_post(infer, sequences[i])[1]
        status, body, _ = post(infer, body_of(sequences[i]), timeout=30)
        assert status == 200, body
        return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}

    with ThreadPoolExecutor(max_workers=len(sequences)) as pool:
        answers = list(pool.map(ask, range(len(sequences))))

    for ids, got in zip(sequences, answers, strict=True):
        status, alone, _ = post(upstream.url + "/v2/models/encoder/infer", body_of(ids))
        assert status == 200, alone
        for out in alone["outputs"]:
            want = np.asarray(out["data"], np.float32).reshape(out["shape"])
            assert got[out["name"]].shape == want.shape, out["name"]
            np.testing.assert_allclose(got[out["name"]], want, rtol=1e-5, atol=1e-5)

    batches = metric(car.url, "leanserve_batch_size_count", 'model="encoder"') - before
    rows = metric(car.url, "leanserve_batch_size_sum", 'model="encoder"') - 1
    assert rows == len(sequences)
    assert batches < len(sequences), f"{batches:g} batches for {len(sequences)} requests: none batched"
    assert metric(car.url, "leanserve_padding_elements_total", 'model="encoder"') > 0, "no batch across lengths"
