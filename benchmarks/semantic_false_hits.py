"""Semantic cache false hits: how often a near-miss gets another text's answer, with and without the guards.

On the labelled pairs of tests/fixtures/semantic_pairs.json (paraphrases that should hit,
near-misses that must not: one number, negation, yes/no or year apart, alone and behind a
shared system prompt), embedded with the sidecar's default embedder (all-MiniLM-L6-v2, offline)
at the default threshold. A pair hits when its cosine similarity reaches the threshold and,
with the guards, when :func:`leanserve_serving.cache.guard_refusal` has no objection.

    .venv/bin/python benchmarks/semantic_false_hits.py [--threshold 0.97] [--embedder minilm]

Prints a table of figures; the last line is one JSON object with them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from leanserve_serving.cache import guard_refusal
from leanserve_serving.config import SidecarConfig
from leanserve_serving.embedders import make_embedder

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "semantic_pairs.json"


def rate(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 0.0


def measure(pairs: list[dict[str, Any]], embedder_name: str, threshold: float) -> dict[str, Any]:
    """False-hit rate (near-misses served) and hit rate (paraphrases served), without and with the guards."""
    embedder = make_embedder(embedder_name)
    counts = {"near": 0, "para": 0, "false_raw": 0, "false_guarded": 0, "hit_raw": 0, "hit_guarded": 0}
    for pair in pairs:
        similar = float(embedder.embed(pair["a"]) @ embedder.embed(pair["b"])) >= threshold
        guarded = similar and guard_refusal(pair["a"], pair["b"]) is None
        if pair["should_hit"]:
            counts["para"] += 1
            counts["hit_raw"] += similar
            counts["hit_guarded"] += guarded
        else:
            counts["near"] += 1
            counts["false_raw"] += similar
            counts["false_guarded"] += guarded
    return {
        "embedder": embedder_name,
        "threshold": threshold,
        "paraphrase_pairs": counts["para"],
        "near_miss_pairs": counts["near"],
        "false_hit_rate_without_guards": rate(counts["false_raw"], counts["near"]),
        "false_hit_rate_with_guards": rate(counts["false_guarded"], counts["near"]),
        "paraphrase_hit_rate_without_guards": rate(counts["hit_raw"], counts["para"]),
        "paraphrase_hit_rate_with_guards": rate(counts["hit_guarded"], counts["para"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=SidecarConfig().semantic_threshold)
    parser.add_argument("--embedder", default=SidecarConfig().semantic_embedder)
    args = parser.parse_args()
    pairs = json.loads(PAIRS.read_text())["pairs"]
    started = time.monotonic()
    figures = measure(pairs, args.embedder, args.threshold)
    print(f"semantic cache, {figures['embedder']} at threshold {figures['threshold']}")
    print(f"{'':28}{'without guards':>16}{'with guards':>14}")
    for label, key, total in (
        ("false hits (near-misses)", "false_hit_rate", figures["near_miss_pairs"]),
        ("hits (paraphrases)", "paraphrase_hit_rate", figures["paraphrase_pairs"]),
    ):
        raw, guarded = figures[f"{key}_without_guards"], figures[f"{key}_with_guards"]
        print(f"{label:28}{raw:>15.1%} {guarded:>13.1%}   of {total} pairs")
    print(f"(took {time.monotonic() - started:.1f} s)")
    print(json.dumps({"benchmark": "semantic_false_hits", **figures}))


if __name__ == "__main__":
    main()
