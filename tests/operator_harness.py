"""Run the real operator (``leanserve operator``, kopf) as the chart's ServiceAccount against the test control plane.

The chart is rendered with the helm binary built with the control plane; its
ServiceAccount and RBAC are applied; a token for that ServiceAccount comes from
the TokenRequest API and goes into a kubeconfig of its own. The operator process
authenticates with that token, so every test that drives it also proves the
chart's permissions suffice (a missing verb fails the reconcile with a 403).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.conftest import REPO

OPERATOR_NAMESPACE = "leanserve-system"
RELEASE = "leanserve"
SERVICE_ACCOUNT = "leanserve"  # the chart's default: the release's full name ("leanserve" contains the chart name)


def render_chart(helm: Path, *extra: str) -> list[dict[str, Any]]:
    """``helm template`` of charts/leanserve, parsed."""
    proc = subprocess.run(
        [str(helm), "template", RELEASE, str(REPO / "charts" / "leanserve"), "--namespace", OPERATOR_NAMESPACE, *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def apply_plain(api: Any, doc: dict[str, Any]) -> None:
    """Server-side apply of a chart object as the test's admin (field manager helm-test)."""
    from leanserve.controller.kube import request

    kind_paths = {
        "ServiceAccount": f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts",
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{doc['metadata'].get('namespace')}/rolebindings",
    }
    path = f"{kind_paths[doc['kind']]}/{doc['metadata']['name']}"
    request(
        api,
        "PATCH",
        path,
        body=doc,
        query={"fieldManager": "helm-test", "force": "true"},
        content_type="application/apply-patch+yaml",
    )


def install_rbac(api: Any, helm: Path) -> list[dict[str, Any]]:
    """The chart's ServiceAccount and RBAC applied (not its Deployment: no images run here). Returns the render."""
    core = client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    docs = render_chart(helm)
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
            apply_plain(api, doc)
    return docs


def service_account_kubeconfig(api: Any, admin_kubeconfig: Path, out: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a TokenRequest token, 1 hour)."""
    token = (
        client.CoreV1Api(api)
        .create_namespaced_service_account_token(
            SERVICE_ACCOUNT, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 3600}}
        )
        .status.token
    )
    config = json.loads(admin_kubeconfig.read_text())
    config["users"] = [{"name": "leanserve-operator", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "leanserve-operator"
    out.write_text(json.dumps(config))
    return out


class OperatorProcess:
    """``leanserve operator`` in a subprocess, logging to a file; restartable."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leanserve", "operator", "--liveness", "off"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.wait_for_log("event=started", timeout=60, since_start=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self, since_start: bool = False) -> str:
        text = self.log.read_text(errors="replace")
        if since_start:
            text = text.rsplit(f"===== start {self.starts} =====", 1)[-1]
        return text

    def wait_for_log(self, needle: str, timeout: float = 30, since_start: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text(since_start):
                return
            if not self.alive():
                raise AssertionError(f"the operator exited ({self.proc.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not in the operator's log after {timeout} s:\n{self.text()[-4000:]}")
