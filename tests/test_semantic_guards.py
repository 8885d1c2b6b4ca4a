"""Semantic cache false hits: the guards (numbers, negations, yes/no words, length) on the labelled
pairs with the real all-MiniLM-L6-v2 embedder, and through a real sidecar, Redis and model server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leanserve_serving.cache import guard_refusal
from leanserve_serving.config import SidecarConfig
from leanserve_serving.embedders import Embedder, make_embedder
from tests.onnx_models import make_text
from tests.serving_harness import Process, metric, model_server, post, sidecar, start_redis, text_request

PAIRS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "fixtures" / "semantic_pairs.json").read_text())[
    "pairs"
]

#: A shared system prompt: behind it a one-token difference barely moves the embedding.
SYSTEM = (
    "You are a helpful customer support assistant for an online electronics store. Answer briefly, politely "
    "and accurately, and never invent order details or prices. Customer message: "
)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return make_embedder("minilm")


def similar(embedder: Embedder, a: str, b: str) -> bool:
    return float(embedder.embed(a) @ embedder.embed(b)) >= SidecarConfig().semantic_threshold


def test_the_labelled_set_has_both_kinds_and_enough_pairs():
    assert len(PAIRS) >= 40
    assert {p["should_hit"] for p in PAIRS} == {True, False}


def test_the_guards_let_no_near_miss_through_on_the_labelled_set(minilm):
    """At the default threshold MiniLM alone serves near-misses (the defect); with the guards none."""
    near = [p for p in PAIRS if not p["should_hit"]]
    raw = [p for p in near if similar(minilm, p["a"], p["b"])]
    assert len(raw) >= 5, "the labelled set no longer holds near-misses the threshold alone lets through"
    assert [(p["a"], p["b"]) for p in raw if guard_refusal(p["a"], p["b"]) is None] == []


def test_the_guards_keep_the_paraphrase_hits(minilm):
    paraphrases = [p for p in PAIRS if p["should_hit"] and similar(minilm, p["a"], p["b"])]
    refused = [(p["a"], p["b"], guard_refusal(p["a"], p["b"])) for p in paraphrases]
    assert [r for r in refused if r[2] is not None] == []
    assert len(paraphrases) >= 0.8 * sum(p["should_hit"] for p in PAIRS)


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ("refund on $10", "refund on $100", "numbers"),
        ("the 2023 report", "the 2024 report", "numbers"),
        ("give me three ideas", "give me 4 ideas", "numbers"),
        ("it has arrived", "it hasn't arrived", "negations"),
        ("answer: yes", "answer: no", "negations"),
        ("the answer is true", "the answer is false", "yes/no"),
        ("summarize this", "summarize this long report about the quarterly revenue", "lengths"),
    ],
)
def test_each_guard_names_what_differs(a, b, reason):
    refusal = guard_refusal(a, b)
    assert refusal is not None and refusal.startswith(reason)
    assert guard_refusal(a, a) is None


# ---- through the sidecar ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    workdir = tmp_path_factory.mktemp("guards")
    redis = start_redis(workdir)
    upstream = model_server(make_text(workdir / "text.onnx"), "text", workdir).start()
    url = f"redis://127.0.0.1:{redis.port}/0"
    car = sidecar(upstream.url, workdir, redis_url=url, semantic_enabled=True).start()
    yield {"redis": redis, "upstream": upstream, "sidecar": car}
    for proc in (car, upstream, redis):
        proc.stop(kill=True)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (SYSTEM + "Can I return an item after 14 days?", SYSTEM + "Can I return an item after 30 days?"),
        (
            "Please summarize the key financial results of the company for the fiscal year 2023 in three sentences.",
            "Please summarize the key financial results of the company for the fiscal year 2024 in three sentences.",
        ),
        (SYSTEM + "is the item in stock? yes", SYSTEM + "is the item in stock? no"),
    ],
)
def test_a_near_miss_gets_its_own_answer_from_the_model(stack, first, second):
    """MiniLM scores these pairs above the default threshold 0.97 (0.977, 0.979, 0.997); the guards refuse."""
    infer = stack["sidecar"].url + "/v2/models/text/infer"
    assert post(infer, text_request(first))[2]["X-Leanserve-Source"] == "model"
    before = metric(stack["sidecar"].url, "leanserve_cache_rejected_total", 'kind="semantic",reason="guard"')
    status, answer, headers = post(infer, text_request(second))
    assert (status, headers["X-Leanserve-Source"]) == (200, "model")
    assert answer["outputs"][0]["data"] == [second.upper()]
    assert (
        metric(stack["sidecar"].url, "leanserve_cache_rejected_total", 'kind="semantic",reason="guard"') == before + 1
    )


def test_a_paraphrase_still_hits_through_the_sidecar(stack):
    infer = stack["sidecar"].url + "/v2/models/text/infer"
    assert post(infer, text_request(SYSTEM + "how do I reset my router?"))[2]["X-Leanserve-Source"] == "model"
    status, answer, headers = post(infer, text_request(SYSTEM + "how can I reset my router?"))
    assert (status, headers["X-Leanserve-Source"]) == (200, "semantic")
    assert answer["outputs"][0]["data"] == [(SYSTEM + "how do I reset my router?").upper()]
