"""kopf handlers: thin. Parse nothing, compute nothing; call reconcile and translate its outcome.

Registered on import (kopf's default registry); ``leanserve operator`` imports
this module and runs kopf. Handler progress and the last handled spec are
stored in annotations under ``leanserve.dev/`` (the status schema is ours and
keeps no kopf fields).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import config as kube_config
from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException

from leanserve.api.resource import GROUP, PLURAL, VERSION
from leanserve.controller import kube
from leanserve.controller.config import OperatorConfig
from leanserve.controller.observe import parse_spec, reading_due
from leanserve.controller.reconcile import reconcile, refresh_availability

log = logging.getLogger("leanserve.operator")


def make_api_client() -> ApiClient:
    """In-cluster credentials when running in a pod, else the current kubeconfig ($KUBECONFIG)."""
    try:
        kube_config.load_incluster_config()
        return ApiClient()
    except kube_config.ConfigException:
        return kube_config.new_client_from_config()


def has_custom_metrics(api: ApiClient) -> bool:
    """Whether a custom metrics API (prometheus-adapter, KEDA) is registered: the HPA then scales on req/s."""
    try:
        kube.request(api, "GET", "/apis/custom.metrics.k8s.io")
        return True
    except ApiException:
        return False


#: Connections kopf may open to the API server. kopf's default is unlimited, and with hundreds of objects
#: in flight each connection's TLS buffers (256 KiB) add up to tens of MB; the CLI raises it by two per
#: watched namespace (each namespace holds its own watch streams open).
CONNECTION_LIMIT = 16


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's own kubeconfig / in-cluster login, with a bounded connection pool."""
    import aiohttp

    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        auth=info.as_aiohttp_basic_auth(),
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        aiohttp_session=session,
    )


class ProgressNotError(logging.Filter):
    """Log kopf's "failed temporarily" for our reconcile handler at INFO, not ERROR.

    reconcile_handler raises TemporaryError only to poll by design (profiling Jobs running,
    pods starting): on a real cluster the operator logged an ERROR every 10 s of a normal
    profiling run. Crashes keep their level: kopf words them differently ("failed with an
    exception"). At INFO they also stay below kopf's Event posting level (WARNING).
    """

    MARK = "Handler 'reconcile_handler' failed temporarily: "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and self.MARK in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install_log_filter() -> None:
    """Attach ProgressNotError to kopf's per-object logger once."""
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, ProgressNotError) for f in objects.filters):
        objects.addFilter(ProgressNotError())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="leanserve.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="leanserve.dev")
    settings.posting.level = logging.WARNING  # our own Events mark transitions; kopf's add noise
    install_log_filter()
    settings.execution.max_workers = 4  # API calls overlap; planning is serialised anyway
    settings.watching.server_timeout = 270
    if "api" not in memo:
        memo.api = make_api_client()
    if "config" not in memo:
        memo.config = OperatorConfig.from_environment(custom_metrics=has_custom_metrics(memo.api))
    log.info(
        "event=started custom_metrics=%s instance_types=%d",
        memo.config.build.custom_metrics,
        len(memo.config.prices.instance_types),
    )


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_handler(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Plan and apply; retry later without profiles; stop retrying on a spec that cannot be parsed."""
    outcome = reconcile(memo.api, _plain(body), memo.config)
    _release_freed_memory()
    if outcome.permanent:
        raise kopf.PermanentError(outcome.permanent)
    if outcome.retry_after_s is not None:
        raise kopf.TemporaryError(outcome.retry_reason or "not yet", delay=outcome.retry_after_s)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(name: str, namespace: str, **_: Any) -> None:
    """Nothing to do: owner references let the garbage collector remove what we created (no finalizer)."""
    log.info("event=deleted name=%s/%s", namespace, name)


def _deploying(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Deploying"


def _serving(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ("Ready", "Degraded")


def _refresh(body: kopf.Body, memo: kopf.Memo) -> None:
    meta = body["metadata"]
    deployment = kube.get(memo.api, kube.reference("apps/v1", "Deployment", meta["name"], meta["namespace"]))
    refresh_availability(memo.api, _plain(body), deployment)
    _release_freed_memory()


@kopf.timer(GROUP, VERSION, PLURAL, interval=5, initial_delay=1, when=_deploying)
def deploying(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """While Deploying, look at the serving Deployment every 5 s until its replicas are ready.

    Polling one object by name, only while it matters, instead of watching every
    Deployment in the cluster: a watch would hold every Deployment's events in
    the operator's memory and need list/watch on all of them.
    """
    _refresh(body, memo)


@kopf.timer(GROUP, VERSION, PLURAL, interval=60, initial_delay=30, when=_serving)
def serving(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Once serving, check the Deployment every minute: lost replicas show as Available False."""
    _refresh(body, memo)


#: How often each serving InferenceDeployment is asked whether a reading is due (its spec.observe
#: intervalSeconds decides; the tick only bounds how late a reading can be).
OBSERVE_TICK_S = 10


@kopf.timer(GROUP, VERSION, PLURAL, interval=OBSERVE_TICK_S, initial_delay=OBSERVE_TICK_S, when=_serving)
def observing(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """When a reading from Prometheus is due, reconcile: the reading is judged against the plan in place,
    and drift may plan again. Nothing without a Prometheus: Observed=False says so once."""
    plain = _plain(body)
    spec, _invalid = parse_spec(plain)
    if memo.config.prometheus_url and spec is not None and reading_due(plain, spec, datetime.now(UTC)):
        reconcile(memo.api, plain, memo.config)
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: a burst of plans would stay resident)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _load_libc()


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's read-only view as plain dicts (what the reconciler and the builders expect)."""
    import copy

    return copy.deepcopy(dict(body))
