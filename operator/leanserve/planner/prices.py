"""Price table: USD per hour per instance type, with the hardware each type offers."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class InstanceType(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    name: str
    vcpus: int = Field(ge=1)
    memory_gi_b: float = Field(gt=0, alias="memoryGiB")
    gpus: int = Field(default=0, ge=0)
    gpu_model: str | None = None
    on_demand_usd_per_hour: float = Field(gt=0)
    spot_usd_per_hour: float | None = Field(default=None, gt=0)
    reserved_millicpu: int | None = Field(default=None, ge=0)
    """CPU the node keeps from pods (kubelet, OS, daemonsets); None: GKE's formula (planner.allocation)."""
    reserved_memory_mi_b: int | None = Field(default=None, ge=0, alias="reservedMemoryMiB")
    """Memory the node keeps from pods, MiB; None: GKE's formula plus eviction threshold and daemonsets."""

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0


class PriceTable(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    source: str
    date: str
    currency: str = "USD"
    instance_types: list[InstanceType]

    def get(self, name: str) -> InstanceType | None:
        return next((t for t in self.instance_types if t.name == name), None)


def load_prices(path: Path | None = None) -> PriceTable:
    """The table at ``path``, or the default shipped with leanserve."""
    text = path.read_text() if path else resources.files("leanserve.planner").joinpath("prices.yaml").read_text()
    return PriceTable.model_validate(yaml.safe_load(text))
