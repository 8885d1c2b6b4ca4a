"""The bench's stack run with text traffic: requests as long as their texts, padded in a batch by the sidecar.

A request of the evaluation data is cut to its own length (what a client sends), the stack run sends rows
spread over the data in turn, and with ``pad_inputs`` the sidecar batches them together: the run completes
full batches of mixed lengths through the real model server and sidecar.
"""

from __future__ import annotations

import numpy as np
import orjson

from leanserve_serving.bench.stack import measure_stack, v2_bodies, v2_body
from leanserve_serving.tensors import TensorSpec
from tests.test_ragged_batching import make_encoder

SPECS = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))]


def feeds(lengths: list[int], width: int = 12, vocab: int = 50) -> dict[str, np.ndarray]:
    """Rows padded to ``width`` with zeros, as evaluation data of a text model is stored."""
    rng = np.random.default_rng(5)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_a_body_is_one_row_cut_to_its_own_length():
    data = feeds([3, 12, 7])
    body = orjson.loads(v2_body(data, SPECS, row=2))
    by_name = {i["name"]: i for i in body["inputs"]}
    assert by_name["input_ids"]["shape"] == by_name["attention_mask"]["shape"] == [1, 7]
    assert by_name["input_ids"]["data"] == data["input_ids"][2, :7].tolist()
    assert by_name["attention_mask"]["data"] == [1] * 7


def test_without_a_mask_a_body_is_the_row_as_stored():
    data = {"input": np.arange(12, dtype=np.float32).reshape(3, 4)}
    body = orjson.loads(v2_body(data, [TensorSpec("input", "FP32", (-1, 4))], row=1))
    assert body["inputs"][0]["shape"] == [1, 4] and body["inputs"][0]["data"] == [4.0, 5.0, 6.0, 7.0]


def test_bodies_spread_over_the_data():
    data = feeds([2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    lengths = [orjson.loads(b)["inputs"][0]["shape"][1] for b in v2_bodies(data, SPECS, count=4)]
    assert lengths == [2, 5, 8, 11]


def test_the_stack_run_batches_requests_of_different_lengths_with_padding(tmp_path):
    model = make_encoder(tmp_path / "encoder.onnx")
    bodies = v2_bodies(feeds([3, 9, 5, 12, 4, 7, 11, 6]), SPECS)
    figures = measure_stack(
        model, bodies, [1, 4], seconds=0.4, trickle_seconds=0.5, pad_inputs={"input_ids": 0, "attention_mask": 0}
    )
    assert set(figures.batch_ms) == {1, 4}
    assert all(ms > 0 for ms in figures.batch_ms.values())
    assert len(figures.profile.jitter) == len(figures.profile.outside_ms)
