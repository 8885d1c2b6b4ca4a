"""Manifests for a planned InferenceDeployment: pure functions, spec + plan in, Kubernetes objects out.

Everything here is plain data: the reconciler applies these dicts with
server-side apply, and the tests read them without a cluster. One builder per
object (``render_deployment``, ``render_hpa``, ...); ``render_all`` is the
whole set, in the order it should be applied (what a pod mounts before the
pod).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from leanserve import __version__
from leanserve.api.resource import API_VERSION, KIND
from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner import allocation
from leanserve.planner.allocation import Resources
from leanserve.planner.plan import Candidate
from leanserve.planner.prices import InstanceType

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"
OWNER_LABEL = "leanserve.dev/inferencedeployment"
MANAGED_BY = {"app.kubernetes.io/managed-by": "leanserve"}
SIDECAR_PORT = 8080
#: The sidecar's v2 gRPC service (the Service's `grpc` port); the probes stay on SIDECAR_PORT's REST.
SIDECAR_GRPC_PORT = 8085
MODEL_PORT = 8081
REDIS_PORT = 6379
#: UID of the serving image's user (serving_image/Dockerfile) and of the redis image's.
SERVING_UID = 10001
REDIS_UID = 999
#: The per-pod metric the sidecar exports, as a custom metrics API serves it (prometheus-adapter rule).
RPS_METRIC = "leanserve_requests_per_second"

#: How a serving pod stops without losing a request (every old pod of a rollout, every scale-down;
#: kserve#3360 and knative#429 are what happens otherwise), in the order Kubernetes plays it. Each
#: figure is set here and derived from here only.
#: 1. preStop (both containers, in parallel): the kubelet sleeps before any SIGTERM, while the endpoints
#:    controller, kube-proxy and ingresses, told of the deletion at the same moment, stop sending here.
PRESTOP_SLEEP_S = 5
#: 2. SIGTERM to the sidecar: readiness 503 at once, and it keeps serving what still arrives (closing each
#:    connection after its answer) for this long, for the proxies and clients that are late.
SIDECAR_DRAIN_S = 10
#: 3. Then it stops listening; requests in flight finish within its request timeout (its shutdown bound).
SIDECAR_REQUEST_TIMEOUT_S = 10
#: The model server gets SIGTERM at the same time as the sidecar and keeps serving until the sidecar is
#: done for sure (2 + 3, and a margin), then lets its own runs finish within MODEL_SERVER_SHUTDOWN_S.
MODEL_SERVER_DRAIN_S = SIDECAR_DRAIN_S + SIDECAR_REQUEST_TIMEOUT_S + 2
MODEL_SERVER_SHUTDOWN_S = 5
#: The kubelet kills whatever is left after this: all of the above, and room for slow process exits.
TERMINATION_GRACE_S = PRESTOP_SLEEP_S + MODEL_SERVER_DRAIN_S + MODEL_SERVER_SHUTDOWN_S + 10


@dataclass(frozen=True)
class BuildSettings:
    """What the operator adds to every deployment: images and cluster capabilities."""

    image: str = f"ghcr.io/leanserve/serving:{__version__}"
    gpu_image: str = f"ghcr.io/leanserve/serving-gpu:{__version__}"
    redis_image: str = "redis:7.4-alpine"
    custom_metrics: bool = False
    """A custom metrics API serves ``leanserve_requests_per_second`` per pod: the HPA scales on it."""


@dataclass(frozen=True)
class Owner:
    """The InferenceDeployment every object belongs to (for names, labels and owner references)."""

    name: str
    namespace: str
    uid: str


def labels(owner: Owner, component: str) -> dict[str, str]:
    """The standard labels, plus the owner's name (what the reconciler selects on)."""
    return {
        "app.kubernetes.io/name": {"serving": "leanserve-serving", "cache": "leanserve-redis"}.get(
            component, f"leanserve-{component}"
        ),
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "leanserve",
        "app.kubernetes.io/version": __version__,
        **MANAGED_BY,
        OWNER_LABEL: owner.name,
    }


def selector(owner: Owner, component: str) -> dict[str, str]:
    """The immutable part of the labels (a Deployment selector never changes)."""
    return {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/component": component, OWNER_LABEL: owner.name}


def _metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        **extra,
    }


def redis_name(owner: Owner) -> str:
    return f"{owner.name}-redis"


def config_name(owner: Owner) -> str:
    return f"{owner.name}-sidecar"


def cache_key_name(owner: Owner) -> str:
    return f"{owner.name}-cache-key"


#: The key of the cache's HMAC key in its Secret.
CACHE_KEY_FIELD = "hmac-key"


def caches_on(spec: InferenceDeploymentSpec) -> bool:
    return spec.cache.exact.enabled or spec.cache.semantic.enabled


def render_cache_key_secret(owner: Owner) -> dict[str, Any]:
    """The Secret holding the deployment's key for the integrity tags of its cache entries.

    Rendered without its data: the reconciler creates it once with a random key (see
    ``kube.ensure_created``) and later applies leave the key alone, so it is stable across
    reconciles and pods, and never appears in a manifest, a plan or a log.
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, cache_key_name(owner), "cache"),
    }


def wants_managed_redis(spec: InferenceDeploymentSpec) -> bool:
    """A managed Redis runs when a cache is on and the spec names no Redis of its own."""
    cache = spec.cache
    on = cache.exact.enabled or cache.semantic.enabled
    return on and cache.redis.url is None and cache.redis.managed is not False


def sidecar_settings(owner: Owner, spec: InferenceDeploymentSpec, plan: Candidate) -> dict[str, Any]:
    """The sidecar's settings file (SidecarConfig's fields), batching and caching as planned."""
    cache = spec.cache
    if cache.redis.url is not None:
        redis_url = cache.redis.url
    elif wants_managed_redis(spec):
        redis_url = f"redis://{redis_name(owner)}.{owner.namespace}.svc:{REDIS_PORT}/0"
    else:
        redis_url = ""
    return {
        "upstream": f"http://127.0.0.1:{MODEL_PORT}",
        "port": SIDECAR_PORT,
        "grpc_port": SIDECAR_GRPC_PORT,
        "max_batch_size": plan.policy.max_batch,
        "max_wait_ms": plan.policy.max_wait_ms,
        "pad_inputs": dict(spec.batching.pad_inputs),
        "redis_url": redis_url if (cache.exact.enabled or cache.semantic.enabled) else "",
        "exact_enabled": cache.exact.enabled,
        "cache_ttl_seconds": cache.exact.ttl_seconds,
        "cache_exclude_fields": list(cache.exact.exclude_fields),
        "semantic_enabled": cache.semantic.enabled,
        "semantic_threshold": cache.semantic.threshold,
        "semantic_max_entries": cache.semantic.max_entries,
        # Entries of another deployment, or of another model file or variant, never meet these.
        "cache_namespace": f"{owner.namespace}/{owner.name}",
        "model_digest": f"{spec.model.sha256 or spec.model.uri}:{plan.variant}",
        "request_timeout_s": SIDECAR_REQUEST_TIMEOUT_S,
        "drain_seconds": SIDECAR_DRAIN_S,
    }


def render_config(owner: Owner, spec: InferenceDeploymentSpec, plan: Candidate) -> dict[str, Any]:
    settings = sidecar_settings(owner, spec, plan)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_name(owner), "serving"),
        "data": {"sidecar.json": json.dumps(settings, indent=2, sort_keys=True)},
    }


def pod_resources(
    spec: InferenceDeploymentSpec, itype: InstanceType, pod: Resources | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model server, sidecar) resources of a pod of ``pod``'s size (the plan's; None: the whole node).

    The planner priced the replica by these requests (planner.allocation), and the profile it planned
    from was measured at this many vCPUs with the model server and the sidecar sharing them, so the
    sidecar gets its part and the model server the rest. CPU limits equal requests: a throttled model
    server is a latency the plan did not predict.
    """
    if pod is None:
        pod = allocation.replica_pod(itype.vcpus, None, spec.cache.semantic.enabled, itype)
    sidecar_cpu = allocation.sidecar_millicpu(pod.millicpu)
    model_cpu = max(pod.millicpu - sidecar_cpu, 250)
    sidecar_mi = (
        allocation.SIDECAR_SEMANTIC_MEMORY_MIB if spec.cache.semantic.enabled else allocation.SIDECAR_MEMORY_MIB
    )
    model_mi = max(pod.memory_mib - sidecar_mi, allocation.MODEL_MEMORY_FLOOR_MIB)
    model = {
        "requests": {"cpu": f"{model_cpu}m", "memory": f"{model_mi}Mi"},
        "limits": {"cpu": f"{model_cpu}m", "memory": f"{model_mi}Mi"},
    }
    if itype.is_gpu:
        model["requests"][GPU_RESOURCE] = str(itype.gpus)
        model["limits"][GPU_RESOURCE] = str(itype.gpus)
    sidecar = {
        "requests": {"cpu": f"{sidecar_cpu}m", "memory": f"{sidecar_mi}Mi"},
        "limits": {"cpu": f"{sidecar_cpu}m", "memory": f"{sidecar_mi}Mi"},
    }
    overrides = spec.serving.resources
    if overrides is not None:
        model["requests"].update(overrides.requests)
        model["limits"].update(overrides.limits)
    return model, sidecar


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probes(port: int) -> dict[str, Any]:
    """Health probes that tell a busy container from a dead one.

    A saturated sidecar answers its probes late (one event loop, the probe queued behind
    thousands of requests): with the kubelet's default 1 s timeout, liveness failed under load
    on a real node and the kubelet restarted a healthy, busy sidecar, which made everything
    worse. So liveness allows 5 s per probe and a minute of failures before a restart, and
    readiness (which only takes the pod out of the Service) 3 s.
    """
    return {
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": port},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 150,
        },
    }


def _prestop_sleep() -> dict[str, Any]:
    """Step 1 of a stop (PRESTOP_SLEEP_S), by the kubelet's native sleep action (GA in Kubernetes 1.34): no
    shell in the image, no exec."""
    return {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}}


def _source_volume(uri: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The volume (and its mount) that makes a pvc:// or configmap:// URI readable by the init container."""
    parts = urlsplit(uri)
    if parts.scheme == "pvc":
        name = f"pvc-{parts.netloc}"[:63]
        return (
            {"name": name, "persistentVolumeClaim": {"claimName": parts.netloc, "readOnly": True}},
            {"name": name, "mountPath": f"/mnt/pvc/{parts.netloc}", "readOnly": True},
        )
    if parts.scheme == "configmap":
        name = f"cm-{parts.netloc}"[:63]
        return (
            {"name": name, "configMap": {"name": parts.netloc}},
            {"name": name, "mountPath": f"/mnt/configmap/{parts.netloc}", "readOnly": True},
        )
    return None


def _source_volumes(spec: InferenceDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the model's and the evaluation data's pvc:// / configmap:// sources (each once)."""
    uris = [spec.model.uri] + ([spec.model.evaluation.uri] if spec.model.evaluation else [])
    found = {v[0]["name"]: v for v in map(_source_volume, uris) if v is not None}
    return [v for v, _ in found.values()], [m for _, m in found.values()]


def _pod_security(uid: int) -> dict[str, Any]:
    """The pod-level half of the restricted profile (CONTAINER_SECURITY is the container half)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _image(spec: InferenceDeploymentSpec, itype: InstanceType, settings: BuildSettings) -> str:
    """The serving image for the type: the GPU build on GPU types; the spec's overrides first."""
    if itype.is_gpu:
        return spec.serving.gpu_image or settings.gpu_image
    return spec.serving.image or settings.image


#: Lets a pod onto the tainted GPU pool.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def render_deployment(
    owner: Owner, spec: InferenceDeploymentSpec, plan: Candidate, itype: InstanceType, settings: BuildSettings
) -> dict[str, Any]:
    """The serving Deployment: fetch init container, model server, batching sidecar.

    Its pods stop without losing a request: preStop, drain and grace period as
    PRESTOP_SLEEP_S and the figures after it lay out.

    ``spec.replicas`` is left out on purpose: the HPA owns it (the reconciler
    sets the first value once, at creation, under another field manager).
    """
    gpu = itype.is_gpu
    image = _image(spec, itype, settings)
    pod = plan.pod or allocation.replica_pod(itype.vcpus, plan.memory_mb, spec.cache.semantic.enabled, itype)
    model_res, sidecar_res = pod_resources(spec, itype, pod)
    fetch_args = [
        "python",
        "-m",
        "leanserve_serving.fetch",
        "--uri",
        spec.model.uri,
        "--out",
        "/models/model.onnx",
        "--variant",
        plan.variant,
        "--format",
        spec.model.format,
    ]
    if spec.model.sha256:
        fetch_args += ["--sha256", spec.model.sha256]
    if spec.model.evaluation is not None:
        fetch_args += ["--evaluation", spec.model.evaluation.uri]
    if gpu:
        fetch_args.append("--gpu")
    if plan.recipe is not None and plan.recipe.outcome == "found":
        # Built as the accuracy-aware search found it holds the gate, not as the plain INT8 variant.
        fetch_args += ["--recipe", plan.recipe.model_dump_json(exclude_defaults=True)]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": "sidecar-config", "configMap": {"name": config_name(owner)}},
    ]
    sources, source_mounts = _source_volumes(spec)
    volumes += sources
    fetch_mounts = [{"name": "models", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}, *source_mounts]
    settings_json = render_config(owner, spec, plan)["data"]["sidecar.json"]
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(SIDECAR_PORT),
        "prometheus.io/path": "/metrics",
        # A changed sidecar setting or model variant rolls the pods (a ConfigMap change alone would not).
        "leanserve.dev/config-hash": hashlib.sha256((settings_json + " ".join(fetch_args)).encode()).hexdigest()[:16],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(SERVING_UID),
        "nodeSelector": {INSTANCE_TYPE_LABEL: itype.name},
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "initContainers": [
            {
                "name": "fetch-model",
                "image": image,
                "command": fetch_args,
                # Quantization writes model-sized temporary files: on the models emptyDir, not the small /tmp.
                "env": [{"name": "TMPDIR", "value": "/models"}],
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": fetch_mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "containers": [
            {
                "name": "model-server",
                "image": image,
                "command": ["python", "-m", "leanserve_serving.model_server"],
                "env": [
                    {"name": "LEANSERVE_MODEL_PATH", "value": "/models/model.onnx"},
                    # Clients call /v2/models/<the InferenceDeployment's name>/infer.
                    {"name": "LEANSERVE_MODEL_NAME", "value": owner.name},
                    {"name": "LEANSERVE_PORT", "value": str(MODEL_PORT)},
                    {"name": "LEANSERVE_PROVIDER", "value": "cuda" if gpu else "cpu"},
                    {"name": "LEANSERVE_DRAIN_SECONDS", "value": str(MODEL_SERVER_DRAIN_S)},
                    {"name": "LEANSERVE_SHUTDOWN_TIMEOUT_S", "value": str(MODEL_SERVER_SHUTDOWN_S)},
                ],
                "ports": [{"name": "model", "containerPort": MODEL_PORT}],
                "resources": model_res,
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": [
                    {"name": "models", "mountPath": "/models", "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                **_probes(MODEL_PORT),
                "lifecycle": _prestop_sleep(),
            },
            {
                "name": "sidecar",
                "image": image,
                "command": ["python", "-m", "leanserve_serving.sidecar"],
                "env": [
                    {"name": "LEANSERVE_CONFIG_FILE", "value": "/etc/leanserve/sidecar.json"},
                    *_cache_key_env(owner, spec),
                ],
                "ports": [
                    {"name": "http", "containerPort": SIDECAR_PORT},
                    {"name": "grpc", "containerPort": SIDECAR_GRPC_PORT},
                ],
                "resources": sidecar_res,
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": [
                    {"name": "sidecar-config", "mountPath": "/etc/leanserve", "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                **_probes(SIDECAR_PORT),
                "lifecycle": _prestop_sleep(),
            },
        ],
        "volumes": volumes,
    }
    if gpu:
        pod_spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name, "serving"),
        "spec": {
            "selector": {"matchLabels": selector(owner, "serving")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(owner, "serving"), "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def render_service(owner: Owner) -> dict[str, Any]:
    """The Service in front of the sidecars (the pod's front door): v2 over REST on port 80, over gRPC on
    port 8085 (``appProtocol: grpc`` tells meshes and gateways to balance its calls, not its connections)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, "serving"),
        "spec": {
            "selector": selector(owner, "serving"),
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": SIDECAR_GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
            ],
        },
    }


#: The serving pod's containers that take CPU under load.
SERVING_CONTAINERS = ("model-server", "sidecar")


def container_cpu_metric(container: str, utilization: int) -> dict[str, Any]:
    """An HPA metric on one container's CPU utilization (of its request)."""
    return {
        "type": "ContainerResource",
        "containerResource": {
            "name": "cpu",
            "container": container,
            "target": {"type": "Utilization", "averageUtilization": utilization},
        },
    }


def render_hpa(
    owner: Owner, spec: InferenceDeploymentSpec, plan: Candidate, itype: InstanceType, settings: BuildSettings
) -> dict[str, Any]:
    """autoscaling/v2: fast up, stabilised down; per-pod request rate when a custom metrics API exists.

    The replica bounds are the plan's (the planner sets them once: warm pool, maxReplicas, budget).

    Without one, CPU utilization per container (ContainerResource, GA in Kubernetes 1.30), the
    model server's and the sidecar's: the HPA follows the busier. A pod-level CPU average hid a
    saturated sidecar behind an idle model server on a real cluster (516m of 750m requested is
    69 %, under a 70 % target, while the sidecar ran at its limit and shed requests with 429).
    """
    low, high = plan.replicas_min, plan.replicas_max
    if settings.custom_metrics:
        metrics = [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": RPS_METRIC},
                    "target": {"type": "AverageValue", "averageValue": f"{max(int(plan.capacity_rps * 1000), 1)}m"},
                },
            }
        ]
    else:
        metrics = [container_cpu_metric(c, spec.autoscaling.target_cpu_utilization) for c in SERVING_CONTAINERS]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, owner.name, "serving"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": metrics,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": spec.autoscaling.scale_down_stabilization_seconds,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}],
                },
            },
        },
    }


def render_pdb(owner: Owner) -> dict[str, Any]:
    """At most one serving pod down at a time during node drains (never blocks a drain of one replica)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name, "serving"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, "serving")}},
    }


def render_redis(owner: Owner, spec: InferenceDeploymentSpec, settings: BuildSettings) -> list[dict[str, Any]]:
    """A single-replica, memory-only Redis for this deployment's caches (a cache: losing it loses nothing)."""
    maxmemory_mb = 256 if not spec.cache.semantic.enabled else 1024
    name = redis_name(owner)
    container = {
        "name": "redis",
        "image": settings.redis_image,
        "args": [
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            f"{maxmemory_mb}mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--protected-mode",
            "no",
        ],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "resources": {
            "requests": {"cpu": "100m", "memory": f"{maxmemory_mb + 64}Mi"},
            "limits": {"cpu": "1", "memory": f"{maxmemory_mb + 128}Mi"},
        },
        "securityContext": CONTAINER_SECURITY,
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, "cache"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(owner, "cache")},
            "template": {
                "metadata": {"labels": labels(owner, "cache")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(REDIS_UID),
                    "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, "cache"),
        "spec": {
            "selector": selector(owner, "cache"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
        },
    }
    return [deployment, service]


#: How long a finished profiling Job stays (its result is in the profile cache by then).
PROFILING_TTL_SECONDS = 3600


def profiling_job_name(owner: Owner, instance_type: str) -> str:
    """Deterministic: a restarted operator finds the Job it created instead of making another."""
    return f"{owner.name}-bench-{instance_type.replace('.', '-')}"[:63].rstrip("-")


def render_profiling_job(
    owner: Owner, spec: InferenceDeploymentSpec, itype: InstanceType, settings: BuildSettings, model_key: str
) -> dict[str, Any]:
    """A Job that benches the spec's model on one instance type and reports the profile in its termination message.

    Its pod requests the CPU it measures with: a serving replica's whole pod on
    that node (the bench's threads follow the container's CPU limit, as the model
    server's do), so the profile measures what the plan will run.
    """
    if spec.model.evaluation is None:
        raise ValueError("profiling needs model.evaluation")
    # The bench runs the model server and the sidecar of its stack run in this one container: it takes
    # the whole pod a replica takes (the type's whole node; its threads follow the CPU limit).
    pod = allocation.replica_pod(itype.vcpus, None, spec.cache.semantic.enabled, itype)
    model_res, _ = pod_resources(spec, itype, pod)
    if spec.serving.resources is None:
        for kind in ("requests", "limits"):
            model_res[kind]["cpu"] = f"{pod.millicpu}m"
    args = [
        "python",
        "-m",
        "leanserve_serving.bench_job",
        "--uri",
        spec.model.uri,
        "--evaluation",
        spec.model.evaluation.uri,
        "--metric",
        spec.model.evaluation.metric,
        "--instance-type",
        itype.name,
        "--format",
        spec.model.format,
    ]
    if spec.model.sha256:
        args += ["--sha256", spec.model.sha256]
    if spec.profiling.quantization_search_seconds > 0:
        args += ["--max-accuracy-drop", f"{spec.sla.max_accuracy_drop:g}"]
        args += ["--quantization-search-seconds", str(spec.profiling.quantization_search_seconds)]
    if spec.batching.pad_inputs:
        args += ["--pad-inputs", ",".join(f"{k}={v:g}" for k, v in spec.batching.pad_inputs.items())]
    sources, source_mounts = _source_volumes(spec)
    meta = _metadata(owner, profiling_job_name(owner, itype.name), "profiling")
    meta["labels"].update({"leanserve.dev/model-key": model_key, "leanserve.dev/instance-type": itype.name})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(SERVING_UID),
        "nodeSelector": {INSTANCE_TYPE_LABEL: itype.name},
        "containers": [
            {
                "name": "bench",
                "image": _image(spec, itype, settings),
                "command": args,
                "env": [{"name": "TMPDIR", "value": "/work"}],
                "resources": model_res,
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": [{"name": "work", "mountPath": "/work"}, *source_mounts],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            }
        ],
        "volumes": [{"name": "work", "emptyDir": {}}, *sources],
    }
    if itype.is_gpu:
        pod_spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": spec.profiling.retries,
            # Over every retry and the wait for a node: a bench that hangs fails the Job (DeadlineExceeded)
            # and its type is left out, instead of holding the deployment in Profiling.
            "activeDeadlineSeconds": spec.profiling.deadline_seconds,
            "ttlSecondsAfterFinished": PROFILING_TTL_SECONDS,
            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec},
        },
    }


def _cache_key_env(owner: Owner, spec: InferenceDeploymentSpec) -> list[dict[str, Any]]:
    """The sidecar's cache HMAC key, from the deployment's Secret, when a cache is on."""
    if not caches_on(spec):
        return []
    ref = {"name": cache_key_name(owner), "key": CACHE_KEY_FIELD}
    return [{"name": "LEANSERVE_CACHE_HMAC_KEY", "valueFrom": {"secretKeyRef": ref}}]


def render_all(
    owner: Owner, spec: InferenceDeploymentSpec, plan: Candidate, itype: InstanceType, settings: BuildSettings
) -> list[dict[str, Any]]:
    """Every object of the deployment, in apply order."""
    objects = [render_cache_key_secret(owner)] if caches_on(spec) else []
    objects += render_redis(owner, spec, settings) if wants_managed_redis(spec) else []
    return [
        *objects,
        render_config(owner, spec, plan),
        render_deployment(owner, spec, plan, itype, settings),
        render_service(owner),
        render_hpa(owner, spec, plan, itype, settings),
        render_pdb(owner),
    ]
