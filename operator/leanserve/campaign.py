"""The campaign's requests: one review per request, at its own length, with the campaign's share of repeats.

DESIGN.md's text campaign sends reviews of tens to a couple of hundred tokens, and 18 % of its requests
repeat one sent a little earlier (what a response cache can answer). A load test that sends one body over
and over measures neither: every request is a cache hit after the first, and every request has the same
length. This module makes the sequence a load generator replays (hack/loadgen ``-bodies``: request i sends
line i mod N):

- :func:`request_sequence` (pure): which review each request carries, and which requests repeat an earlier
  one (drawn from the recent ones, as a cache with a time to live sees them);
- :func:`campaign_bodies`: that sequence over a pool of distinct tokenized reviews, as Open Inference
  Protocol v2 bodies, unpadded (shape [1, tokens]: padding is the server's business);
- :func:`write_bodies`: the bodies file, one JSON document per line; :func:`write_campaign` does it all
  over freshly generated reviews.

The reviews come from the evaluation set (:func:`reviews_from_evaluation`) or, for more distinct requests
than it has rows, from ``leanserve_serving.reference_models.review_token_rows`` (the same generator).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: DESIGN.md's campaign: the share of requests that repeat an earlier request.
CAMPAIGN_REPEAT_RATE = 0.18
#: How far back a repeat reaches, on average, in requests (about 4 s at the campaign's 115.7 req/s): repeats
#: come soon after the original (a user resubmits, a popular text goes round), within a cache's time to live.
RECENT_REQUESTS = 500


@dataclass(frozen=True)
class RequestSequence:
    """Request i carries review ``reviews[i]`` (an index into the pool); ``repeats[i]`` says it repeats an
    earlier request (which carried the same review) rather than bringing a review not sent before."""

    reviews: list[int]
    repeats: list[bool]

    @property
    def repeat_fraction(self) -> float:
        """The share of requests that repeat an earlier one (a perfect cache's hit rate)."""
        return sum(self.repeats) / len(self.repeats) if self.repeats else 0.0


def request_sequence(
    pool: int, n: int, repeat_rate: float = CAMPAIGN_REPEAT_RATE, recent: int = RECENT_REQUESTS, seed: int = 0
) -> RequestSequence:
    """``n`` requests over a pool of ``pool`` distinct reviews, deterministic for a ``seed``.

    Each request after the first repeats an earlier request with probability ``repeat_rate``: the one a
    geometric number of requests back (mean ``recent``, never before the first). Otherwise it brings the
    next review of the pool, so reviews that are not repeats are never seen twice: ValueError when the pool
    runs out (give more distinct reviews), since recycling it would add repeats the rate does not ask for.
    """
    if not 0 <= repeat_rate < 1:
        raise ValueError(f"repeat_rate must be in [0, 1), got {repeat_rate}")
    if recent < 1:
        raise ValueError(f"recent must be at least 1 request, got {recent}")
    rng = np.random.default_rng(seed)
    repeat = rng.random(n) < repeat_rate
    back = rng.geometric(1 / recent, n)
    reviews: list[int] = []
    repeats: list[bool] = []
    fresh = 0
    for i in range(n):
        if i and repeat[i]:
            reviews.append(reviews[i - min(int(back[i]), i)])
            repeats.append(True)
            continue
        if fresh == pool:
            raise ValueError(
                f"{n} requests at repeat rate {repeat_rate} need more than the {pool} distinct reviews given"
            )
        reviews.append(fresh)
        repeats.append(False)
        fresh += 1
    return RequestSequence(reviews, repeats)


def v2_review_body(token_ids: Sequence[int]) -> bytes:
    """An Open Inference Protocol v2 request for one tokenized review: ``input_ids`` and ``attention_mask``,
    INT64, shape [1, tokens], unpadded (a client sends its text's own length)."""
    ids = [int(t) for t in token_ids]
    shape = [1, len(ids)]
    inputs = [
        {"name": "input_ids", "datatype": "INT64", "shape": shape, "data": ids},
        {"name": "attention_mask", "datatype": "INT64", "shape": shape, "data": [1] * len(ids)},
    ]
    return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()


def distinct_reviews(reviews: Sequence[Sequence[int]]) -> list[list[int]]:
    """The reviews without duplicates, in their first order (two short generated reviews can be the same
    text, and a second copy would be a repeat the sequence did not choose)."""
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    for review in reviews:
        key = tuple(int(t) for t in review)
        if key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def campaign_bodies(
    reviews: Sequence[Sequence[int]],
    n: int,
    repeat_rate: float = CAMPAIGN_REPEAT_RATE,
    recent: int = RECENT_REQUESTS,
    seed: int = 0,
) -> list[bytes]:
    """The campaign's first ``n`` request bodies over the tokenized ``reviews`` (:func:`request_sequence`
    over their distinct ones; they need about ``n * (1 - repeat_rate)`` of them)."""
    pool = distinct_reviews(reviews)
    sequence = request_sequence(len(pool), n, repeat_rate, recent, seed)
    encoded = {r: v2_review_body(pool[r]) for r in set(sequence.reviews)}  # a repeat is the same bytes
    return [encoded[r] for r in sequence.reviews]


def reviews_from_evaluation(evaluation: Path) -> list[list[int]]:
    """The evaluation set's reviews (``input_ids`` and ``attention_mask``, right-padded) as unpadded token rows."""
    with np.load(evaluation, allow_pickle=False) as archive:
        ids, mask = archive["input_ids"], archive["attention_mask"]
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]


def write_bodies(path: Path, bodies: Sequence[bytes]) -> Path:
    """Write the bodies file hack/loadgen ``-bodies`` reads: one JSON document per line, in order.

    The load generator sends line i mod N to request i: write at least as many bodies as the run sends
    (rate x seconds, plus some), or the sequence starts over and every request after the N-th repeats one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    return path


def write_campaign(
    path: Path, n: int, repeat_rate: float = CAMPAIGN_REPEAT_RATE, recent: int = RECENT_REQUESTS, seed: int = 0
) -> Path:
    """The bodies file of the campaign's first ``n`` requests over freshly generated reviews (the text
    reference model's generator and tokenizer, a few seconds per 10,000 requests), for hack/loadgen ``-bodies``."""
    from leanserve_serving.reference_models import review_token_rows

    needed = int(n * (1 - repeat_rate) * 1.1) + 100  # the number of new reviews is binomial: a margin
    reviews = review_token_rows(needed, seed=seed + 23)
    return write_bodies(path, campaign_bodies(reviews, n, repeat_rate, recent, seed))
