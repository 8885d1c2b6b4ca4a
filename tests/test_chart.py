"""The Helm chart's values: each extension point lands where it should, the price table reaches the
operator as a file it parses, and values.schema.json refuses typos and malformed tables at
`helm template` time.

Every render is the real helm binary (built with the control plane; no API server is needed).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from leanserve.planner.prices import InstanceType, PriceTable, load_prices
from tests.conftest import REPO

# The helm binary comes from the control plane's build (as in tests/test_operator.py).
pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "leanserve"
SHIPPED_PRICES = REPO / "operator" / "leanserve" / "planner" / "prices.yaml"
RELEASE = "leanserve"
NAMESPACE = "leanserve-system"


def helm_template(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None, *extra: str):
    """``helm template`` of the chart with ``values`` as a values file; the finished process."""
    args = [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]  # a later one wins
    if values is not None:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    proc = helm_template(helm, tmp_path, values, *extra)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def refusal(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None, *extra: str) -> str:
    """What helm says when it refuses the values (the render must fail)."""
    proc = helm_template(helm, tmp_path, values, *extra)
    assert proc.returncode != 0, f"helm template accepted {values} {extra}"
    return proc.stderr


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def prices_configmap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The price table's ConfigMap (the dashboards' is beside it by default)."""
    (doc,) = [d for d in docs if d["kind"] == "ConfigMap" and "prices.yaml" in d["data"]]
    return doc


def operator_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]


def test_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Pod")


test_pod.__test__ = False  # a helper, not a test


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def custom_table() -> dict[str, Any]:
    """A user's own table: negotiated (discounted) rates, a spot price, a type leanserve does not ship."""
    return {
        "source": "ACME enterprise agreement, 30 % off list, eu-west-1",
        "date": "2025-09-15",
        "currency": "USD",
        "instanceTypes": [
            {"name": "m5.large", "vcpus": 2, "memoryGiB": 8, "onDemandUsdPerHour": 0.0749},
            {
                "name": "c8g.xlarge",
                "vcpus": 4,
                "memoryGiB": 8,
                "gpus": 0,
                "onDemandUsdPerHour": 0.1116,
                "spotUsdPerHour": 0.045,
            },
            {
                "name": "g6.xlarge",
                "vcpus": 4,
                "memoryGiB": 16,
                "gpus": 1,
                "gpuModel": "NVIDIA L4",
                "onDemandUsdPerHour": 0.5634,
            },
        ],
    }


# Defaults ------------------------------------------------------------------------------------------


def test_the_chart_lints_strictly(helm):
    proc = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_default_price_table_is_the_one_leanserve_ships():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["prices"] == yaml.safe_load(SHIPPED_PRICES.read_text()), (
        "charts/leanserve/values.yaml `prices` differs from operator/leanserve/planner/prices.yaml: copy the table"
    )


def test_by_default_the_operator_plans_with_the_shipped_table_from_its_configmap(helm, tmp_path):
    docs = render(helm, tmp_path)
    prices = prices_configmap(docs)
    assert prices["metadata"]["name"] == "leanserve-prices"
    assert PriceTable.model_validate(yaml.safe_load(prices["data"]["prices.yaml"])) == load_prices()
    assert env_of(container(operator_pod(docs)))["LEANSERVE_PRICES"] == "/etc/leanserve/prices/prices.yaml"


def test_the_default_security_contexts_are_todays_restricted_ones(helm, tmp_path):
    docs = render(helm, tmp_path)
    pod_context = {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container_context = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    for pod in (operator_pod(docs), test_pod(docs)):
        assert pod["spec"]["securityContext"] == pod_context
        assert container(pod)["securityContext"] == container_context


def test_the_defaults_add_nothing_a_user_did_not_ask_for(helm, tmp_path):
    pod = operator_pod(render(helm, tmp_path))
    assert not {"imagePullSecrets", "affinity", "nodeSelector", "tolerations"} & pod["spec"].keys()
    assert set(pod["metadata"]["annotations"]) == {"checksum/prices"}
    assert container(pod)["args"] is None  # no namespaces, not verbose, no extra args
    assert set(env_of(container(pod))) == {
        "LEANSERVE_SERVING_IMAGE",
        "LEANSERVE_GPU_IMAGE",
        "LEANSERVE_REDIS_IMAGE",
        "LEANSERVE_PRICES",
    }


# Names and labels ------------------------------------------------------------------------------------


def test_fullname_override_names_every_object_and_every_reference(helm, tmp_path):
    docs = render(helm, tmp_path, {"fullnameOverride": "acme", "operator": {"watchNamespaces": ["team-a"]}})
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert names >= {
        ("Deployment", "acme-operator"),
        ("Service", "acme-operator"),
        ("ServiceAccount", "acme"),
        ("ClusterRole", "acme-operator"),
        ("RoleBinding", "acme-operator"),
        ("ConfigMap", "acme-prices"),
        ("Pod", "acme-test-health"),
    }
    pod = operator_pod(docs)
    assert pod["spec"]["serviceAccountName"] == "acme"
    assert {"name": "prices", "configMap": {"name": "acme-prices"}} in pod["spec"]["volumes"]
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == "acme-operator" and binding["subjects"][0]["name"] == "acme"
    assert "http://acme-operator:8080/healthz" in container(test_pod(docs))["command"][-1]


def test_name_override_changes_the_name_label_and_the_selector_still_matches(helm, tmp_path):
    docs = render(helm, tmp_path, {"nameOverride": "acme-ml"})
    assert one(docs, "Deployment")["metadata"]["name"] == "leanserve-acme-ml-operator"
    assert {d["metadata"]["labels"]["app.kubernetes.io/name"] for d in docs} == {"acme-ml"}
    deployment = one(docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/name"] == "acme-ml"
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(docs, "Service")["spec"]["selector"] == selector


def test_a_long_name_keeps_the_operators_names_within_a_dns_label(helm, tmp_path):
    monitoring = {"podMonitor": {"enabled": True}, "prometheusScrapeConfig": {"enabled": True}}
    docs = render(helm, tmp_path, {"fullnameOverride": "x" * 70, **monitoring})
    for doc in docs:
        if doc["kind"] in ("Deployment", "Service", "ClusterRole", "ConfigMap", "PodMonitor"):
            name = doc["metadata"]["name"]
            assert len(name) <= 63 and not name.endswith("-"), name
    assert one(docs, "Service")["metadata"]["name"] in container(test_pod(docs))["command"][-1]


def test_pod_labels_and_annotations_land_on_the_operator_pod_not_on_its_selector(helm, tmp_path):
    values = {"operator": {"podLabels": {"team": "ml-platform"}, "podAnnotations": {"prometheus.io/scrape": "true"}}}
    docs = render(helm, tmp_path, values)
    pod = operator_pod(docs)
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "checksum/prices" in pod["metadata"]["annotations"]
    assert "team" not in one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert "team" not in one(docs, "Deployment")["metadata"]["labels"]


# The operator container ------------------------------------------------------------------------------


def test_pod_labels_and_annotations_may_not_repeat_the_charts_own(helm, tmp_path):
    # A repeated key would render twice; a changed selector label would orphan the pod.
    stderr = refusal(helm, tmp_path, {"operator": {"podLabels": {"app.kubernetes.io/component": "x"}}})
    assert "invalid propertyName 'app.kubernetes.io/component'" in stderr, stderr
    stderr = refusal(helm, tmp_path, {"operator": {"podAnnotations": {"checksum/prices": "0"}}})
    assert "invalid propertyName 'checksum/prices'" in stderr, stderr
    render(helm, tmp_path, {"operator": {"podLabels": {"app.kubernetes.io/part-of": "ml-platform"}}})


def test_extra_env_and_args_come_after_the_charts_own(helm, tmp_path):
    values = {
        "operator": {
            "verbose": True,
            "extraArgs": ["--liveness=http://0.0.0.0:9090/healthz"],
            "extraEnv": [
                {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
        }
    }
    c = container(operator_pod(render(helm, tmp_path, values)))
    assert c["args"] == ["--verbose", "--liveness=http://0.0.0.0:9090/healthz"]
    names = [e["name"] for e in c["env"]]
    assert names[-2:] == ["HTTPS_PROXY", "NODE"] and "LEANSERVE_PRICES" in names[:-2]
    assert env_of(c)["HTTPS_PROXY"] == "http://proxy:3128"
    assert env_of(c)["NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_images_come_from_the_values_in_one_place(helm, tmp_path):
    values = {
        "operator": {"image": {"repository": "registry.acme/leanserve/operator", "tag": "0.1.0-acme"}},
        "serving": {
            "image": "registry.acme/serving:1",
            "gpuImage": "registry.acme/serving-gpu:1",
            "redisImage": "registry.acme/redis:7",
        },
    }
    docs = render(helm, tmp_path, values)
    assert container(operator_pod(docs))["image"] == "registry.acme/leanserve/operator:0.1.0-acme"
    assert container(test_pod(docs))["image"] == "registry.acme/leanserve/operator:0.1.0-acme"
    env = env_of(container(operator_pod(docs)))
    assert env["LEANSERVE_SERVING_IMAGE"] == "registry.acme/serving:1"
    assert env["LEANSERVE_GPU_IMAGE"] == "registry.acme/serving-gpu:1"
    assert env["LEANSERVE_REDIS_IMAGE"] == "registry.acme/redis:7"


def test_image_pull_secrets_reach_the_operator_and_the_test_pod(helm, tmp_path):
    docs = render(helm, tmp_path, {"imagePullSecrets": [{"name": "regcred"}]})
    assert operator_pod(docs)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert test_pod(docs)["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_resources_are_the_users(helm, tmp_path):
    resources = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    docs = render(helm, tmp_path, {"operator": {"resources": resources}})
    # Helm merges maps: the default cpu limit stays unless the user nulls it.
    assert container(operator_pod(docs))["resources"] == {**resources, "limits": {"cpu": "1", "memory": "2Gi"}}
    docs = render(helm, tmp_path, {"operator": {"resources": {"limits": {"cpu": None}}}})
    assert "cpu" not in container(operator_pod(docs))["resources"]["limits"]


def test_scheduling_values_place_the_operator_and_the_test_pod(helm, tmp_path):
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]
            }
        }
    }
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}]
    values = {
        "operator": {"nodeSelector": {"kubernetes.io/os": "linux"}, "affinity": affinity, "tolerations": tolerations}
    }
    docs = render(helm, tmp_path, values)
    for pod in (operator_pod(docs), test_pod(docs)):
        assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert pod["spec"]["affinity"] == affinity
        assert pod["spec"]["tolerations"] == tolerations


def test_security_contexts_are_values(helm, tmp_path):
    values = {
        "operator": {
            "podSecurityContext": {"runAsUser": 20000, "runAsGroup": 20000, "fsGroup": 20000},
            "securityContext": {"readOnlyRootFilesystem": False, "capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]}},
        }
    }
    docs = render(helm, tmp_path, values)
    # Helm merges maps: what the user leaves out keeps its default (nulling a key removes it).
    pod_context = {
        "runAsNonRoot": True,
        "runAsUser": 20000,
        "runAsGroup": 20000,
        "fsGroup": 20000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for pod in (operator_pod(docs), test_pod(docs)):
        assert pod["spec"]["securityContext"] == pod_context
        c = container(pod)["securityContext"]
        assert c["readOnlyRootFilesystem"] is False and c["capabilities"]["add"] == ["NET_RAW"]
        assert c["allowPrivilegeEscalation"] is False


def every_override() -> dict[str, Any]:
    return {
        "fullnameOverride": "acme",
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "watchNamespaces": ["team-a"],
            "extraArgs": ["--verbose"],
            "extraEnv": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "podLabels": {"team": "ml-platform"},
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "podSecurityContext": {"fsGroup": 10001},
            "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                    ]
                }
            },
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "prices": custom_table(),
        "prometheusScrapeConfig": {"enabled": True, "jobName": "acme-models", "interval": "1m"},
        "dashboards": {"label": "acme.example/dashboard", "annotations": {"grafana_folder": "leanserve"}},
    }


def test_the_api_server_accepts_every_object_rendered_with_every_override(kube, namespace, helm, tmp_path):
    """Server-side dry run: the objects are valid Kubernetes (field names, types, references by name)."""
    from kubernetes import utils

    values = every_override()
    values["operator"]["watchNamespaces"] = [namespace]
    docs = render(helm, tmp_path, values, "--namespace", namespace)
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Pod", "Service", "RoleBinding"}
    for doc in docs:
        utils.create_from_dict(kube, doc, namespace=namespace, dry_run="All")  # raises with the API's reason


# Prices ----------------------------------------------------------------------------------------------


def test_a_users_price_table_reaches_the_operator_as_the_file_it_reads(helm, tmp_path):
    docs = render(helm, tmp_path, {"prices": custom_table()})
    configmap = prices_configmap(docs)
    table = PriceTable.model_validate(yaml.safe_load(configmap["data"]["prices.yaml"]))
    assert table == PriceTable.model_validate(custom_table())
    assert table.get("m5.large").on_demand_usd_per_hour == 0.0749  # the discounted rate, not the shipped 0.096
    assert table.get("c8g.xlarge").spot_usd_per_hour == 0.045 and table.get("m5.xlarge") is None
    pod = operator_pod(docs)
    path = Path(env_of(container(pod))["LEANSERVE_PRICES"])
    (mount,) = [m for m in container(pod)["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert path.name in configmap["data"]  # the mounted ConfigMap holds the file LEANSERVE_PRICES names


def test_a_price_change_rolls_the_operator_and_nothing_else_does(helm, tmp_path):
    def checksum(values: dict[str, Any] | None) -> str:
        return operator_pod(render(helm, tmp_path, values))["metadata"]["annotations"]["checksum/prices"]

    table = custom_table()
    discounted = custom_table()
    discounted["instanceTypes"][0]["onDemandUsdPerHour"] = 0.07
    assert checksum({"prices": table}) != checksum({"prices": discounted}) != checksum(None)
    assert checksum({"prices": table}) == checksum({"prices": table, "operator": {"verbose": True}})


def test_a_date_written_without_quotes_still_parses_as_the_string_the_table_wants(helm, tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("prices:\n  date: 2025-09-15\n")  # YAML would read a date; the table wants a string
    docs = render(helm, tmp_path, None, "-f", str(path))
    assert PriceTable.model_validate(yaml.safe_load(prices_configmap(docs)["data"]["prices.yaml"])).date == "2025-09-15"


def broken_table(change: str) -> dict[str, Any]:
    table = custom_table()
    row = table["instanceTypes"][0]
    match change:
        case "negative price":
            row["onDemandUsdPerHour"] = -0.05
        case "zero price":
            row["onDemandUsdPerHour"] = 0
        case "price as text":
            row["onDemandUsdPerHour"] = "cheap"
        case "no price":
            del row["onDemandUsdPerHour"]
        case "fractional vcpus":
            row["vcpus"] = 2.5
        case "no vcpus":
            row["vcpus"] = 0
        case "unknown field":
            row["discountPercent"] = 30
        case "no name":
            del row["name"]
        case "zero spot price":
            row["spotUsdPerHour"] = 0
        case "no source":
            del table["source"]
        case "instance types not a list":
            table["instanceTypes"] = {"m5.large": row}
    return table


BROKEN = [
    "negative price",
    "zero price",
    "price as text",
    "no price",
    "fractional vcpus",
    "no vcpus",
    "unknown field",
    "no name",
    "zero spot price",
    "no source",
    "instance types not a list",
]


@pytest.mark.parametrize("change", BROKEN)
def test_a_malformed_price_table_fails_helm_template_as_the_operator_would(helm, tmp_path, change):
    table = broken_table(change)
    with pytest.raises(ValidationError):  # the operator would refuse it at start (crash-looping)
        PriceTable.model_validate(table)
    # Helm merges the user's map over the default: a key left out keeps the default's, so null it.
    values = {"prices": {**table, "source": None}} if change == "no source" else {"prices": table}
    assert "/prices" in refusal(helm, tmp_path, values)


def test_an_empty_or_missing_price_table_fails_helm_template(helm, tmp_path):
    assert "instanceTypes" in refusal(helm, tmp_path, {"prices": {**custom_table(), "instanceTypes": []}})
    assert "prices" in refusal(helm, tmp_path, None, "--set", "prices=null")


def test_the_schema_knows_exactly_the_price_tables_fields():
    """A field added to the pydantic models without the schema (or the reverse) fails here."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    for model, fragment in (
        (PriceTable, schema["properties"]["prices"]),
        (InstanceType, schema["definitions"]["instanceType"]),
    ):
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        assert set(fragment["properties"]) == set(fields), model.__name__
        assert set(fragment["required"]) >= {alias for alias, f in fields.items() if f.is_required()}
        assert fragment["additionalProperties"] is False


# Typos -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "misspelt"),
    [
        ("operatr.verbose=true", "'operatr'"),
        ("imagePullSecret[0].name=regcred", "'imagePullSecret'"),
        ("nameOveride=x", "'nameOveride'"),
        ("operator.podLabel.team=a", "'podLabel'"),
        ("operator.extraArg[0]=--verbose", "'extraArg'"),
        ("prices.instanceType=x", "'instanceType'"),
    ],
)
def test_a_mistyped_value_fails_helm_template(helm, tmp_path, typo, misspelt):
    stderr = refusal(helm, tmp_path, None, "--set", typo)
    assert "additional properties" in stderr and misspelt in stderr, stderr


def test_every_value_is_documented_in_values_yaml():
    """Each key has a comment right above it, or one above its run of siblings that names it
    (nodeSelector, affinity, tolerations), or sits inside a documented parent (image.tag)."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def is_comment(line: str) -> bool:
        return line.lstrip().startswith("#")

    def comment_ending_at(j: int) -> str:
        start = j
        while start > 0 and is_comment(lines[start - 1]):
            start -= 1
        return " ".join(lines[start : j + 1]).replace(",", " ")

    documented: dict[int, bool] = {}
    for i, line in enumerate(lines):
        if not line.strip() or is_comment(line) or line.lstrip().startswith("-"):
            continue
        key = line.strip().split(":")[0]
        documented[i] = False
        for j in range(i - 1, -1, -1):
            above = lines[j]
            if not above.strip() or above.lstrip().startswith("-"):
                break
            if is_comment(above):
                documented[i] = j == i - 1 or f" {key} " in f"{comment_ending_at(j)} "
                break
            if indent(above) < indent(line):  # the parent
                documented[i] = documented[j]
                break
    assert [lines[i].strip() for i, ok in documented.items() if not ok] == []


def test_the_schema_has_a_documented_default_for_each_value():
    """Every property the schema allows is in values.yaml (and so documented there), and the reverse."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def compare(fragment: dict[str, Any], default: dict[str, Any], where: str) -> None:
        if fragment.get("additionalProperties") is not False:
            return  # free-form (labels, resources, security contexts): Kubernetes' own types
        assert set(fragment["properties"]) == set(default), where
        for key, sub in fragment["properties"].items():
            if isinstance(default[key], dict) and "properties" in sub:
                compare(sub, default[key], f"{where}.{key}")

    compare(schema, values, "values")


# Monitoring: the PodMonitor, the ServiceMonitor and the plain scrape config ------------------------------
#
# The serving pods are the operator's (leanserve.controller.builders), not the chart's: the tests take their
# labels, annotations and ports from the builders, so a change there that the monitoring misses fails here.

#: The labels every scraped series must carry, and where each comes from (Kubernetes discovery's names).
SERIES_LABELS = {
    "namespace": "__meta_kubernetes_namespace",
    "pod": "__meta_kubernetes_pod_name",
    "inferencedeployment": "__meta_kubernetes_pod_label_leanserve_dev_inferencedeployment",
}


def serving_objects() -> dict[str, dict[str, Any]]:
    """What the operator creates for one InferenceDeployment (team-a/fraud, exact cache on): the serving
    Deployment and Service, the managed Redis's Deployment and Service, a profiling Job."""
    from leanserve.controller.builders import BuildSettings, render_deployment, render_profiling_job, render_redis
    from leanserve.controller.builders import render_service as render_serving_service
    from tests import test_builders as example

    settings = BuildSettings()
    redis_deployment, redis_service = render_redis(example.OWNER, example.spec(), settings)
    return {
        "serving": render_deployment(example.OWNER, example.spec(), example.plan(), example.CPU, settings),
        "service": render_serving_service(example.OWNER),
        "redis": redis_deployment,
        "redis-service": redis_service,
        "profiling": render_profiling_job(example.OWNER, example.spec(), example.CPU, settings, "k"),
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector["matchLabels"].items() <= labels.items() and not selector.keys() - {"matchLabels"}


def snake_case_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A Prometheus Operator RelabelConfig in Prometheus's spelling (sourceLabels -> source_labels)."""
    return {"".join("_" + ch.lower() if ch.isupper() else ch for ch in key): value for key, value in rule.items()}


def label_rules(rules: list[dict[str, Any]]) -> dict[str, list[str]]:
    """target label -> source labels of the rules that set a label by copying (the default action, replace)."""
    return {r["target_label"]: r["source_labels"] for r in rules if r.get("action", "replace") == "replace"}


def scrape_job(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> dict[str, Any]:
    values = {"prometheusScrapeConfig": {"enabled": True}, **(values or {})}
    configmap = named(render(helm, tmp_path, values), "ConfigMap", "leanserve-scrape-config")
    assert configmap["metadata"]["namespace"] == NAMESPACE
    (job,) = yaml.safe_load(configmap["data"]["scrape-configs.yaml"])["scrape_configs"]
    return job


def test_monitoring_objects_are_off_by_default_and_the_dashboard_is_on(helm, tmp_path):
    docs = render(helm, tmp_path)
    assert not {"PodMonitor", "ServiceMonitor"} & {d["kind"] for d in docs}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"] == [
        "leanserve-dashboards",
        "leanserve-prices",
    ]


def test_the_pod_monitor_scrapes_the_sidecar_of_each_serving_pod_with_the_observers_labels(helm, tmp_path):
    monitor = one(render(helm, tmp_path, {"podMonitor": {"enabled": True}}), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == "leanserve-serving" and monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}  # the operator creates serving pods in any namespace
    objects = serving_objects()
    pod = objects["serving"]["spec"]["template"]
    assert selects(spec["selector"], pod["metadata"]["labels"])
    for other in ("redis", "profiling"):
        assert not selects(spec["selector"], objects[other]["spec"]["template"]["metadata"]["labels"]), other
    (endpoint,) = spec["podMetricsEndpoints"]
    # the named port is the sidecar's, the one the pod's prometheus.io annotations name
    annotations = pod["metadata"]["annotations"]
    ports = {p["name"]: (c["name"], p["containerPort"]) for c in pod["spec"]["containers"] for p in c["ports"]}
    assert ports[endpoint["port"]] == ("sidecar", int(annotations["prometheus.io/port"]))
    assert endpoint["path"] == annotations["prometheus.io/path"] == "/metrics"
    assert endpoint["interval"] == "30s"
    assert label_rules([snake_case_rule(r) for r in endpoint["relabelings"]]) == {
        label: [source] for label, source in SERIES_LABELS.items()
    }


def test_the_service_monitor_scrapes_the_same_sidecars_through_each_deployments_service(helm, tmp_path):
    monitor = one(render(helm, tmp_path, {"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    objects = serving_objects()
    assert selects(spec["selector"], objects["service"]["metadata"]["labels"])
    assert not selects(spec["selector"], objects["redis-service"]["metadata"]["labels"])
    (endpoint,) = spec["endpoints"]
    (port,) = [p for p in objects["service"]["spec"]["ports"] if p["name"] == endpoint["port"]]
    pod = objects["serving"]["spec"]["template"]
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "sidecar"]
    assert port["targetPort"] in {p["name"] for p in sidecar["ports"]}  # the Service's port leads to the sidecar
    assert endpoint["path"] == "/metrics"
    assert label_rules([snake_case_rule(r) for r in endpoint["relabelings"]]) == {
        label: [source] for label, source in SERIES_LABELS.items()
    }


def test_monitor_values_reach_the_monitors(helm, tmp_path):
    mine = {"interval": "15s", "labels": {"release": "kube-prometheus-stack"}}
    narrow = {"namespaceSelector": {"matchNames": ["team-a", "team-b"]}}
    pod_monitor = one(render(helm, tmp_path, {"podMonitor": {"enabled": True, **mine, **narrow}}), "PodMonitor")
    service_monitor = one(render(helm, tmp_path, {"serviceMonitor": {"enabled": True, **mine}}), "ServiceMonitor")
    for monitor, endpoints in ((pod_monitor, "podMetricsEndpoints"), (service_monitor, "endpoints")):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert monitor["spec"][endpoints][0]["interval"] == "15s"
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert service_monitor["spec"]["namespaceSelector"] == {"any": True}
    unset = one(render(helm, tmp_path, {"podMonitor": {"enabled": True, "interval": ""}}), "PodMonitor")
    assert "interval" not in unset["spec"]["podMetricsEndpoints"][0]  # the Prometheus's own


def test_a_pod_monitor_and_a_service_monitor_together_are_refused(helm, tmp_path):
    both = {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}
    assert "choose one" in refusal(helm, tmp_path, both)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("podMonitor.interval=30 s", "does not match pattern"),
        ("serviceMonitor.interval=half a minute", "does not match pattern"),
        ("podMonitor.namespaceSelector.matchName[0]=team-a", "'matchName'"),
        ("podMonitor.namespaceSelector.matchNames[0]=Team_A", "does not match pattern"),
        ("serviceMonitor.labels.app\\.kubernetes\\.io/instance=x", "app.kubernetes.io/instance"),
        ("podMonitor.enable=true", "'enable'"),
        ("prometheusScrapeConfig.jobName=", "minLength"),
        ("dashboards.label=helm.sh/chart", "'not' failed"),
        ("dashboards.label=not a label", "does not match pattern"),
        ("dashboards.labelValue=not a value", "does not match pattern"),
        ("dashboard.enabled=false", "'dashboard'"),
    ],
)
def test_malformed_monitoring_values_fail_helm_template(helm, tmp_path, value, complaint):
    stderr = refusal(helm, tmp_path, None, "--set", value)
    assert complaint in stderr, stderr


def test_the_scrape_config_keeps_the_serving_pods_and_labels_their_series_as_the_monitors_do(helm, tmp_path):
    job = scrape_job(helm, tmp_path)
    assert job["job_name"] == "leanserve-serving" and job["scrape_interval"] == "30s"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    rules = job["relabel_configs"]
    keeps = {r["source_labels"][0]: r["regex"] for r in rules if r.get("action") == "keep"}
    assert keeps == {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_label_app_kubernetes_io_managed_by": "leanserve",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": "serving",
    }
    # the same three labels, from the same sources, as the PodMonitor's relabelings
    monitor = one(render(helm, tmp_path, {"podMonitor": {"enabled": True}}), "PodMonitor")
    from_monitor = [snake_case_rule(r) for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]]
    assert rules[-3:] == from_monitor
    assert label_rules(rules) == {
        "__metrics_path__": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
        **{label: [source] for label, source in SERIES_LABELS.items()},
    }


def test_the_scrape_configs_job_name_and_interval_are_values(helm, tmp_path):
    job = scrape_job(helm, tmp_path, {"prometheusScrapeConfig": {"enabled": True, "jobName": "ml", "interval": ""}})
    assert job["job_name"] == "ml" and "scrape_interval" not in job


# promtool (Debian package prometheus) checks what Prometheus itself would say.


def promtool() -> str:
    """The promtool binary; the test fails, saying how to install it, when it is missing."""
    import shutil

    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not installed: apt-get install -y --no-install-recommends prometheus, then "
            "systemctl disable --now prometheus || true (only its promtool is needed)",
            pytrace=False,
        )
    return exe


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def sanitized(name: str) -> str:
    """A Kubernetes label or annotation name as Prometheus's discovery spells it in a label name."""
    import re

    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_role_targets(template: dict[str, Any], namespace: str, name: str, phase: str, ip: str) -> list[dict[str, Any]]:
    """The targets Prometheus's Kubernetes discovery (role: pod) makes of one pod: one per container port and
    one per container without a port (init containers too), each with the pod's __meta_kubernetes_* labels,
    as static target groups (Debian's Prometheus is built without Kubernetes discovery)."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ready": "true" if phase == "Running" else "false",
    }
    for kind in ("label", "annotation"):
        for key, value in template["metadata"].get(f"{kind}s", {}).items():
            meta[f"__meta_kubernetes_pod_{kind}_{sanitized(key)}"] = value
            meta[f"__meta_kubernetes_pod_{kind}present_{sanitized(key)}"] = "true"
    spec = template["spec"]
    containers = [(c, "true") for c in spec.get("initContainers", [])] + [(c, "false") for c in spec["containers"]]
    groups = []
    for c, init in containers:
        labels = {
            **meta,
            "__meta_kubernetes_pod_container_name": c["name"],
            "__meta_kubernetes_pod_container_init": init,
        }
        for port in c.get("ports", []):
            number = str(port["containerPort"])
            groups.append(
                {
                    "targets": [f"{ip}:{number}"],
                    "labels": {
                        **labels,
                        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": number,
                        "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                    },
                }
            )
        if not c.get("ports"):
            groups.append({"targets": [ip], "labels": labels})
    return groups


def test_promtool_accepts_the_scrape_config_and_its_relabelling_keeps_one_target_per_serving_pod(helm, tmp_path):
    """The job, with its Kubernetes discovery replaced by the targets that discovery makes of the pods the
    operator creates, through promtool: `check config`, then `check service-discovery`, which runs the
    relabelling as Prometheus does. The Debian build of promtool knows no kubernetes_sd_configs (Debian
    leaves Kubernetes discovery out); a promtool that does also checks the job unchanged."""
    job = scrape_job(helm, tmp_path)
    objects = serving_objects()
    pods = {
        "fraud-5d8c7-running": (objects["serving"], "team-a", "Running", "10.1.0.5"),
        "fraud-5d8c7-finished": (objects["serving"], "team-a", "Succeeded", "10.1.0.6"),
        "fraud-redis-6c9f4-x": (objects["redis"], "team-a", "Running", "10.1.0.7"),
        "fraud-profile-m5-x": (objects["profiling"], "team-a", "Running", "10.1.0.8"),
    }
    groups = [
        group
        for name, (owner, namespace, phase, ip) in pods.items()
        for group in pod_role_targets(owner["spec"]["template"], namespace, name, phase, ip)
    ]
    static_job = {k: v for k, v in job.items() if k != "kubernetes_sd_configs"} | {"static_configs": groups}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1m"}, "scrape_configs": [static_job]}))
    checked = run_promtool("check", "config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    discovered = run_promtool("check", "service-discovery", str(config), job["job_name"], cwd=tmp_path)
    assert discovered.returncode == 0, discovered.stdout + discovered.stderr
    kept = [t["labels"] for t in json.loads(discovered.stdout) if t["labels"]]
    assert kept == [
        {
            "__address__": "10.1.0.5:8080",
            "__metrics_path__": "/metrics",
            "__scheme__": "http",
            "__scrape_interval__": "30s",
            "__scrape_timeout__": "10s",
            "instance": "10.1.0.5:8080",
            "job": "leanserve-serving",
            "namespace": "team-a",
            "pod": "fraud-5d8c7-running",
            "inferencedeployment": "fraud",
        }
    ]
    assert len(groups) > len(kept)  # the model server's port, the init container, the finished pod, Redis, the Job

    unchanged = tmp_path / "unchanged.yml"
    unchanged.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    as_is = run_promtool("check", "config", str(unchanged), cwd=tmp_path)
    if "field kubernetes_sd_configs not found" in as_is.stdout + as_is.stderr:
        import warnings

        warnings.warn(
            f"{promtool()} is built without Kubernetes discovery (Debian's is): the job was checked with "
            "static targets in place of its kubernetes_sd_configs [{role: pod}]",
            stacklevel=1,
        )
    else:
        assert as_is.returncode == 0, as_is.stdout + as_is.stderr


# The Grafana dashboard ------------------------------------------------------------------------------------

DASHBOARD = CHART / "dashboards" / "leanserve.json"
#: What each panel must query (the metric names, `up` for replicas).
PANEL_METRICS = {
    "Request rate": {"leanserve_requests_total"},
    "p95 latency against the SLA": {"leanserve_request_duration_seconds_bucket"},
    "Cache hit rate": {"leanserve_cache_hits_total", "leanserve_cache_misses_total"},
    "Average batch size": {"leanserve_batch_size_sum", "leanserve_batch_size_count"},
    "Replicas": {"up"},
    "Cost per 1M requests: observed against predicted": {"up", "leanserve_requests_total"},
}
#: Figures that are not in Prometheus (the InferenceDeployment's spec and status): dashboard variables, drawn
#: as reference lines.
REFERENCE_LINES = {"vector($sla_ms)", "vector($predicted_cost_per_million)"}
DEPLOYMENT_MATCHERS = ('namespace="$namespace"', 'inferencedeployment="$inferencedeployment"')


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def substituted(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` and ``${name}`` replaced, longest names first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, expr
    return expr


def test_the_dashboard_configmap_carries_the_grafana_sidecars_label_and_the_dashboard(helm, tmp_path):
    configmap = named(render(helm, tmp_path), "ConfigMap", "leanserve-dashboards")
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in configmap["metadata"]
    assert json.loads(configmap["data"]["leanserve.json"]) == dashboard()
    values = {
        "dashboards": {
            "label": "example.com/dashboard",
            "labelValue": "leanserve",
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "leanserve"},
        }
    }
    moved = named(render(helm, tmp_path, values), "ConfigMap", "leanserve-dashboards")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["labels"]["example.com/dashboard"] == "leanserve"
    assert "grafana_dashboard" not in moved["metadata"]["labels"]
    assert moved["metadata"]["annotations"] == {"grafana_folder": "leanserve"}
    off = render(helm, tmp_path, {"dashboards": {"enabled": False}})
    assert [d["metadata"]["name"] for d in off if d["kind"] == "ConfigMap"] == ["leanserve-prices"]


def test_the_dashboard_is_grafana_json_with_a_prometheus_datasource_variable_and_placed_panels():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    found = variables(board)
    assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus"
    for name in ("namespace", "inferencedeployment"):
        assert found[name]["type"] == "query" and found[name]["datasource"]["uid"] == "${datasource}"
        assert found[name]["multi"] is False and found[name]["includeAll"] is False  # one deployment's costs
    assert 'namespace="$namespace"' in found["inferencedeployment"]["definition"]
    for name in ("sla_ms", "price_per_hour", "predicted_cost_per_million"):
        assert found[name]["type"] == "textbox" and float(found[name]["query"]) >= 0, name
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()


def test_each_panel_queries_its_metrics_of_the_selected_deployment_only():
    import re

    board = dashboard()
    assert {p["title"] for p in board["panels"]} == PANEL_METRICS.keys()
    defined = set(variables(board))
    for title, expr in exprs(board):
        assert set(re.findall(r"\$\{?(\w+)", expr)) <= defined, (title, expr)
        if expr in REFERENCE_LINES:
            continue
        selectors = re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr)
        assert selectors, (title, expr)
        for metric, matchers in selectors:
            assert metric in PANEL_METRICS[title], (title, metric)
            assert all(m in matchers for m in DEPLOYMENT_MATCHERS), (title, expr)
    for title, metrics in PANEL_METRICS.items():
        queried = " ".join(expr for panel, expr in exprs(board) if panel == title)
        assert all(f"{metric}{{" in queried for metric in metrics), (title, metrics)
    assert {expr for _, expr in exprs(board)} >= REFERENCE_LINES


#: The dashboard's variables as a user sets them, for promtool.
CHOSEN = {
    "datasource": "prometheus",
    "namespace": "team-a",
    "inferencedeployment": "fraud",
    "sla_ms": "100",
    "price_per_hour": "0.384",
    "predicted_cost_per_million": "18.5",
}


def recording_rules(board: dict[str, Any], chosen: dict[str, str]) -> dict[str, Any]:
    """Each query of the dashboard as a recording rule (dashboard:PANEL:REFID), the variables substituted."""
    import re

    rules = []
    for panel in board["panels"]:
        slug = re.sub(r"[^a-z0-9]+", "_", panel["title"].lower()).strip("_")
        for target in panel["targets"]:
            expr = substituted(target["expr"], chosen)
            rules.append({"record": f"dashboard:{slug}:{target['refId'].lower()}", "expr": expr})
    return {"groups": [{"name": "leanserve-dashboard", "rules": rules}]}


def test_promtool_parses_every_dashboard_query(tmp_path):
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(recording_rules(dashboard(), CHOSEN)))
    checked = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(exprs(dashboard()))} rules found" in checked.stdout


def series(name: str, values: str, pod: str, deployment: str = "fraud", namespace: str = "team-a", **labels: str):
    matchers = {"namespace": namespace, "inferencedeployment": deployment, "pod": pod, **labels}
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in matchers.items()) + "}", "values": values}


def test_promtool_evaluates_the_dashboards_figures_on_known_series(tmp_path):
    """`promtool test rules`: the panels' queries on ten minutes of synthetic series (one sample a minute)
    give the figures worked out by hand, and the series of another deployment, or of the same name in
    another namespace, change nothing."""
    inputs = [
        # two replicas up, a third pod down; 5 + 4 answered and 1 throttled request per second
        series("up", "1x10", "p1"),
        series("up", "1x10", "p2"),
        series("up", "0x10", "p3"),
        series("leanserve_requests_total", "0+300x10", "p1", code="200", model="fraud"),
        series("leanserve_requests_total", "0+240x10", "p2", code="200", model="fraud"),
        series("leanserve_requests_total", "0+60x10", "p2", code="429", model="fraud"),
        # latency: 9 of 10 requests a second under 50 ms, all under 100 ms: p95 at 75 ms (interpolated)
        series("leanserve_request_duration_seconds_bucket", "0+540x10", "p1", le="0.05", model="fraud"),
        series("leanserve_request_duration_seconds_bucket", "0+600x10", "p1", le="0.1", model="fraud"),
        series("leanserve_request_duration_seconds_bucket", "0+600x10", "p1", le="+Inf", model="fraud"),
        # exact cache 2 hits 8 misses a second; the 8 misses ask the semantic cache: 2 hits, 6 misses
        series("leanserve_cache_hits_total", "0+120x10", "p1", kind="exact"),
        series("leanserve_cache_misses_total", "0+480x10", "p1", kind="exact"),
        series("leanserve_cache_hits_total", "0+120x10", "p1", kind="semantic"),
        series("leanserve_cache_misses_total", "0+360x10", "p1", kind="semantic"),
        # 20 rows in 2.5 batches a second
        series("leanserve_batch_size_sum", "0+1200x10", "p1", model="fraud"),
        series("leanserve_batch_size_count", "0+150x10", "p1", model="fraud"),
        # a semantic cache alone (deployment "semantic"): 1 hit, 4 misses a second
        series("leanserve_cache_hits_total", "0+60x10", "q1", "semantic", kind="semantic"),
        series("leanserve_cache_misses_total", "0+240x10", "q1", "semantic", kind="semantic"),
        # another deployment, and one of the same name in another namespace: not counted
        series("up", "1x10", "o1", "other"),
        series("leanserve_requests_total", "0+6000x10", "o1", "other", code="200", model="other"),
        series("up", "1x10", "b1", namespace="team-b"),
        series("leanserve_requests_total", "0+6000x10", "b1", namespace="team-b", code="200", model="fraud"),
        series("leanserve_cache_hits_total", "0+6000x10", "b1", namespace="team-b", kind="exact"),
        series("leanserve_batch_size_count", "0+6000x10", "b1", namespace="team-b", model="fraud"),
    ]
    price = float(CHOSEN["price_per_hour"])
    expected = {  # record -> (value, by hand)
        "dashboard:request_rate:a": 10.0,
        "dashboard:p95_latency_against_the_sla:a": 75.0,
        "dashboard:p95_latency_against_the_sla:b": 100.0,
        "dashboard:cache_hit_rate:a": (2 + 2) / (2 + 8),  # hits of both caches over the requests that asked one
        "dashboard:average_batch_size:a": 20 / 2.5,
        "dashboard:replicas:a": 2.0,
        "dashboard:cost_per_1m_requests_observed_against_predicted:a": 2 * price / (10 * 3600) * 1e6,
        "dashboard:cost_per_1m_requests_observed_against_predicted:b": 18.5,
    }
    semantic_only = recording_rules(dashboard(), CHOSEN | {"inferencedeployment": "semantic"})["groups"][0]
    semantic_only = {
        "name": "semantic-only",
        "rules": [r for r in semantic_only["rules"] if "cache_hit" in r["record"]],
    }
    semantic_only["rules"][0]["record"] = "semantic_only:cache_hit_rate"
    expected["semantic_only:cache_hit_rate"] = 1 / (1 + 4)
    rules = recording_rules(dashboard(), CHOSEN)
    rules["groups"].append(semantic_only)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [
                    # promtool compares floats exactly: compare within 1e-9 here, and expect 1
                    {
                        "expr": f"abs({record} - {value!r}) < bool 1e-9",
                        "eval_time": "10m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                    for record, value in expected.items()
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = run_promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_prints_the_scrape_job_the_chart_renders(helm, tmp_path):
    readme = (REPO / "README.md").read_text()
    start = readme.index("```yaml\n# scrape-configs.yaml")
    block = readme[start + len("```yaml\n") : readme.index("```", start + 3)]
    assert yaml.safe_load(block)["scrape_configs"] == [scrape_job(helm, tmp_path)]


def test_the_observers_prometheus_reaches_the_operator_and_is_checked(helm, tmp_path):
    unset = env_of(container(operator_pod(render(helm, tmp_path))))
    assert "LEANSERVE_PROMETHEUS_URL" not in unset  # nothing observed: the operator says Observed=False
    url = "http://prometheus-server.monitoring.svc:9090"
    c = container(operator_pod(render(helm, tmp_path, {"observer": {"prometheusUrl": url}})))
    assert env_of(c)["LEANSERVE_PROMETHEUS_URL"] == url
    assert "observer/prometheusUrl" in refusal(helm, tmp_path, {"observer": {"prometheusUrl": "ftp://prometheus"}})
