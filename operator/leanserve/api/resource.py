"""The InferenceDeployment resource: identity (group, version, names) and the top-level model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from leanserve.api.base import ApiModel
from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.api.status import InferenceDeploymentStatus

GROUP = "leanserve.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceDeployment"
PLURAL = "inferencedeployments"
SINGULAR = "inferencedeployment"
SHORT_NAMES: tuple[str, ...] = ("infd",)
CRD_NAME = f"{PLURAL}.{GROUP}"

#: Names become Service and Deployment names with suffixes (``-redis``,
#: ``-bench-g4dn-xlarge``), so they must be DNS-1035 labels with room to spare.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 40


class ObjectMeta(BaseModel):
    """The part of metadata a local file is checked for; the rest is passed through."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    name: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)
    """A DNS-1035 label of at most 40 characters (lower case letters, digits and
    '-', starting with a letter): Service and Deployment names derive from it."""
    namespace: str | None = None


class InferenceDeployment(ApiModel):
    """A model served at the cheapest configuration that meets its SLA and budget."""

    api_version: Literal["leanserve.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["InferenceDeployment"]
    metadata: ObjectMeta
    spec: InferenceDeploymentSpec
    status: InferenceDeploymentStatus | None = None
