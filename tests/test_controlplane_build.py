"""The control-plane binaries built from the Go module proxy report the pinned versions."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO, controlplane

pytestmark = pytest.mark.cluster


def pinned(module_dir: str, module: str) -> str:
    text = (REPO / "hack" / "controlplane" / module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", text, re.MULTILINE)
    assert match, f"{module} is not pinned in {module_dir}/go.mod"
    return match.group(1)


@pytest.fixture(scope="module")
def bin_dir():
    return controlplane.ControlPlane().build()


def run(path, *args: str) -> str:
    return subprocess.run([str(path), *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_kubernetes_binaries_report_the_pinned_version(bin_dir):
    version = pinned("kubernetes", "k8s.io/kubernetes")
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert run(bin_dir / binary, "--version").strip() == f"Kubernetes {version}"


def test_etcd_kwok_and_helm_report_the_pinned_versions(bin_dir):
    assert pinned("etcd", "go.etcd.io/etcd/server/v3").lstrip("v") in run(bin_dir / "etcd", "--version")
    assert pinned("kwok", "sigs.k8s.io/kwok").lstrip("v") in run(bin_dir / "kwok", "--version")
    assert pinned("helm", "helm.sh/helm/v3") in run(bin_dir / "helm", "version", "--short")


def test_a_second_build_reuses_the_cache(bin_dir):
    stamp = {p.name: p.stat().st_mtime_ns for p in bin_dir.iterdir()}
    assert controlplane.ControlPlane().build() == bin_dir
    assert {p.name: p.stat().st_mtime_ns for p in bin_dir.iterdir()} == stamp


def test_missing_go_is_a_clear_error(tmp_path):
    """Without Go on PATH the build stops with a message saying what is missing, not a skip."""
    tools = tmp_path / "path"
    tools.mkdir()
    for tool in ("bash", "dirname", "awk", "head", "cut", "cat", "sha256sum"):  # everything but go
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tools), "HOME": str(tmp_path), "LEANSERVE_CONTROLPLANE_BIN": str(tmp_path / "bin")}
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / "controlplane" / "build.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3
    assert "the Go toolchain is required" in proc.stderr
