"""A containerd of the suite's own, and the images `make images` built, for the container tests.

containerd runs with its own root, state and socket under a temporary folder (never the
machine's /var/lib/containerd or /run/containerd) and without its CRI plugin; containers run
with runc through `ctr`, on the host's network (their servers listen on loopback ports the
tests pick). Stopping it kills every task it started, removes the containers and the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "leanserve-test"


#: Left out by `make images` where the disk has no room for its build (its entry says why).
OPTIONAL_IMAGES = ("serving-gpu",)


def built_images() -> dict[str, dict[str, Any]]:
    """The manifest of `make images`, building what is missing or stale first (cached: seconds)."""
    build = [sys.executable, str(REPO / "hack" / "images" / "build.py"), "--images", ",".join(image_build.IMAGES)]
    res = subprocess.run(
        [*build, "--optional", ",".join(OPTIONAL_IMAGES)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"make images failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return json.loads(Path(res.stdout.strip().splitlines()[-1]).read_text())["images"]


def _load_image_build() -> ModuleType:
    """hack/images/build.py, the one reader of the OCI archives it writes."""
    spec = importlib.util.spec_from_file_location("leanserve_image_build", REPO / "hack" / "images" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


image_build = _load_image_build()


def image_config(archive: Path) -> dict[str, Any]:
    """The OCI image configuration inside an archive (user, labels, entrypoint, env)."""
    with image_build.open_archive(archive) as (_, manifest, blob):
        return json.load(blob(manifest["config"]["digest"]))


@dataclass(frozen=True)
class RunOptions:
    """How a test container runs: environment, (source, target, read-only) bind mounts, root."""

    env: dict[str, str] = field(default_factory=dict)
    mounts: Sequence[tuple[str, str, bool]] = ()
    read_only: bool = True


@dataclass
class Result:
    code: int
    out: str


@dataclass
class Containerd:
    """containerd + runc, private to the test session."""

    base: Path
    process: subprocess.Popen[bytes] | None = None
    #: The archives of the images a test may run, by reference: each is imported the first
    #: time a container of it runs (a test of one image waits for no other's import).
    archives: dict[str, Path] = field(default_factory=dict)
    _ids: list[str] = field(default_factory=list)
    _imported: set[str] = field(default_factory=set)

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    def start(self, timeout: float = 30) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base}/root"\n'
            f'state = "{self.base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.base}/containerd.sock.ttrpc"\n'
            f'[debug]\n  address = "{self.base}/debug.sock"\n'
            '[metrics]\n  address = ""\n'
        )
        log = (self.base / "containerd.log").open("wb")
        self.process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited: {(self.base / 'containerd.log').read_text()[-2000:]}")
            if Path(self.address).exists() and self.ctr("version", check=False).code == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("containerd did not answer on its socket in time")

    @property
    def _ctr(self) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", NAMESPACE]

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> Result:
        res = subprocess.run(
            [*self._ctr, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = res.stdout + res.stderr
        if check and res.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args[:3])} failed ({res.returncode}): {out[-2000:]}")
        return Result(res.returncode, out)

    def import_archive(self, archive: Path) -> list[str]:
        """Import an OCI archive; returns the image names containerd now has."""
        self.ctr("images", "import", str(archive))
        return self.ctr("images", "ls", "-q").out.split()

    def _import_once(self, image: str) -> None:
        if image in self._imported or image not in self.archives:
            return
        names = self.import_archive(self.archives[image])
        if image not in names:
            raise RuntimeError(f"{image} not among the images imported from {self.archives[image]}: {names}")
        self._imported.add(image)

    def _run_args(self, image: str, name: str, command: Sequence[str], options: RunOptions, remove: bool) -> list[str]:
        self._import_once(image)
        args = ["run", "--net-host", *(["--rm"] if remove else [])]
        if options.read_only:
            args.append("--read-only")
        # Like the pods: a small writable /tmp on a read-only root.
        args += ["--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:size=67108864"]
        for src, dst, ro in options.mounts:
            args += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:{'ro' if ro else 'rw'}"]
        for key, value in options.env.items():
            args += ["--env", f"{key}={value}"]
        self._ids.append(name)
        return [*args, image, name, *command]

    def run(self, image: str, name: str, command: Sequence[str] = (), timeout: float = 120, **options: Any) -> Result:
        """Run a container to its end; its exit code and output (options: see :class:`RunOptions`)."""
        args = self._run_args(image, name, command, RunOptions(**options), remove=True)
        try:
            return self.ctr(*args, check=False, timeout=timeout)
        finally:
            self.remove(name)

    def start_container(
        self, image: str, name: str, command: Sequence[str] = (), **options: Any
    ) -> subprocess.Popen[str]:
        """Start a long-running container (a server); stop it with :meth:`remove`."""
        args = self._run_args(image, name, command, RunOptions(**options), remove=False)
        return subprocess.Popen(
            [*self._ctr, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def task_pid(self, name: str) -> int:
        for line in self.ctr("tasks", "ls").out.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == name:
                return int(parts[1])
        raise RuntimeError(f"no task {name}")

    def remove(self, name: str) -> None:
        """Kill the container's task (if any) and remove the container and its snapshot."""
        self.ctr("tasks", "kill", "--signal", "SIGKILL", name, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and name in self.ctr("tasks", "ls", check=False).out:
            self.ctr("tasks", "delete", "--force", name, check=False)
            time.sleep(0.2)
        self.ctr("containers", "delete", name, check=False)

    def stop(self) -> None:
        for name in list(self._ids):
            self.remove(name)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Snapshot mounts are gone with their tasks; any left would keep the folder busy.
        for line in Path("/proc/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(self.base)):
                subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen[str] | None = None) -> None:
    """Wait until the URL answers 200; fail early with the container's output if it exited."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the container exited ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def world_readable(path: Path) -> Path:
    """Make a test file (and its folders up to /tmp's child) readable by the image's user."""
    os.chmod(path, 0o755 if path.is_dir() else 0o644)
    for parent in path.parents:
        if parent == Path("/") or parent == Path("/tmp"):
            break
        os.chmod(parent, 0o755)
    return path
