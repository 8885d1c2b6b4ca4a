"""The InferenceDeployment API, declared once as pydantic models."""

from leanserve.api.resource import API_VERSION, CRD_NAME, GROUP, KIND, VERSION, InferenceDeployment
from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.api.status import InferenceDeploymentStatus

__all__ = [
    "API_VERSION",
    "CRD_NAME",
    "GROUP",
    "KIND",
    "VERSION",
    "InferenceDeployment",
    "InferenceDeploymentSpec",
    "InferenceDeploymentStatus",
]
