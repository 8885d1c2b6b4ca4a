"""Shared fixtures: repository paths and the shipped examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def load_example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def minimal_doc() -> dict[str, Any]:
    """The smallest valid InferenceDeployment: a model, a latency target, a traffic figure."""
    return {
        "apiVersion": "leanserve.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "minimal"},
        "spec": {
            "model": {"uri": "file:///models/m.onnx"},
            "sla": {"latency": {"targetMs": 100}},
            "traffic": {"averageRps": 100},
        },
    }
