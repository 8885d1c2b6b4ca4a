"""Latency of a batching server under Poisson arrivals: a discrete-event simulation, vectorised.

Closed forms are too optimistic near saturation, so the planner simulates the
sidecar's policy (a batch leaves when it holds ``max_batch`` requests or its
oldest has waited ``max_wait``; while the model is busy the batch keeps
filling) over the measured service time of each batch size. Many
configurations are simulated in lockstep (one numpy operation per batch step
for all of them), and they share their random arrivals (common random numbers),
so comparisons between configurations are not noise.

Where the bench ran the serving stack, a curve carries what it measured there:
the service time of a batch through the whole replica (sidecar, HTTP, JSON,
model server, model), its spread (each batch's time is the mean times a draw
from the measured jitter) and the time a request spends outside the batch path
(a draw added to each request). Without them (older profiles), service times
are the model's alone, constant, and a fixed ``overhead_ms`` is added.

The measurements arrive as the bench's ``Profile`` (``leanserve_serving.profile``,
in the serving image): that schema is the contract between the bench, which
writes it, and the planner, which reads it (``plan.service_curve`` turns a
variant's profile into a :class:`ServiceCurve`; ``STACK_LEVELS`` are the quantile
levels of its jitter and outside times). A change to it is a change to both
sides, made there, with its ``schema_version``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanserve_serving.profile import STACK_LEVELS


@dataclass(frozen=True)
class ServiceCurve:
    """Measured service time (ms) of one model call by batch size; interpolated in between."""

    batch_sizes: tuple[int, ...]
    mean_ms: tuple[float, ...]
    jitter: tuple[float, ...] = ()
    """Quantiles (STACK_LEVELS) of a batch's service time over its mean; () for constant service times."""
    outside_ms: tuple[float, ...] = ()
    """Quantiles (STACK_LEVELS) of each request's time outside the batch path; () for the caller's overhead."""

    def at(self, sizes: np.ndarray) -> np.ndarray:
        """Service time for each batch size (linear in between, linear extrapolation beyond the last)."""
        b = np.asarray(self.batch_sizes, dtype=float)
        t = np.asarray(self.mean_ms, dtype=float)
        out = np.interp(sizes, b, t)
        if len(b) > 1:
            slope = (t[-1] - t[-2]) / (b[-1] - b[-2])
            out = np.where(sizes > b[-1], t[-1] + slope * (sizes - b[-1]), out)
        return out

    @property
    def measured_stack(self) -> bool:
        """Whether these figures come from the whole serving stack rather than the model alone."""
        return bool(self.outside_ms)


def _draws(quantiles: tuple[float, ...], u: np.ndarray, default: float) -> np.ndarray:
    """Samples of a distribution given by its quantiles at STACK_LEVELS, from uniforms ``u`` (inverse CDF)."""
    if not quantiles:
        return np.full(u.shape, default)
    return np.interp(u * 100.0, STACK_LEVELS, quantiles)


def _multipliers(jitter: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    """Service-time multipliers drawn from ``jitter``, scaled to a mean of exactly 1 (the curve holds the mean;
    interpolating between stored quantiles moves it a little)."""
    m = _draws(jitter, u, 1.0)
    return m / m.mean()


@dataclass(frozen=True)
class Policy:
    """Batching policy of the sidecar: ``max_batch`` 1 means no batching."""

    max_batch: int
    max_wait_ms: float


def simulate(
    curves: list[ServiceCurve],
    policies: list[Policy],
    rates: np.ndarray,
    percentile: float | None,
    overhead_ms: float = 0.0,
    requests: int = 3000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted latency percentile (ms; the mean when ``percentile`` is None) and mean batch size
    for each configuration at its rate (req/s).

    Configuration k is (curves[k], policies[k], rates[k]). ``overhead_ms`` is added
    to every request (the front door's own time). The first 10 % of requests warm
    the queue up and are not counted.
    """
    k = len(curves)
    rng = np.random.default_rng(seed)
    unit = np.cumsum(rng.exponential(size=requests))  # arrivals at rate 1; config c's are unit / rate_c
    u_service, u_outside = rng.uniform(size=requests), rng.uniform(size=requests)
    rates = np.maximum(np.asarray(rates, dtype=float), 1e-9)
    latency = np.empty(k)
    mean_batch = np.ones(k)
    single = np.array([p.max_batch == 1 for p in policies])
    skip = requests // 10

    def summarise(configs: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """The percentile (or mean) of each row of ``lat`` (seconds), once each request's outside time is added."""
        outside = np.stack([_draws(curves[c].outside_ms, u_outside[skip:], overhead_ms) for c in configs])
        lat = lat[:, skip:] * 1000.0 + outside
        return lat.mean(axis=-1) if percentile is None else np.percentile(lat, percentile, axis=-1)

    if single.any():
        # One request per call (FIFO, service s_n): departure D_n = max(D_{n-1}, a_n) + s_n, whose closed
        # form D_n = S_n + max_{j <= n} (a_j - S_{j-1}) (S_n: the services summed up to n) is a cumulative max.
        idx = np.flatnonzero(single)
        s_one = np.array([curves[c].at(np.array([1.0]))[0] for c in idx])[:, None] / 1000.0
        service = s_one * np.stack([_multipliers(curves[c].jitter, u_service) for c in idx])
        arrivals = unit[None, :] / rates[idx][:, None]
        total = np.cumsum(service, axis=1)
        departures = total + np.maximum.accumulate(arrivals - (total - service), axis=1)
        latency[idx] = summarise(idx, departures - arrivals)
    batched = np.flatnonzero(~single)
    if batched.size:
        jitter = np.stack([_multipliers(curves[c].jitter, u_service) for c in batched])
        batched_curves, batched_policies = [curves[c] for c in batched], [policies[c] for c in batched]
        lat_b, batch_b = _simulate_batches(batched_curves, batched_policies, rates[batched], unit, requests, jitter)
        latency[batched] = summarise(batched, np.stack(lat_b))
        mean_batch[batched] = batch_b
    return latency, mean_batch


def _simulate_batches(
    curves: list[ServiceCurve],
    policies: list[Policy],
    rates: np.ndarray,
    unit: np.ndarray,
    requests: int,
    jitter: np.ndarray,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-request latency (s) and mean batch size of batching configurations, stepping batch by batch.

    ``jitter[c, j]`` multiplies the service time of configuration c's j-th batch."""
    k = len(curves)
    max_b = np.array([p.max_batch for p in policies])
    wait = np.array([p.max_wait_ms for p in policies]) / 1000.0
    top = int(max_b.max())
    service = np.stack([c.at(np.arange(top + 1, dtype=float)) for c in curves]) / 1000.0  # [k, top+1] seconds
    i = np.zeros(k, dtype=np.int64)
    free = np.zeros(k)
    rows = np.arange(k)
    sizes, done = [], []
    while True:
        active = i < requests
        if not active.any():
            break
        idx = np.minimum(i, requests - 1)
        first = unit[idx] / rates
        full = unit[np.minimum(i + max_b - 1, requests - 1)] / rates
        ready = np.minimum(full, first + wait)
        t = np.maximum(ready, free)
        arrived = np.searchsorted(unit, t * rates, side="right") - i
        n = np.maximum(np.minimum(arrived, max_b), 1)
        n = np.where(active, np.minimum(n, requests - i), 0)
        finish = t + service[rows, np.minimum(n, top)] * jitter[:, min(len(sizes), requests - 1)]
        free = np.where(active, finish, free)
        sizes.append(n)
        done.append(finish)
        i = i + n
    sizes_arr, done_arr = np.stack(sizes), np.stack(done)
    latencies, mean_batch = [], np.empty(k)
    for c in range(k):
        n_c = sizes_arr[:, c]
        latencies.append(np.repeat(done_arr[:, c], n_c) - unit / rates[c])
        mean_batch[c] = n_c[n_c > 0].mean()
    return latencies, mean_batch


def _best_throughput(curve: ServiceCurve, policy: Policy) -> float:
    """Rows per second (rows / service time) at the batch size, up to the policy's largest, that serves most."""
    points = zip(curve.batch_sizes, curve.mean_ms, strict=True)
    return max(b / (t / 1000.0) for b, t in points if b <= policy.max_batch)


def max_rate(
    curves: list[ServiceCurve],
    policies: list[Policy],
    percentile: float,
    target_ms: float,
    overhead_ms: float = 0.0,
    iterations: int = 12,
    requests: int = 3000,
    max_utilization: float = 0.8,
) -> np.ndarray:
    """The highest arrival rate (req/s) at which each configuration keeps the percentile under target.

    A bisection per configuration, all configurations at once. 0 where even a
    trickle of traffic misses the target. Rates are capped at ``max_utilization``
    of the best throughput the policy allows: a short simulation cannot see the
    queue a server at 99 % load builds over hours, and a replica needs headroom.
    """
    k = len(curves)
    # Upper bound: the best throughput each policy allows.
    ceiling = np.array([_best_throughput(c, p) for c, p in zip(curves, policies, strict=True)])
    lo, hi = np.zeros(k), ceiling * max_utilization
    trickle, _ = simulate(curves, policies, ceiling * 1e-3, percentile, overhead_ms, requests)
    feasible = trickle <= target_ms
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lat, _ = simulate(curves, policies, np.maximum(mid, 1e-6), percentile, overhead_ms, requests)
        ok = lat <= target_ms
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return np.where(feasible, _held_below(curves, policies, lo, percentile, target_ms, overhead_ms, requests), 0.0)


#: Fractions of a bisected rate at which the latency is checked again (see _held_below): every 5 %, then
#: every 1 % near the top, as the simulated percentile near saturation is noisy from one rate to the next.
BELOW_CHECKS = tuple(round(0.05 * i, 2) for i in range(2, 19)) + tuple(round(0.01 * i, 2) for i in range(91, 100))


def _held_below(
    curves: list[ServiceCurve],
    policies: list[Policy],
    rates: np.ndarray,
    percentile: float,
    target_ms: float,
    overhead_ms: float,
    requests: int,
) -> np.ndarray:
    """``rates`` lowered to the last checked rate below which every checked rate keeps the target.

    Bisection assumes latency grows with load. A measured service curve that is not monotone (a batch of
    64 faster than one of 32) or a heavy jitter tail can break that: a batching policy can meet the target
    near its capacity and miss it at half of it, where a replica spends the quiet hours of the day.
    """
    safe = rates.copy()
    last_good = np.zeros_like(rates)
    broken = np.zeros(len(rates), dtype=bool)
    for fraction in BELOW_CHECKS:
        probe = np.maximum(rates * fraction, 1e-6)
        lat, _ = simulate(curves, policies, probe, percentile, overhead_ms, requests)
        bad = (lat > target_ms) & ~broken
        safe = np.where(bad, last_good, safe)
        broken |= bad
        last_good = np.where(broken, last_good, probe)
    return safe
