"""Profiling Jobs on the candidate node pools, with GPU-to-CPU fallback (real control plane, kwok nodes).

kwok pods run no container, so these tests play the bench container's part:
``run_bench_job_standing_in_for_the_container`` takes the command the operator
wrote into the Job's pod, runs it on this machine (the real
``leanserve_serving.bench_job``, which fetches the model and benches it; the only
changes are shorter timings and where the termination message goes), and writes
what it produced into the pod's terminated state, as a kubelet would.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from leanserve.api.resource import GROUP, PLURAL, VERSION
from leanserve.api.spec import ModelSpec
from leanserve.controller import profile_store
from leanserve.controller.builders import OWNER_LABEL
from leanserve_serving.reference_models import ReferenceModel, make_tabular
from tests.conftest import REPO, controlplane
from tests.stand_in_profiles import measured_here, stand_in
from tests.test_cluster_api import wait_for
from tests.test_operator import condition, create, custom, owned, read, wait_phase

pytestmark = pytest.mark.cluster

CPU_TYPES = ["c6i.2xlarge", "m5.2xlarge"]
GPU_TYPE = "g4dn.xlarge"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    return make_tabular(tmp_path_factory.mktemp("profiling-model"))


def doc(name: str, model: ReferenceModel, candidates: list[str], **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"file://{model.model}", "evaluation": {"uri": f"file://{model.evaluation}"}},
        "sla": {"latency": {"targetMs": 100}},
        "traffic": {"averageRps": 300},
        "candidates": candidates,
        "profiling": {"unschedulableTimeoutSeconds": 10, "retries": 1},
    }
    spec.update(changes)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceDeployment", "metadata": {"name": name}, "spec": spec}


def jobs(kube: Any, ns: str, name: str) -> list[Any]:
    selector = f"{OWNER_LABEL}={name},app.kubernetes.io/component=profiling"
    return client.BatchV1Api(kube).list_namespaced_job(ns, label_selector=selector).items


def running_pod(kube: Any, ns: str, job: str) -> Any:
    def check() -> Any:
        pods = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector=f"job-name={job}").items
        return next((p for p in pods if p.status.phase == "Running"), None)

    return wait_for(f"a Running pod of {job}", check, timeout=60)


def write_terminated(kube: Any, ns: str, pod: Any, exit_code: int, message: str) -> None:
    """What the kubelet would write when the bench container exits."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    container = pod.spec.containers[0]
    status = {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }
    client.CoreV1Api(kube).patch_namespaced_pod_status(pod.metadata.name, ns, status)


def run_bench_job_standing_in_for_the_container(kube: Any, ns: str, job: str, tmp: Path) -> str:
    """Run the pod's own command here (faster timings), then report its result as the kubelet would."""
    pod = running_pod(kube, ns, job)
    command = list(pod.spec.containers[0].command)
    assert command[:3] == ["python", "-m", "leanserve_serving.bench_job"]
    log = tmp / f"{job}.termination-log"
    faster = ["--seconds-per-point", "0.02", "--max-batch", "64", "--termination-log", str(log)]
    proc = subprocess.run(
        [sys.executable, *command[1:], *faster], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    message = log.read_text()
    write_terminated(kube, ns, pod, proc.returncode, message)
    return message


def fail_bench_standing_in_for_the_container(kube: Any, ns: str, job: str) -> None:
    pod = running_pod(kube, ns, job)
    write_terminated(kube, ns, pod, 1, "bench failed: the model cannot run on the evaluation data: bad shape")


def test_every_candidate_is_profiled_then_planned_and_deployed(kube, operator, namespace, model, tmp_path):
    create(kube, namespace, doc("full", model, CPU_TYPES))
    obj = wait_phase(kube, namespace, "full", "Profiling")
    assert condition(obj, "Planned")["reason"] == "Profiling"
    names = sorted(
        j.metadata.name
        for j in wait_for("two Jobs", lambda: len(jobs(kube, namespace, "full")) == 2 and jobs(kube, namespace, "full"))
    )
    assert names == ["full-bench-c6i-2xlarge", "full-bench-m5-2xlarge"]
    job = client.BatchV1Api(kube).read_namespaced_job("full-bench-m5-2xlarge", namespace)
    pod_spec = job.spec.template.spec
    assert pod_spec.node_selector == {"node.kubernetes.io/instance-type": "m5.2xlarge"}
    assert job.spec.ttl_seconds_after_finished > 0 and job.metadata.owner_references[0].name == "full"
    # The CPU it measures with: a whole-node replica's pod there, m5.2xlarge's allocatable CPU (GKE's reserve).
    assert pod_spec.containers[0].resources.limits["cpu"] == "7810m"
    for name in names:
        assert run_bench_job_standing_in_for_the_container(kube, namespace, name, tmp_path).startswith("{")
    obj = wait_phase(kube, namespace, "full", "Ready", timeout=90)
    assert {r["instanceType"]: r["state"] for r in obj["status"]["profiling"]} == {t: "Done" for t in CPU_TYPES}
    assert obj["status"]["plan"]["instanceType"] in CPU_TYPES
    assert "Deployment/full" in owned(kube, namespace, "full")
    cached = client.CoreV1Api(kube).list_namespaced_config_map(namespace, label_selector="leanserve.dev/profile=true")
    assert len(cached.items) == 2


def test_traffic_change_reuses_the_profiles(kube, operator, namespace, model, tmp_path):
    create(kube, namespace, doc("reuse", model, ["c6i.2xlarge"]))
    wait_for("a Job", lambda: jobs(kube, namespace, "reuse"))
    run_bench_job_standing_in_for_the_container(kube, namespace, "reuse-bench-c6i-2xlarge", tmp_path)
    wait_phase(kube, namespace, "reuse", "Ready", timeout=90)
    # uid and generation: the Job controller keeps writing its status, a new Job or a spec write of ours would show.
    before = [(j.metadata.uid, j.metadata.generation) for j in jobs(kube, namespace, "reuse")]
    custom(kube).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "reuse",
        {"spec": {"traffic": {"averageRps": 900}, "sla": {"latency": {"targetMs": 80}}}},
    )
    obj = wait_phase(kube, namespace, "reuse", "Ready", generation=2, timeout=60)
    assert [(j.metadata.uid, j.metadata.generation) for j in jobs(kube, namespace, "reuse")] == before
    assert obj["status"]["profiling"] == [{"instanceType": "c6i.2xlarge", "state": "Done", "reason": ""}]


def test_without_a_gpu_pool_the_gpu_candidate_falls_back_with_the_schedulers_reason(
    kube, operator, namespace, model, tmp_path, control_plane
):
    control_plane.remove_pool(controlplane.GPU_POOL)
    try:
        create(kube, namespace, doc("fallback", model, ["c6i.2xlarge", GPU_TYPE]))
        wait_for("two Jobs", lambda: len(jobs(kube, namespace, "fallback")) == 2)
        run_bench_job_standing_in_for_the_container(kube, namespace, "fallback-bench-c6i-2xlarge", tmp_path)
        obj = wait_phase(kube, namespace, "fallback", "Ready", timeout=90)
    finally:
        control_plane.ensure_pools(gpu_pool=True)
    rows = {r["instanceType"]: r for r in obj["status"]["profiling"]}
    assert rows[GPU_TYPE]["state"] == "Unschedulable" and "node" in rows[GPU_TYPE]["reason"]
    assert obj["status"]["plan"]["instanceType"] == "c6i.2xlarge"
    planned = condition(obj, "Planned")
    assert planned["status"] == "True" and f"left out: {GPU_TYPE}: unschedulable" in planned["message"]
    gpu_row = next(c for c in obj["status"]["candidates"] if c["instanceType"] == GPU_TYPE)
    assert gpu_row["reason"].startswith("unschedulable") and not gpu_row["feasible"]


def test_nothing_schedulable_gives_a_clear_condition_and_no_deployment(kube, operator, namespace, model):
    create(kube, namespace, doc("nowhere", model, ["c7i.xlarge"]))  # priced, but no such pool here
    obj = wait_phase(kube, namespace, "nowhere", "Failed", timeout=60)
    planned = condition(obj, "Planned")
    assert planned["reason"] == "NoCandidateAvailable" and "unschedulable" in planned["message"]
    assert owned(kube, namespace, "nowhere") == {}


def test_a_failing_bench_is_retried_then_reported(kube, operator, namespace, model):
    create(kube, namespace, doc("flaky", model, ["m5.2xlarge"]))
    wait_for("a Job", lambda: jobs(kube, namespace, "flaky"))
    fail_bench_standing_in_for_the_container(kube, namespace, "flaky-bench-m5-2xlarge")

    # The Job controller retries (retries: 1) after its backoff: a second pod, failed as well.
    def second_pod() -> Any:
        pods = client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector="job-name=flaky-bench-m5-2xlarge")
        return len(pods.items) >= 2

    wait_for("the retry's pod", second_pod, timeout=60)
    fail_bench_standing_in_for_the_container(kube, namespace, "flaky-bench-m5-2xlarge")
    obj = wait_phase(kube, namespace, "flaky", "Failed", timeout=90)
    (row,) = obj["status"]["profiling"]
    assert row["state"] == "Failed" and "cannot run on the evaluation data" in row["reason"]
    assert "profiling failed after 2 attempt(s)" in condition(obj, "Planned")["message"]


def test_a_bench_that_never_finishes_is_stopped_at_the_deadline_and_its_type_left_out(kube, operator, namespace, model):
    """The real Job controller stops the Job at activeDeadlineSeconds; the plan goes ahead without that type.

    c6i's profile is cached (a stand-in), so only m5's Job runs; kwok runs its pod and nobody ever reports
    a result for it: to the cluster, a bench that hangs.
    """
    body = doc(
        "hung", model, CPU_TYPES, profiling={"unschedulableTimeoutSeconds": 10, "deadlineSeconds": 15, "retries": 1}
    )
    key = profile_store.model_key(ModelSpec.model_validate(body["spec"]["model"]))
    profile_store.save(kube, namespace, key, stand_in(measured_here(), "c6i.2xlarge"))
    create(kube, namespace, body)
    (job,) = wait_for("m5's Job", lambda: jobs(kube, namespace, "hung"))
    assert job.metadata.name == "hung-bench-m5-2xlarge" and job.spec.active_deadline_seconds == 15
    running_pod(kube, namespace, job.metadata.name)
    obj = wait_phase(kube, namespace, "hung", "Ready", timeout=90)
    job = client.BatchV1Api(kube).read_namespaced_job(job.metadata.name, namespace)
    assert any(c.reason == "DeadlineExceeded" and c.status == "True" for c in job.status.conditions or [])
    rows = {r["instanceType"]: r for r in obj["status"]["profiling"]}
    assert rows["c6i.2xlarge"]["state"] == "Cached"
    assert rows["m5.2xlarge"]["state"] == "Failed"
    assert rows["m5.2xlarge"]["reason"].startswith("DeadlineExceeded: the bench did not finish within 15 s")
    assert obj["status"]["plan"]["instanceType"] == "c6i.2xlarge"
    planned = condition(obj, "Planned")
    assert planned["status"] == "True"
    assert "left out: m5.2xlarge: profiling failed: DeadlineExceeded: the bench did not" in planned["message"]
    m5_row = next(c for c in obj["status"]["candidates"] if c["instanceType"] == "m5.2xlarge")
    assert not m5_row["feasible"] and m5_row["reason"].startswith("profiling failed: DeadlineExceeded")


def test_an_operator_restart_mid_profiling_duplicates_nothing_and_still_collects(
    kube, operator, namespace, model, tmp_path
):
    create(kube, namespace, doc("midway", model, CPU_TYPES))
    wait_for("two Jobs", lambda: len(jobs(kube, namespace, "midway")) == 2)
    run_bench_job_standing_in_for_the_container(kube, namespace, "midway-bench-c6i-2xlarge", tmp_path)
    operator.restart()
    before = sorted(j.metadata.uid for j in jobs(kube, namespace, "midway"))
    run_bench_job_standing_in_for_the_container(kube, namespace, "midway-bench-m5-2xlarge", tmp_path)
    obj = wait_phase(kube, namespace, "midway", "Ready", timeout=90)
    assert sorted(j.metadata.uid for j in jobs(kube, namespace, "midway")) == before
    assert {r["state"] for r in obj["status"]["profiling"]} == {"Done"}
    assert copy.deepcopy(read(kube, namespace, "midway"))["status"]["plan"]["instanceType"] in CPU_TYPES
