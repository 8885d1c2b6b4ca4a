"""The profile cache: measured Profiles kept in the cluster as ConfigMaps, keyed by model, type and image.

One ConfigMap per (model, instance type, serving image version), in the
namespace of the InferenceDeployments that use it: a tenant's profiles steer
only that tenant's plans (nobody can plant a flattering profile for another
namespace). The key is in the labels, so the operator finds a model's profiles
with one list call; the compact profile (at most 4 KiB, what a profiling Job's
termination message carries) is the data.

The model is known by ``spec.model.sha256`` when the spec gives one (a changed
file is a new model), else by its URI (and format and evaluation data).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from kubernetes.client import ApiClient
from pydantic import ValidationError

from leanserve import __version__
from leanserve.api.spec import ModelSpec
from leanserve.controller import kube
from leanserve_serving.profile import Profile

PROFILE_LABEL = "leanserve.dev/profile"
MODEL_LABEL = "leanserve.dev/model-key"
TYPE_LABEL = "leanserve.dev/instance-type"
IMAGE_LABEL = "leanserve.dev/image-version"
DATA_KEY = "profile.json"

log = logging.getLogger("leanserve.operator")


def model_key(model: ModelSpec) -> str:
    """40 hex characters naming the model for the cache (fits a label value)."""
    if model.sha256:
        return model.sha256[:40]
    evaluation = model.evaluation.uri if model.evaluation else ""
    return hashlib.sha256(f"{model.format}|{model.uri}|{evaluation}".encode()).hexdigest()[:40]


def configmap_name(key: str, instance_type: str, image_version: str) -> str:
    digest = hashlib.sha256(f"{key}|{instance_type}|{image_version}".encode()).hexdigest()[:12]
    return f"leanserve-profile-{instance_type.replace('.', '-')[:30]}-{digest}"


def _label(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in value)[:63]


def render_profile(namespace: str, key: str, profile: Profile, image_version: str = __version__) -> dict[str, Any]:
    """The ConfigMap holding ``profile`` under the cache key."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(key, profile.instance_type, image_version),
            "namespace": namespace,
            "labels": {
                PROFILE_LABEL: "true",
                MODEL_LABEL: key,
                TYPE_LABEL: _label(profile.instance_type),
                IMAGE_LABEL: _label(image_version),
                "app.kubernetes.io/managed-by": "leanserve",
            },
        },
        "data": {DATA_KEY: profile.to_compact()},
    }


def save(api: ApiClient, namespace: str, key: str, profile: Profile, image_version: str = __version__) -> None:
    kube.apply(api, render_profile(namespace, key, profile, image_version))


def load(api: ApiClient, namespace: str, key: str, image_version: str = __version__) -> tuple[list[Profile], list[str]]:
    """The cached profiles of a model for this image version, and the ConfigMaps that failed to parse.

    A profile that does not validate is skipped and named (not fatal): one bad
    ConfigMap must not stop the plan over the others.
    """
    selector = f"{PROFILE_LABEL}=true,{MODEL_LABEL}={key},{IMAGE_LABEL}={_label(image_version)}"
    profiles, broken = [], []
    for item in kube.list_objects(api, "v1", "ConfigMap", namespace, selector):
        name = item["metadata"]["name"]
        try:
            profiles.append(Profile.from_compact((item.get("data") or {})[DATA_KEY]))
        except (KeyError, ValidationError, ValueError) as exc:
            log.warning("event=profile_invalid configmap=%s error=%s", name, str(exc).splitlines()[0])
            broken.append(name)
    return sorted(profiles, key=lambda p: p.instance_type), broken
