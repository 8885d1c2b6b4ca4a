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
    prices = one(docs, "ConfigMap")
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
    docs = render(helm, tmp_path, {"fullnameOverride": "x" * 70})
    for kind in ("Deployment", "Service", "ClusterRole", "ConfigMap"):
        name = one(docs, kind)["metadata"]["name"]
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
    configmap = one(docs, "ConfigMap")
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
    assert PriceTable.model_validate(yaml.safe_load(one(docs, "ConfigMap")["data"]["prices.yaml"])).date == "2025-09-15"


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
