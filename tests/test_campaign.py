"""The text campaign's load: reviews of realistic lengths, requests at the campaign's repeat rate.

The request sequence (:mod:`leanserve.campaign`) is checked for its repeat share, its recency and its
determinism; its bodies against the text reference model itself (decoded as the model server decodes them,
checked against the model's inputs, run, and answered as the padded evaluation rows are).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from leanserve.campaign import (
    CAMPAIGN_REPEAT_RATE,
    RECENT_REQUESTS,
    campaign_bodies,
    distinct_reviews,
    request_sequence,
    reviews_from_evaluation,
    v2_review_body,
    write_bodies,
)
from leanserve_serving.model_server import spec_of
from leanserve_serving.reference_models import ReferenceModel, make_text_classifier, review_token_rows, token_lengths
from leanserve_serving.tensors import check_inputs, decode_request

REQUESTS = 5000


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    """The text model with a small training set: these tests need its inputs and its evaluation set's lengths,
    not its accuracy (tests/test_bench.py checks that)."""
    return make_text_classifier(tmp_path_factory.mktemp("text"), train_rows=60, eval_rows=400)


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    return campaign_bodies(review_token_rows(int(REQUESTS * 0.9)), REQUESTS)


def test_request_sequence_repeats_recent_requests_at_the_campaign_rate() -> None:
    seq = request_sequence(pool=REQUESTS, n=REQUESTS)
    assert seq.repeat_fraction == pytest.approx(CAMPAIGN_REPEAT_RATE, abs=0.015)
    seen: set[int] = set()
    back = []
    for i, (review, repeat) in enumerate(zip(seq.reviews, seq.repeats, strict=True)):
        if repeat:
            assert review in seen, f"request {i} repeats a review never sent"
            back.append(i - max(j for j in range(i) if seq.reviews[j] == review))
        else:
            assert review not in seen, f"request {i} is new but its review was sent before"
        seen.add(review)
    assert np.median(back) < RECENT_REQUESTS, "repeats come from the recent requests"


def test_request_sequence_is_deterministic_and_never_recycles_the_pool() -> None:
    assert request_sequence(2000, 1000, seed=3) == request_sequence(2000, 1000, seed=3)
    assert request_sequence(2000, 1000, seed=3) != request_sequence(2000, 1000, seed=4)
    assert request_sequence(100, 100, repeat_rate=0.0).reviews == list(range(100))
    with pytest.raises(ValueError, match="distinct reviews"):
        request_sequence(pool=500, n=1000)  # about 820 new reviews needed
    with pytest.raises(ValueError, match="repeat_rate"):
        request_sequence(10, 10, repeat_rate=1.0)


def test_distinct_reviews_drops_later_copies() -> None:
    assert distinct_reviews([[101, 7, 102], [101, 8, 102], [101, 7, 102]]) == [[101, 7, 102], [101, 8, 102]]


def test_campaign_bodies_repeat_at_the_rate_with_the_evaluation_sets_lengths(
    bodies: list[bytes], text_model: ReferenceModel
) -> None:
    """A repeat is byte-for-byte an earlier body (an exact cache's hit); lengths follow the evaluation set."""
    seen: set[bytes] = set()
    repeated = 0
    for body in bodies:
        repeated += body in seen
        seen.add(body)
    assert repeated / len(bodies) == pytest.approx(CAMPAIGN_REPEAT_RATE, abs=0.015)
    lengths = np.array([json.loads(b)["inputs"][0]["shape"][1] for b in bodies])
    reference = token_lengths(text_model.evaluation)
    assert lengths.min() >= 8 and lengths.max() <= 256
    for q in (25, 50, 75, 90):
        assert np.percentile(lengths, q) == pytest.approx(np.percentile(reference, q), rel=0.15), q


def test_every_body_is_a_v2_request_the_text_model_accepts(bodies: list[bytes], text_model: ReferenceModel) -> None:
    sess = ort.InferenceSession(str(text_model.model), providers=["CPUExecutionProvider"])
    specs = [spec_of(i) for i in sess.get_inputs()]
    for body in bodies:
        request = decode_request(body)
        check_inputs(specs, request)
        ids, mask = (t.data for t in request.inputs)
        assert ids.dtype == mask.dtype == np.int64
        assert ids.shape == mask.shape == (1, len(ids[0])) and mask.all(), "unpadded: the review's own length"
    for body in bodies[:20]:
        feed = {t.name: t.data for t in decode_request(body).inputs}
        assert sess.run(None, feed)[0].shape == (1, 2)


def test_an_unpadded_review_is_answered_as_its_padded_evaluation_row(text_model: ReferenceModel) -> None:
    """A request at its own length gets the logits the accuracy gate saw for the padded row."""
    sess = ort.InferenceSession(str(text_model.model), providers=["CPUExecutionProvider"])
    with np.load(text_model.evaluation) as archive:
        padded = {k: archive[k][:12] for k in ("input_ids", "attention_mask")}
    expected = sess.run(None, padded)[0]
    for row, review in enumerate(reviews_from_evaluation(text_model.evaluation)[:12]):
        feed = {t.name: t.data for t in decode_request(v2_review_body(review)).inputs}
        np.testing.assert_allclose(sess.run(None, feed)[0][0], expected[row], atol=1e-4)


def test_the_evaluation_set_has_realistic_review_lengths_padded_to_its_longest(text_model: ReferenceModel) -> None:
    lengths = token_lengths(text_model.evaluation)
    with np.load(text_model.evaluation) as archive:
        ids, mask = archive["input_ids"], archive["attention_mask"]
    assert ids.shape == mask.shape == (400, lengths.max()) and ids.dtype == mask.dtype == np.int64
    assert lengths.min() >= 8 and lengths.max() <= 256  # "[CLS] the app is slow. [SEP]": 7 tokens
    assert 45 <= np.median(lengths) <= 75, "tens of tokens, as reviews are"
    assert np.percentile(lengths, 90) >= 1.8 * np.median(lengths), "a long tail"


def test_write_bodies_writes_one_json_document_per_line(tmp_path: Path) -> None:
    bodies = [v2_review_body([101, 2023, 102]), v2_review_body([101, 102])]
    path = write_bodies(tmp_path / "deep" / "bodies.jsonl", [bodies[0], bodies[1], bodies[0]])
    lines = path.read_bytes().splitlines()
    assert lines == [bodies[0], bodies[1], bodies[0]]
    doc = json.loads(lines[1])
    assert doc["inputs"][1] == {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}
