"""A real Kubernetes control plane on loopback, for tests and local runs.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (which
plays the kubelet of simulated nodes) run as local processes built from source
by ``build.sh``. Nothing is mocked: clients talk to a real API server over TLS
with client certificates, and controllers and the scheduler act on what they
see. Pods never run containers; kwok marks them Running.

Usage::

    python hack/controlplane/controlplane.py up [--no-gpu-pool]
    python hack/controlplane/controlplane.py down
    python hack/controlplane/controlplane.py status

The pytest fixture in ``tests/conftest.py`` uses the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_ROOT = REPO / ".cache" / "controlplane" / "run"

#: Labels the operator's nodeSelectors use; a taint keeps non-GPU pods off GPU nodes.
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class NodePool:
    """A pool of simulated nodes of one instance type, with that type's real capacity."""

    instance_type: str
    cpu: str
    memory: str
    gpus: int = 0
    count: int = 2

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0

    def node_names(self) -> list[str]:
        return [f"kwok-{self.instance_type.replace('.', '-')}-{i}" for i in range(self.count)]

    def node_manifests(self) -> list[dict[str, Any]]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        if self.gpus:
            capacity[GPU_RESOURCE] = str(self.gpus)
        return [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        INSTANCE_TYPE_LABEL: self.instance_type,
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "leanserve.dev/pool": "gpu" if self.is_gpu else "cpu",
                        "type": "kwok",
                    },
                },
                "spec": {"taints": [GPU_TAINT]} if self.is_gpu else {},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            for name in self.node_names()
        ]


CPU_POOLS = (NodePool("m5.2xlarge", "8", "32Gi", count=8), NodePool("c6i.2xlarge", "8", "16Gi", count=8))
GPU_POOL = NodePool("g4dn.xlarge", "4", "16Gi", gpus=1, count=4)


def _log(message: str) -> None:
    print(f"[controlplane] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


@dataclass
class ControlPlane:
    """The processes, certificates and kubeconfig of one local control plane.

    Ports are fixed per root folder (overridable) so that a second ``up``
    finds and reuses a running plane instead of starting another.
    """

    root: Path = DEFAULT_ROOT
    etcd_port: int = int(os.environ.get("LEANSERVE_ETCD_PORT", "23790"))
    apiserver_port: int = int(os.environ.get("LEANSERVE_APISERVER_PORT", "16443"))
    timings: dict[str, float] = field(default_factory=dict)
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    # ---- paths -----------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def _pki(self, name: str) -> Path:
        return self.root / "pki" / name

    # ---- lifecycle -------------------------------------------------------------
    def build(self) -> Path:
        """Build (or find cached) binaries; return their folder. Raises with the build's output on failure."""
        start = time.monotonic()
        proc = subprocess.run(["bash", str(HERE / "build.sh")], capture_output=True, text=True, check=False)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"building the control plane failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        self.timings["build_s"] = round(time.monotonic() - start, 1)
        return Path(proc.stdout.strip().splitlines()[-1])

    def healthy(self) -> bool:
        """Whether an API server answers /readyz with our credentials."""
        if not self.kubeconfig.exists():
            return False
        try:
            return self._get("/readyz", timeout=3) == "ok"
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False

    def up(self, gpu_pool: bool = True) -> bool:
        """Start the plane unless one is already healthy; register node pools.

        Returns True when this call started the processes (the caller then owns
        them and should call :meth:`down`), False when it reused a running plane.
        """
        started = False
        if self.healthy():
            _log(f"reusing the running control plane at {self.server}")
        else:
            self.down(quiet=True)
            for port in (self.etcd_port, self.apiserver_port):
                if _listening(port):
                    raise RuntimeError(
                        f"port {port} is taken by another process (another control plane from a different "
                        "checkout? stop it with `make cluster-down` there), or choose other ports with "
                        "LEANSERVE_ETCD_PORT / LEANSERVE_APISERVER_PORT"
                    )
            bin_dir = self.build()
            begin = time.monotonic()
            self._write_pki()
            self._start_etcd(bin_dir)
            self._start_apiserver(bin_dir)
            self._start_controllers(bin_dir)
            self.timings["start_s"] = round(time.monotonic() - begin, 1)
            started = True
        begin = time.monotonic()
        self.ensure_pools(gpu_pool=gpu_pool)
        self.timings["nodes_s"] = round(time.monotonic() - begin, 1)
        _log("timings: " + ", ".join(f"{k}={v}" for k, v in self.timings.items()))
        return started

    def down(self, quiet: bool = False) -> None:
        """Stop every process this root started and remove its state."""
        for pid_file in sorted((self.root / "pids").glob("*.pid")) if (self.root / "pids").exists() else []:
            try:
                pid = int(pid_file.read_text())
                os.killpg(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for pid_file in sorted((self.root / "pids").glob("*.pid")) if (self.root / "pids").exists() else []:
            pid = int(pid_file.read_text() or 0)
            while pid and time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if pid and _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        for child in self._children:  # reap what this process started (no zombies left behind)
            child.wait(timeout=10)
        self._children.clear()
        if self.root.exists():
            shutil.rmtree(self.root)
        if not quiet:
            _log("control plane stopped")

    # ---- node pools ------------------------------------------------------------
    def ensure_pools(self, gpu_pool: bool = True) -> None:
        """Register the CPU pools, and the GPU pool unless ``gpu_pool`` is False (then remove it)."""
        for pool in CPU_POOLS:
            self.add_pool(pool)
        if gpu_pool:
            self.add_pool(GPU_POOL)
        else:
            self.remove_pool(GPU_POOL)
        self.wait_nodes_ready([n for p in CPU_POOLS + ((GPU_POOL,) if gpu_pool else ()) for n in p.node_names()])

    def add_pool(self, pool: NodePool) -> None:
        for node in pool.node_manifests():
            try:
                self._request("POST", "/api/v1/nodes", node)
            except urllib.error.HTTPError as exc:
                if exc.code != 409:  # already there
                    raise

    def remove_pool(self, pool: NodePool) -> None:
        for name in pool.node_names():
            try:
                self._request("DELETE", f"/api/v1/nodes/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise

    def wait_nodes_ready(self, names: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                node = json.loads(self._get(f"/api/v1/nodes/{name}"))
                conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
                if conditions.get("Ready") == "True":
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise RuntimeError(
                f"kwok did not make nodes Ready within {timeout:.0f} s: {sorted(pending)}; "
                f"see {self.root / 'logs' / 'kwok.log'}"
            )

    # ---- internals -------------------------------------------------------------
    def _write_pki(self) -> None:
        """A CA, the API server's serving cert, an admin client cert and a service-account key."""
        (self.root / "pki").mkdir(parents=True, exist_ok=True)
        ca_key, ca_crt = self._pki("ca.key"), self._pki("ca.crt")
        _run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-keyout",
                str(ca_key),
                "-out",
                str(ca_crt),
                "-subj",
                "/CN=leanserve-test-ca",
            ]
        )
        self._sign(
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth",
        )
        self._sign("admin", "/O=system:masters/CN=leanserve-admin", "extendedKeyUsage=clientAuth")
        _run(["openssl", "genrsa", "-out", str(self._pki("sa.key")), "2048"])
        _run(["openssl", "rsa", "-in", str(self._pki("sa.key")), "-pubout", "-out", str(self._pki("sa.pub"))])
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "leanserve", "cluster": {"server": self.server, "certificate-authority": str(ca_crt)}}
                    ],
                    "users": [
                        {
                            "name": "admin",
                            "user": {
                                "client-certificate": str(self._pki("admin.crt")),
                                "client-key": str(self._pki("admin.key")),
                            },
                        }
                    ],
                    "contexts": [{"name": "leanserve", "context": {"cluster": "leanserve", "user": "admin"}}],
                    "current-context": "leanserve",
                },
                indent=2,
            )
        )

    def _sign(self, name: str, subject: str, extensions: str) -> None:
        key, csr, crt, ext = (self._pki(f"{name}.{s}") for s in ("key", "csr", "crt", "ext"))
        ext.write_text(extensions + "\n")
        _run(
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject]
        )
        ca, ca_key = self._pki("ca.crt"), self._pki("ca.key")
        signing = f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 3650 -out {crt} -extfile {ext}"
        _run(["openssl", *signing.split()])  # the paths are ours and contain no spaces

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start a process in its own session (it outlives `make cluster-up`), logging to a file."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        (self.root / "pids").mkdir(parents=True, exist_ok=True)
        with (self.root / "logs" / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        (self.root / "pids" / f"{name}.pid").write_text(str(proc.pid))
        self._children.append(proc)

    def _wait(self, what: str, probe: Any, timeout: float, log_name: str) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if probe():
                    self.timings[f"{what}_ready_s"] = round(time.monotonic() - start, 1)
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError):
                pass
            pid_file = self.root / "pids" / f"{log_name}.pid"
            if pid_file.exists() and not _alive(int(pid_file.read_text())):
                break
            time.sleep(0.2)
        tail = (self.root / "logs" / f"{log_name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s; last log lines:\n{tail}")

    def _start_etcd(self, bin_dir: Path) -> None:
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_port + 1}"
        flags = {
            "name": "leanserve",
            "data-dir": self.root / "etcd",
            "listen-client-urls": client_url,
            "advertise-client-urls": client_url,
            "listen-peer-urls": peer_url,
            "initial-advertise-peer-urls": peer_url,
            "initial-cluster": f"leanserve={peer_url}",
            "unsafe-no-fsync": "true",  # test data: speed over durability
            "quota-backend-bytes": 2 * 1024**3,
            "log-level": "warn",
        }
        self._spawn("etcd", [str(bin_dir / "etcd"), *_flags(flags)])

        def probe() -> bool:
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"

        self._wait("etcd", probe, 30, "etcd")

    def _start_apiserver(self, bin_dir: Path) -> None:
        pki = self._pki
        flags = {
            "etcd-servers": f"http://127.0.0.1:{self.etcd_port}",
            "bind-address": "127.0.0.1",
            "advertise-address": "127.0.0.1",
            "secure-port": self.apiserver_port,
            "tls-cert-file": pki("apiserver.crt"),
            "tls-private-key-file": pki("apiserver.key"),
            "client-ca-file": pki("ca.crt"),
            "service-account-issuer": "https://kubernetes.default.svc.cluster.local",
            "service-account-key-file": pki("sa.pub"),
            "service-account-signing-key-file": pki("sa.key"),
            "service-cluster-ip-range": "10.96.0.0/16",
            "authorization-mode": "RBAC",  # real authorization: the operator's RBAC is tested against it
            "allow-privileged": "false",
            "profiling": "false",
            "v": 1,
        }
        self._spawn("kube-apiserver", [str(bin_dir / "kube-apiserver"), *_flags(flags)])
        self._wait("kube-apiserver", lambda: self._get("/readyz", timeout=2) == "ok", 90, "kube-apiserver")

    def _start_controllers(self, bin_dir: Path) -> None:
        kubeconfig = self.kubeconfig
        common = {
            "kubeconfig": kubeconfig,
            "authentication-kubeconfig": kubeconfig,
            "authorization-kubeconfig": kubeconfig,
            "bind-address": "127.0.0.1",
            "leader-elect": "false",
            "v": 1,
        }
        controller_manager = {
            **common,
            "secure-port": self.apiserver_port + 1,
            "service-account-private-key-file": self._pki("sa.key"),
            "root-ca-file": self._pki("ca.crt"),
            "cluster-signing-cert-file": self._pki("ca.crt"),
            "cluster-signing-key-file": self._pki("ca.key"),
            "use-service-account-credentials": "false",
        }
        kwok = {
            "kubeconfig": kubeconfig,
            "config": HERE / "kwok.yaml",
            "manage-all-nodes": "false",
            "manage-nodes-with-annotation-selector": "kwok.x-k8s.io/node=fake",
            "cidr": "10.244.0.0/16",
            "node-ip": "10.0.0.1",
            "node-lease-duration-seconds": 40,
            "server-address": f"127.0.0.1:{self.apiserver_port + 3}",
        }
        self._spawn("kube-controller-manager", [str(bin_dir / "kube-controller-manager"), *_flags(controller_manager)])
        scheduler = {**common, "secure-port": self.apiserver_port + 2}
        self._spawn("kube-scheduler", [str(bin_dir / "kube-scheduler"), *_flags(scheduler)])
        self._spawn("kwok", [str(bin_dir / "kwok"), *_flags(kwok)])
        # The default ServiceAccount appearing proves the controller-manager works.
        self._wait(
            "kube-controller-manager",
            lambda: bool(self._get("/api/v1/namespaces/default/serviceaccounts/default", timeout=2)),
            60,
            "kube-controller-manager",
        )

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self._pki("ca.crt")))
        ctx.load_cert_chain(str(self._pki("admin.crt")), str(self._pki("admin.key")))
        return ctx

    def _get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.server + path, context=self._ssl(), timeout=timeout) as resp:
            return resp.read().decode()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.server + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, context=self._ssl(), timeout=10) as resp:
            return json.loads(resp.read() or b"null")


def _flags(flags: dict[str, Any]) -> list[str]:
    """``{"secure-port": 6443}`` -> ``["--secure-port=6443"]``."""
    return [f"--{name}={value}" for name, value in flags.items()]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "status", "build"))
    parser.add_argument(
        "--no-gpu-pool",
        action="store_true",
        default=os.environ.get("GPU_POOL", "1") in ("0", "false", "no"),
        help="start without the g4dn.xlarge pool (exercises CPU fallback); also GPU_POOL=0",
    )
    args = parser.parse_args(argv)
    plane = ControlPlane()
    try:
        if args.action == "build":
            print(plane.build())
        elif args.action == "up":
            plane.up(gpu_pool=not args.no_gpu_pool)
            pools = [p.instance_type for p in CPU_POOLS] + ([] if args.no_gpu_pool else [GPU_POOL.instance_type])
            print(f"control plane up at {plane.server}, node pools: {', '.join(pools)}")
            print(f"export KUBECONFIG={plane.kubeconfig}")
            print("stop it with: make cluster-down")
        elif args.action == "down":
            plane.down()
        else:
            print("running" if plane.healthy() else "not running")
            return 0 if plane.healthy() else 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
