"""The semantic cache's embedders: the numpy MiniLM reproduces sentence-transformers' numbers."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve_serving.embedders import HashingEmbedder, MiniLMEmbedder, make_embedder


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def test_minilm_matches_the_reference_similarities(minilm):
    """The similarity matrix sentence-transformers documents for all-MiniLM-L6-v2 on these sentences."""
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    vectors = np.array([minilm.embed(s) for s in sentences])
    expected = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    np.testing.assert_allclose(vectors @ vectors.T, expected, atol=1e-3)


def test_minilm_vectors_are_unit_float32_of_384_dimensions(minilm):
    v = minilm.embed("How do I reset my password?")
    assert v.shape == (384,) and v.dtype == np.float32
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5


def test_hashing_embedder_ignores_case_and_punctuation_but_not_words():
    h = HashingEmbedder()
    assert float(h.embed("The battery life is great") @ h.embed("the battery life is GREAT!!")) == pytest.approx(1.0)
    assert float(h.embed("The battery life is great") @ h.embed("the battery life is terrible")) < 0.8


def test_unknown_embedder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown embedder 'bert-huge'"):
        make_embedder("bert-huge")
