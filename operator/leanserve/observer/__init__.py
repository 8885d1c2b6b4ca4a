"""Observation: what Prometheus says an InferenceDeployment actually does (the other half of the promise).

``observe_deployment(url, namespace, name, window_s)`` returns an :class:`Observation` (request rate,
p50/p95/p99, error and throttled shares, cache hit rate, mean batch, replicas, and from them the cost per
million requests) or raises :class:`ObserverUnavailable` with its reason: Prometheus down means "not
observed", never a crash or a re-plan. Modules: ``queries`` (PromQL, pure), ``answers`` (checks what came
back, pure), ``figures`` (the arithmetic, pure), ``client`` (the adapter over prometheus-api-client);
``history`` reads the request-rate history the predictive warm pool learns from.
"""

from leanserve.observer.client import ObserverUnavailable, observe_deployment
from leanserve.observer.figures import Observation

__all__ = ["Observation", "ObserverUnavailable", "observe_deployment"]
