"""The manifest builders: pure functions, checked without a cluster (the cluster tests apply them)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.controller.builders import (
    BuildSettings,
    Owner,
    render_all,
    render_deployment,
    render_hpa,
    sidecar_settings,
)
from leanserve.planner.allocation import Resources
from leanserve.planner.latency import Policy
from leanserve.planner.plan import Candidate, replica_bounds
from leanserve.planner.prices import load_prices

PRICES = load_prices()
OWNER = Owner("fraud", "team-a", "0000-uid")
CPU, GPU = PRICES.get("m5.2xlarge"), PRICES.get("g4dn.xlarge")


def spec(**changes: Any) -> InferenceDeploymentSpec:
    base: dict[str, Any] = {
        "model": {"uri": "https://models.example.com/fraud.onnx", "evaluation": {"uri": "pvc://data/eval.npz"}},
        "sla": {"latency": {"targetMs": 100}},
        "traffic": {"averageRps": 100},
    }
    base.update(changes)
    return InferenceDeploymentSpec.model_validate(base)


def plan(
    instance_type: str = "m5.2xlarge",
    variant: str = "int8-dynamic",
    batch: int = 16,
    wait: float = 2.0,
    peak: int = 4,
    capacity: float = 250.0,
) -> Candidate:
    """A sized candidate as the planner leaves it (replica bounds for the default spec)."""
    itype = PRICES.get(instance_type)
    assert itype is not None
    c = Candidate(
        instance_type=instance_type,
        variant=variant,
        policy=Policy(batch, wait),
        price_per_hour=itype.on_demand_usd_per_hour,
        is_gpu=itype.is_gpu,
        quality_drop=0.002,
    )
    c.capacity_rps, c.replicas_hourly = capacity, [1] * 12 + [peak] * 12
    c.replicas_min, c.replicas_max = replica_bounds(spec(), c)
    return c


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["initContainers"] + pod["containers"]}


def test_every_object_is_owned_labelled_and_in_the_namespace():
    objects = render_all(OWNER, spec(), plan(), CPU, BuildSettings())
    kinds = [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    assert kinds == [
        "Secret/fraud-cache-key",
        "Deployment/fraud-redis",
        "Service/fraud-redis",
        "ConfigMap/fraud-sidecar",
        "Deployment/fraud",
        "Service/fraud",
        "HorizontalPodAutoscaler/fraud",
        "PodDisruptionBudget/fraud",
    ]
    for o in objects:
        assert o["metadata"]["namespace"] == "team-a"
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["uid"] == "0000-uid" and ref["controller"] is True
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "leanserve"


def test_the_serving_pod_requests_the_pod_size_the_plan_chose():
    """A 1-vCPU replica (its profile measured at 1 vCPU): the sidecar half a core, the model server the rest,
    the memory both containers' part of the planned pod; limits equal requests."""
    sized = replace(plan(), pod=Resources(1000, 1536), replicas_per_node=7)
    by_name = containers(render_deployment(OWNER, spec(), sized, CPU, BuildSettings()))
    model, sidecar = by_name["model-server"]["resources"], by_name["sidecar"]["resources"]
    assert model["requests"] == model["limits"] == {"cpu": "500m", "memory": "1024Mi"}
    assert sidecar["requests"] == sidecar["limits"] == {"cpu": "500m", "memory": "512Mi"}


def test_the_serving_pod_is_restricted_probed_scraped_and_pinned_to_the_planned_type():
    d = render_deployment(OWNER, spec(), plan(), CPU, BuildSettings())
    pod = d["spec"]["template"]["spec"]
    assert "replicas" not in d["spec"], "the HPA owns replicas"
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "m5.2xlarge"}
    assert "tolerations" not in pod and pod["automountServiceAccountToken"] is False
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    for c in containers(d).values():
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
    by_name = containers(d)
    assert by_name["model-server"]["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8081}
    assert by_name["sidecar"]["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    # A busy sidecar answers late: liveness waits 5 s a probe and a minute before a restart.
    live = by_name["sidecar"]["livenessProbe"]
    assert live["timeoutSeconds"] >= 5 and live["timeoutSeconds"] * 1 <= live["periodSeconds"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    # Clients name the model after the InferenceDeployment.
    env = {e["name"]: e["value"] for e in by_name["model-server"]["env"]}
    assert env["LEANSERVE_MODEL_NAME"] == OWNER.name
    assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # A plan without a pod size fills the node: what m5.2xlarge allocates to pods (8 vCPUs less GKE's reserve
    # of 6 %, 1 %, 0.5 % x 2 and 0.25 % x 4 of its cores, and 100m for the daemonsets).
    model_cpu = by_name["model-server"]["resources"]["requests"]["cpu"]
    sidecar_cpu = by_name["sidecar"]["resources"]["requests"]["cpu"]
    assert int(model_cpu[:-1]) + int(sidecar_cpu[:-1]) == 8000 - (60 + 10 + 10 + 10) - 100
    assert "nvidia.com/gpu" not in by_name["model-server"]["resources"]["limits"]


def test_the_init_container_fetches_builds_the_planned_variant_and_mounts_pvc_sources():
    s = spec(model={"uri": "pvc://models/fraud.onnx", "sha256": "a" * 64, "evaluation": {"uri": "pvc://models/e.npz"}})
    d = render_deployment(OWNER, s, plan(variant="int8-static"), CPU, BuildSettings())
    fetch = containers(d)["fetch-model"]
    args = fetch["command"]
    assert args[:3] == ["python", "-m", "leanserve_serving.fetch"]
    assert args[args.index("--variant") + 1] == "int8-static" and args[args.index("--sha256") + 1] == "a" * 64
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert volumes["pvc-models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in fetch["volumeMounts"]


def test_a_gpu_plan_tolerates_the_taint_requests_the_gpu_and_uses_the_gpu_image():
    d = render_deployment(OWNER, spec(), plan("g4dn.xlarge", "fp16"), GPU, BuildSettings(gpu_image="gpu:1"))
    pod = d["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    model = containers(d)["model-server"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1" and model["image"] == "gpu:1"
    assert {"name": "LEANSERVE_PROVIDER", "value": "cuda"} in model["env"]


def test_a_changed_batching_policy_rolls_the_pods():
    a = render_deployment(OWNER, spec(), plan(batch=16), CPU, BuildSettings())
    b = render_deployment(OWNER, spec(), plan(batch=32), CPU, BuildSettings())
    key = "leanserve.dev/config-hash"
    assert (
        a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]
    )


@pytest.mark.parametrize(
    ("changes", "itype", "expected"),
    [
        ({}, "m5.2xlarge", (1, 5)),  # warm pool 1; peak 4 plus a quarter
        ({"autoscaling": {"warmPool": 0}}, "g4dn.xlarge", (1, 5)),  # never 0 (and never 0 on GPU)
        ({"autoscaling": {"warmPool": 3, "maxReplicas": 7}}, "m5.2xlarge", (3, 7)),
        # $300/month buys 300 / (0.384 * 730) = 1.07 -> 1 m5.2xlarge all month, but never below the warm pool
        ({"budget": {"maxMonthlyCost": 300}, "autoscaling": {"warmPool": 2}}, "m5.2xlarge", (2, 2)),
        ({"budget": {"maxMonthlyCost": 1200}}, "m5.2xlarge", (1, 4)),
    ],
)
def test_hpa_bounds_are_the_warm_pool_and_what_the_budget_allows(changes, itype, expected):
    assert replica_bounds(spec(**changes), plan(itype)) == expected


def test_the_cpu_target_is_the_specs():
    hpa = render_hpa(OWNER, spec(autoscaling={"targetCpuUtilization": 40}), plan(), CPU, BuildSettings())["spec"]
    assert {m["containerResource"]["target"]["averageUtilization"] for m in hpa["metrics"]} == {40}


def test_the_hpa_takes_its_bounds_from_the_plan():
    c = plan()
    c.replicas_min, c.replicas_max = 2, 9
    hpa = render_hpa(OWNER, spec(), c, CPU, BuildSettings())["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 9)


def test_hpa_scales_on_request_rate_when_custom_metrics_exist_else_on_cpu():
    cpu = render_hpa(OWNER, spec(), plan(capacity=250), CPU, BuildSettings())["spec"]
    # Per container: a saturated sidecar must not hide behind an idle model server's request.
    assert {m["containerResource"]["container"]: m["containerResource"]["target"] for m in cpu["metrics"]} == {
        "model-server": {"type": "Utilization", "averageUtilization": 70},
        "sidecar": {"type": "Utilization", "averageUtilization": 70},
    }
    assert {m["type"] for m in cpu["metrics"]} == {"ContainerResource"}
    assert containers(render_deployment(OWNER, spec(), plan(), CPU, BuildSettings())).keys() >= {
        m["containerResource"]["container"] for m in cpu["metrics"]
    }
    assert cpu["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert cpu["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    rps = render_hpa(OWNER, spec(), plan(capacity=250), CPU, BuildSettings(custom_metrics=True))["spec"]
    assert rps["metrics"][0]["pods"]["metric"]["name"] == "leanserve_requests_per_second"
    assert rps["metrics"][0]["pods"]["target"]["averageValue"] == "250000m"


def test_redis_is_managed_unless_the_spec_names_one_or_turns_caching_off():
    managed = sidecar_settings(OWNER, spec(), plan())
    assert managed["redis_url"] == "redis://fraud-redis.team-a.svc:6379/0"
    assert managed["max_batch_size"] == 16 and managed["max_wait_ms"] == 2.0
    external = spec(cache={"redis": {"url": "rediss://cache.example.com:6380/2"}})
    assert sidecar_settings(OWNER, external, plan())["redis_url"] == "rediss://cache.example.com:6380/2"
    assert not any(
        o["metadata"]["name"].endswith("-redis") for o in render_all(OWNER, external, plan(), CPU, BuildSettings())
    )
    off = spec(cache={"exact": {"enabled": False}})
    assert sidecar_settings(OWNER, off, plan())["redis_url"] == ""
    assert len(render_all(OWNER, off, plan(), CPU, BuildSettings())) == 5


def test_the_sidecar_serves_grpc_on_a_port_the_service_names_and_is_probed_over_rest():
    """Clients reach the v2 gRPC service through the Service's `grpc` port, the port the sidecar's settings
    open; the kubelet keeps probing REST (the gRPC port says nothing the REST health does not)."""
    from leanserve_serving.config import SidecarConfig, load_config

    objects = render_all(OWNER, spec(), plan(), CPU, BuildSettings())
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == OWNER.name)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["targetPort"] == "grpc" and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"] == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == OWNER.name)
    sidecar = containers(deployment)["sidecar"]
    container_ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    config = load_config(SidecarConfig, json.loads(cm["data"]["sidecar.json"]), environ={})
    assert container_ports == {"http": config.port, "grpc": config.grpc_port} and config.grpc_port != 0
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in sidecar:
            assert sidecar[probe]["httpGet"]["port"] == container_ports["http"]


def test_the_sidecar_settings_are_a_valid_sidecar_config():
    """What the ConfigMap carries is loadable by the sidecar's own config loader (no unknown keys)."""
    from leanserve_serving.config import SidecarConfig, load_config

    cm = next(o for o in render_all(OWNER, spec(), plan(), CPU, BuildSettings()) if o["kind"] == "ConfigMap")
    settings = json.loads(cm["data"]["sidecar.json"])
    config = load_config(SidecarConfig, settings, environ={})
    assert config.max_batch_size == 16 and config.upstream == "http://127.0.0.1:8081" and config.exact_enabled


def test_a_profiling_job_is_named_once_per_type_and_sized_like_the_serving_pod():
    from leanserve.controller.builders import render_profiling_job

    job = render_profiling_job(OWNER, spec(), GPU, BuildSettings(gpu_image="gpu:1"), "k" * 40)
    assert job["metadata"]["name"] == "fraud-bench-g4dn-xlarge"
    assert job["metadata"]["labels"]["leanserve.dev/instance-type"] == "g4dn.xlarge"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "g4dn.xlarge"
    }
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (bench,) = pod["containers"]
    serving = containers(render_deployment(OWNER, spec(), plan("g4dn.xlarge", "fp16"), GPU, BuildSettings()))
    # The bench runs the model server and the sidecar of its stack run in one container: the whole pod's CPU.
    model, sidecar = serving["model-server"]["resources"], serving["sidecar"]["resources"]
    pod_cpu = int(model["requests"]["cpu"][:-1]) + int(sidecar["requests"]["cpu"][:-1])
    assert bench["resources"]["requests"] == bench["resources"]["limits"]
    assert bench["resources"]["requests"] == {**model["requests"], "cpu": f"{pod_cpu}m"}, "benched in the pod served"
    assert bench["image"] == "gpu:1" and bench["terminationMessagePolicy"] == "File"
    assert bench["command"][:3] == ["python", "-m", "leanserve_serving.bench_job"]
    with pytest.raises(ValueError, match="needs model"):
        render_profiling_job(OWNER, spec(model={"uri": "https://m.example.com/m.onnx"}), CPU, BuildSettings(), "k")


def test_a_profiling_job_stops_at_the_specs_deadline():
    from leanserve.controller.builders import render_profiling_job

    default = render_profiling_job(OWNER, spec(), CPU, BuildSettings(), "k")["spec"]
    assert default["activeDeadlineSeconds"] == 1800
    short = spec(profiling={"unschedulableTimeoutSeconds": 30, "deadlineSeconds": 240, "retries": 1})
    job = render_profiling_job(OWNER, short, GPU, BuildSettings(), "k")["spec"]
    assert (job["activeDeadlineSeconds"], job["backoffLimit"]) == (240, 1)


def test_the_serving_pod_stops_without_losing_a_request():
    """preStop, drains and grace period, read back through the serving processes' own config loaders."""
    from leanserve_serving.config import ModelServerConfig, SidecarConfig, load_config

    deployment = render_deployment(OWNER, spec(), plan(), CPU, BuildSettings())
    pod = deployment["spec"]["template"]["spec"]
    by_name = containers(deployment)
    prestop = {n: c["lifecycle"]["preStop"]["sleep"]["seconds"] for n, c in by_name.items() if "lifecycle" in c}
    assert prestop == {"model-server": 5, "sidecar": 5}, "every container that receives traffic waits first"
    assert "exec" not in json.dumps(pod), "the native sleep action: no shell needed in the image"
    cm = next(o for o in render_all(OWNER, spec(), plan(), CPU, BuildSettings()) if o["kind"] == "ConfigMap")
    car = load_config(SidecarConfig, json.loads(cm["data"]["sidecar.json"]), environ={})
    env = {e["name"]: e["value"] for e in by_name["model-server"]["env"]}
    model = load_config(ModelServerConfig, environ=env)
    assert car.drain_seconds > 0 and model.drain_seconds > 0
    sidecar_done = prestop["sidecar"] + car.drain_seconds + car.shutdown_timeout_s
    model_stops_serving = prestop["model-server"] + model.drain_seconds
    assert model_stops_serving > sidecar_done, "the model server serves until the sidecar is gone"
    assert pod["terminationGracePeriodSeconds"] >= model_stops_serving + model.shutdown_timeout_s + 5


def test_the_cache_key_comes_from_a_secret_without_data_and_the_keys_are_scoped():
    """The sidecar reads its HMAC key from the deployment's Secret (secretKeyRef); the rendered Secret
    holds no key (the reconciler creates it once with a random one); cache keys are scoped."""
    objects = {
        f"{o['kind']}/{o['metadata']['name']}": o for o in render_all(OWNER, spec(), plan(), CPU, BuildSettings())
    }
    secret = objects["Secret/fraud-cache-key"]
    assert not {"data", "stringData"} & secret.keys()
    env = {e["name"]: e for e in containers(objects["Deployment/fraud"])["sidecar"]["env"]}
    assert env["LEANSERVE_CACHE_HMAC_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "fraud-cache-key", "key": "hmac-key"}
    }
    settings = json.loads(objects["ConfigMap/fraud-sidecar"]["data"]["sidecar.json"])
    assert settings["cache_namespace"] == f"{OWNER.namespace}/fraud"
    assert settings["model_digest"].endswith(":" + plan().variant)


def test_ragged_batching_reaches_the_sidecar_as_its_pad_inputs_setting_which_the_sidecar_parses(tmp_path):
    from leanserve_serving.config import SidecarConfig, load_config

    padded = spec(batching={"mode": "auto", "padInputs": {"input_ids": 0, "attention_mask": 0}})
    settings = sidecar_settings(OWNER, padded, plan())
    assert settings["pad_inputs"] == {"input_ids": 0, "attention_mask": 0}
    assert sidecar_settings(OWNER, spec(), plan())["pad_inputs"] == {}
    config_file = tmp_path / "sidecar.json"
    config_file.write_text(json.dumps(settings))
    loaded = load_config(SidecarConfig, environ={"LEANSERVE_CONFIG_FILE": str(config_file)})
    assert loaded.pad_inputs == {"input_ids": 0, "attention_mask": 0}


def test_the_profiling_job_searches_int8_within_the_specs_gate_and_benches_with_its_padding():
    from leanserve.controller.builders import render_profiling_job

    text = spec(
        sla={"latency": {"targetMs": 100}, "maxAccuracyDrop": 0.005},
        batching={"mode": "auto", "padInputs": {"input_ids": 0, "attention_mask": 0}},
        profiling={"quantizationSearchSeconds": 120},
    )
    (bench,) = render_profiling_job(OWNER, text, CPU, BuildSettings(), "k" * 40)["spec"]["template"]["spec"][
        "containers"
    ]
    args = bench["command"]
    assert args[args.index("--max-accuracy-drop") + 1] == "0.005"
    assert args[args.index("--quantization-search-seconds") + 1] == "120"
    assert args[args.index("--pad-inputs") + 1] == "input_ids=0,attention_mask=0"
    (plain,) = render_profiling_job(OWNER, spec(profiling={"quantizationSearchSeconds": 0}), CPU, BuildSettings(), "k")[
        "spec"
    ]["template"]["spec"]["containers"]
    assert "--max-accuracy-drop" not in plain["command"] and "--pad-inputs" not in plain["command"]


def test_a_searched_int8_variant_is_built_in_the_pod_by_its_recipe():
    from leanserve_serving.profile import QuantRecipe

    recipe = QuantRecipe(
        method="dynamic",
        per_channel=True,
        reduce_range=False,
        nodes_excluded=["MatMul:h1"],
        excluded_count=1,
        outcome="found",
    )
    found = replace(plan(), recipe=recipe)
    fetch = next(
        c
        for c in render_deployment(OWNER, spec(), found, CPU, BuildSettings())["spec"]["template"]["spec"][
            "initContainers"
        ]
    )
    sent = QuantRecipe.model_validate_json(fetch["command"][fetch["command"].index("--recipe") + 1])
    assert sent == recipe
    plain = next(
        c
        for c in render_deployment(OWNER, spec(), plan(), CPU, BuildSettings())["spec"]["template"]["spec"][
            "initContainers"
        ]
    )
    assert "--recipe" not in plain["command"]
