"""A real kind cluster from the repository's ``kind-config.yaml``, for the end-to-end tests.

Two providers:

* **docker** (a laptop with a Docker engine): kind's upstream node image, kind's own CNI;
  nothing is built but the kind CLI.
* **podman** (this project's CI machines: no Docker engine, no registry): a node image built
  here (``node-image.sh``) from Debian packages and binaries built from the Go module proxy,
  with every control-plane and add-on image inside it; flannel (host-gw) as the CNI.

Either way the leanserve images of ``make images`` are loaded with ``kind load
image-archive`` and metrics-server is installed (the HPA's CPU metric).

Usage::

    python hack/kind/kind.py up      # prints the KUBECONFIG to use on its last line
    python hack/kind/kind.py down    # deletes the cluster and restores the host
    python hack/kind/kind.py status

Host changes (podman provider) are recorded in ``.cache/kind/host-state.json`` before the
cluster starts and undone by ``down``: the kernel settings the node's kubelet and kube-proxy
write (they share the host's kernel), an empty ``/lib/modules`` when the host has none (kind
mounts it into nodes), podman's ``kind`` network. Podman's container limits come from a
``containers.conf`` of our own passed through ``CONTAINERS_CONF``: /etc is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = REPO / ".cache" / "kind"
STATE = CACHE / "host-state.json"
KUBECONFIG = CACHE / "kubeconfig"
CLUSTER = "leanserve"
CONFIG = REPO / "kind-config.yaml"
IMAGES_DIR = REPO / ".cache" / "images"
BUILD_BINS = HERE / "build-bins.sh"
BUILD_CONTROLPLANE = REPO / "hack" / "controlplane" / "build.sh"

#: Kernel settings a kind node changes on the host it shares the kernel with.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.bridge.bridge-nf-call-iptables",
    "fs.inotify.max_user_watches",
    "fs.inotify.max_user_instances",
)
#: Podman gives every container the caller's limits at most; this VM withholds CAP_SYS_RESOURCE,
#: so podman's own defaults (above the hard limits) fail with "error setting rlimit type 7".
#: netavark with aardvark-dns: the nodes find each other by name (kubeadm join dials
#: leanserve-control-plane); Debian's podman 4.3 otherwise picks CNI networks, which have no DNS.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[network]
network_backend = "netavark"
"""


def log(message: str) -> None:
    print(f"[kind] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True, capture: bool = False) -> str:
    """Run a command, its output on stderr unless captured; raise with its output when it fails."""
    result = subprocess.run(
        cmd,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else sys.stderr,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else "(output above)"
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed with exit {result.returncode}: {detail}")
    return result.stdout or ""


def provider() -> str:
    """docker when a Docker engine answers (the upstream path), else podman (built here)."""
    chosen = os.environ.get("LEANSERVE_KIND_PROVIDER", "")
    if chosen:
        if chosen not in ("docker", "podman"):
            raise SystemExit("error: LEANSERVE_KIND_PROVIDER must be docker or podman")
        return chosen
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return "podman"


def kind_env(prov: str) -> dict[str, str]:
    env = dict(os.environ)
    if prov == "podman":
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = CACHE / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        env["KIND_EXPERIMENTAL_PROVIDER"] = "podman"
        env["CONTAINERS_CONF"] = str(conf)
    else:
        env.pop("KIND_EXPERIMENTAL_PROVIDER", None)
    return env


def tool_dir(script: Path) -> Path:
    """The folder of binaries a cached build script (build-bins.sh, controlplane/build.sh) prints last."""
    return Path(run(["bash", str(script)], capture=True).strip().splitlines()[-1])


def build(prov: str) -> tuple[Path, str | None]:
    """The kind CLI (and, for podman, the node image); their paths come from the cached builds."""
    kbin = tool_dir(BUILD_BINS)
    if prov == "docker":
        return kbin, None
    cbin = tool_dir(BUILD_CONTROLPLANE)
    started = time.monotonic()
    out = subprocess.run(["bash", str(HERE / "node-image.sh"), str(kbin), str(cbin)], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit("error: building the kind node image failed (output above)")
    log(f"node image ready in {time.monotonic() - started:.0f} s")
    return kbin, out.stdout.strip().splitlines()[-1]


def read_sysctls() -> dict[str, str]:
    values = {}
    for key in SYSCTLS:
        path = Path("/proc/sys") / key.replace(".", "/")
        if path.exists():
            values[key] = path.read_text().strip()
    return values


IPTABLES_TABLES = ("filter", "nat", "mangle")


def iptables_rules(table: str) -> tuple[set[str], list[str]]:
    """(chains, rules) of one table, as iptables-save writes them; empty without iptables."""
    if shutil.which("iptables-save") is None:
        return set(), []
    out = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
    chains = {line[1:].split()[0] for line in out.splitlines() if line.startswith(":")}
    rules = [line for line in out.splitlines() if line.startswith("-A ")]
    return chains, rules


def restore_iptables(before: dict[str, dict[str, list[str]]]) -> list[str]:
    """Remove the rules and chains podman's network backend added since ``before`` (it leaves its
    base chains and their jumps behind when the last network goes)."""
    removed = []
    for table, saved in before.items():
        chains, rules = iptables_rules(table)
        old_rules, old_chains = set(saved["rules"]), set(saved["chains"])
        for rule in reversed(rules):
            if rule not in old_rules:
                args = shlex.split(rule)
                args[0] = "-D"
                if subprocess.run(["iptables", "-t", table, *args], capture_output=True).returncode == 0:
                    removed.append(f"{table}: {rule}")
        for chain in sorted(chains - old_chains):
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True)
            if subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True).returncode == 0:
                removed.append(f"{table}: chain {chain}")
    return removed


def record_host() -> None:
    """Remember the host's settings before the first node starts (not again while one runs)."""
    if STATE.exists():
        return
    state: dict[str, Any] = {"sysctls": read_sysctls(), "created_lib_modules": False, "iptables": {}}
    for table in IPTABLES_TABLES:
        chains, rules = iptables_rules(table)
        state["iptables"][table] = {"chains": sorted(chains), "rules": rules}
    modules = Path("/lib/modules")
    if not modules.exists():
        modules.mkdir(parents=True)
        state["created_lib_modules"] = True
    CACHE.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=2))


def restore_host() -> list[str]:
    """Put back what the cluster changed on the host; returns what was restored."""
    if not STATE.exists():
        return []
    state = json.loads(STATE.read_text())
    restored = []
    for key, before in state.get("sysctls", {}).items():
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            if path.exists() and path.read_text().strip() != before:
                path.write_text(before)
                restored.append(f"{key}={before}")
        except OSError as exc:
            log(f"warning: could not restore {key}={before}: {exc}")
    restored += restore_iptables(state.get("iptables", {}))
    if state.get("created_lib_modules"):
        try:
            Path("/lib/modules").rmdir()
            restored.append("/lib/modules removed")
        except OSError:
            pass
    STATE.unlink()
    return restored


def cluster_exists(kind: Path, env: dict[str, str]) -> bool:
    names = run([str(kind), "get", "clusters"], env=env, capture=True).split()
    return CLUSTER in names


def kubectl(kbin: Path, *args: str, capture: bool = False, check: bool = True) -> str:
    return run([str(kbin / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args], capture=capture, check=check)


def metrics_api_serves(kbin: Path) -> bool:
    """Whether the API server answers for the resource metrics API (what the HPA reads), not only lists it."""
    out = kubectl(kbin, "get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes", capture=True, check=False)
    try:
        return bool(json.loads(out).get("items"))
    except ValueError:
        return False


def wait_metrics_api(kbin: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics_api_serves(kbin):
            return True
        time.sleep(3)
    return False


def ensure_metrics_api(kbin: Path, prov: str, env: dict[str, str]) -> None:
    """Wait until the metrics API answers through the API server; restart the API server once if it never does.

    Seen here with Kubernetes 1.34 (two fresh clusters in three, one day): the metrics-server
    APIService registers while its Service has no endpoint yet, the aggregator's
    first calls fail (503, connection refused), and from then on the API server
    answers 404 for metrics.k8s.io although the APIService says Available and
    metrics-server answers when called directly. Re-creating the APIService does
    not mend it; restarting kube-apiserver does, within seconds. Without it the
    HPA never gets a metric ("could not find the requested resource").
    """
    if wait_metrics_api(kbin, 30):
        return
    node = f"{CLUSTER}-control-plane"
    log("the API server does not serve metrics.k8s.io although metrics-server is up: restarting kube-apiserver")
    ids = run([prov, "exec", node, "crictl", "ps", "-q", "--name", "kube-apiserver"], env=env, capture=True).split()
    for container in ids:
        run([prov, "exec", node, "crictl", "stop", container], env=env, capture=True)
    if not wait_metrics_api(kbin, 120):
        raise SystemExit("error: the metrics API (metrics.k8s.io) does not answer through the API server")
    log("the metrics API answers after the restart")


def leanserve_archives() -> list[Path]:
    manifest = IMAGES_DIR / "manifest.json"
    if not manifest.exists():
        raise SystemExit("error: no images in .cache/images: run `make images` first")
    images = json.loads(manifest.read_text())["images"]
    # The GPU image is for GPU nodes: kind-config.yaml's GPU worker has no GPU here.
    archives = [REPO / e["archive"] for key, e in images.items() if not key.endswith("gpu")]
    return [a for a in archives if a.exists()]


def up(args: argparse.Namespace) -> int:
    prov = provider()
    env = kind_env(prov)
    t0 = time.monotonic()
    kbin, node_image = build(prov)
    kind = kbin / "kind"
    timings: dict[str, float] = {"build_s": round(time.monotonic() - t0, 1)}
    if cluster_exists(kind, env):
        log(f"cluster {CLUSTER} exists; reusing it")
    else:
        if prov == "podman":
            record_host()
        cmd = [str(kind), "create", "cluster", "--name", CLUSTER, "--config", str(CONFIG)]
        cmd += ["--kubeconfig", str(KUBECONFIG), "--wait", "180s"]
        if node_image:
            cmd += ["--image", node_image]
        started = time.monotonic()
        run(cmd, env=env)
        timings["create_s"] = round(time.monotonic() - started, 1)
    run([str(kind), "export", "kubeconfig", "--name", CLUSTER, "--kubeconfig", str(KUBECONFIG)], env=env, capture=True)
    started = time.monotonic()
    for archive in leanserve_archives():
        run([str(kind), "load", "image-archive", "--name", CLUSTER, str(archive)], env=env, capture=True)
        log(f"loaded {archive.name}")
    timings["load_images_s"] = round(time.monotonic() - started, 1)
    kubectl(kbin, "apply", "-f", str(HERE / "manifests" / "metrics-server.yaml"), capture=True)
    started = time.monotonic()
    for ns, kind_, name in (
        ("kube-system", "deployment", "coredns"),
        ("kube-system", "deployment", "metrics-server"),
    ):
        kubectl(kbin, "-n", ns, "rollout", "status", f"{kind_}/{name}", "--timeout=180s", capture=True)
    if prov == "podman":
        kubectl(kbin, "-n", "kube-flannel", "rollout", "status", "ds/kube-flannel-ds", "--timeout=180s", capture=True)
    ensure_metrics_api(kbin, prov, env)
    timings["addons_ready_s"] = round(time.monotonic() - started, 1)
    log(f"cluster {CLUSTER} ready ({prov}); timings {json.dumps(timings)}")
    (CACHE / "timings.json").write_text(json.dumps({"provider": prov, **timings}))
    print(KUBECONFIG)
    return 0


def down(args: argparse.Namespace) -> int:
    prov = provider()
    env = kind_env(prov)
    kbin_out = subprocess.run(["bash", str(BUILD_BINS)], capture_output=True, text=True)
    kind = Path(kbin_out.stdout.strip().splitlines()[-1]) / "kind" if kbin_out.returncode == 0 else None
    if kind and kind.exists() and cluster_exists(kind, env):
        started = time.monotonic()
        run([str(kind), "delete", "cluster", "--name", CLUSTER], env=env)
        log(f"cluster deleted in {time.monotonic() - started:.0f} s")
    if prov == "podman" and shutil.which("podman"):
        # kind leaves its network behind; remove it when no container uses it.
        subprocess.run(["podman", "network", "rm", "kind"], env=env, capture_output=True)
    for item in restore_host():
        log(f"restored {item}")
    KUBECONFIG.unlink(missing_ok=True)
    return 0


def status(args: argparse.Namespace) -> int:
    prov = provider()
    env = kind_env(prov)
    kbin = tool_dir(BUILD_BINS)
    exists = cluster_exists(kbin / "kind", env)
    print(json.dumps({"provider": prov, "cluster": CLUSTER, "exists": exists, "kubeconfig": str(KUBECONFIG)}))
    return 0 if exists else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build what is missing, create the cluster, load the images")
    sub.add_parser("down", help="delete the cluster and restore the host")
    sub.add_parser("status", help="say whether the cluster exists")
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
