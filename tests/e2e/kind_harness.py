"""The end-to-end tests' view of the kind cluster: kubectl, port-forwards, in-cluster clients.

Everything goes through the real cluster: ``kubectl`` with the cluster's kubeconfig, Services
reached from pods (cluster DNS, kube-proxy, the CNI) and from this process through
``kubectl port-forward``. Nothing here plays a component.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
KIND_SCRIPT = REPO / "hack" / "kind" / "kind.py"
T = TypeVar("T")

sys.path.insert(0, str(REPO / "hack" / "kind"))
import kind as kind_script  # noqa: E402  (hack/kind is not a package)


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {str(last)[:2000]})")


@dataclass
class Cluster:
    """A kind cluster: its kubeconfig, the kubectl and helm built for it, its node runtime."""

    kubeconfig: Path
    kubectl_bin: Path
    helm_bin: Path
    provider: str  # docker or podman: how to exec into a node

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
        cmd = [str(self.kubectl_bin), "--kubeconfig", str(self.kubeconfig), *args]
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()[-3000:]}")
        return out.stdout

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, **selectors: str) -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        if selectors.get("selector"):
            args += ["-l", selectors["selector"]]
        return json.loads(self.kubectl(*args))

    def get_or_none(self, kind: str, name: str, namespace: str) -> Any:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(out) if out.strip() else None

    def apply(self, doc: dict[str, Any] | list[dict[str, Any]]) -> str:
        docs = doc if isinstance(doc, list) else [doc]
        return self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=e2e",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )

    def helm(self, *args: str, timeout: float = 300) -> str:
        cmd = [str(self.helm_bin), "--kubeconfig", str(self.kubeconfig), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {out.stdout[-2000:]}{out.stderr[-3000:]}")
        return out.stdout

    def node_exec(self, node: str, *args: str) -> str:
        """Run a command on a kind node (a container of the provider's)."""
        out = subprocess.run([self.provider, "exec", node, *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"{self.provider} exec {node} {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def logs(self, pod: str, namespace: str, container: str | None = None, previous: bool = False) -> str:
        args = ["logs", pod, "-n", namespace, "--tail", "200"]
        if container:
            args += ["-c", container]
        if previous:
            args.append("--previous")
        return self.kubectl(*args, check=False)

    @contextmanager
    def port_forward(self, target: str, namespace: str, remote_port: int) -> Iterator[str]:
        """``kubectl port-forward`` to a pod or Service; yields the local base URL."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            local = sock.getsockname()[1]
        cmd = [
            str(self.kubectl_bin),
            "--kubeconfig",
            str(self.kubeconfig),
            "-n",
            namespace,
            "port-forward",
            "--address",
            "127.0.0.1",
            target,
            f"{local}:{remote_port}",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "Forwarding from" not in line:
                raise AssertionError(f"port-forward to {target} did not start: {line}{proc.stdout.read()[-1000:]}")
            yield f"http://127.0.0.1:{local}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def kind_up() -> tuple[Cluster, bool]:
    """Create (or reuse) the cluster with hack/kind/kind.py; True when this call created it."""
    existed = subprocess.run([sys.executable, str(KIND_SCRIPT), "status"], capture_output=True).returncode == 0
    out = subprocess.run([sys.executable, str(KIND_SCRIPT), "up"], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError("hack/kind/kind.py up failed (its output is above)")
    kubeconfig = Path(out.stdout.strip().splitlines()[-1])
    kbin, cbin = kind_script.tool_dir(kind_script.BUILD_BINS), kind_script.tool_dir(kind_script.BUILD_CONTROLPLANE)
    timings = json.loads((REPO / ".cache/kind/timings.json").read_text())
    provider = timings["provider"]
    if shutil.which(provider) is None:
        raise RuntimeError(f"{provider} is not on PATH")
    return Cluster(kubeconfig, kbin / "kubectl", cbin / "helm", provider), not existed


def kind_down() -> None:
    subprocess.run([sys.executable, str(KIND_SCRIPT), "down"], check=False)


def keep_cluster() -> bool:
    """LEANSERVE_E2E_KEEP=1 leaves the cluster up after the tests (to look around)."""
    return os.environ.get("LEANSERVE_E2E_KEEP", "") not in ("", "0")
