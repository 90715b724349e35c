"""Device and model specs for the roofline step-time model, loaded from data files.

Built-in specs live in ``servekit/sim/data/{devices,models}.toml`` (sources in docs/sim.md);
a scenario may name one of them or give a table of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

from attrs import frozen

from servekit.sim._check import integer, known_keys, number
from servekit.sim._toml import load_toml
from servekit.sim.errors import SimConfigError

__all__ = ["DeviceSpec", "ModelSpec", "device_names", "device_spec", "model_names", "model_spec"]


@frozen(slots=True)
class DeviceSpec:
    """One accelerator: peaks from the datasheet plus the efficiencies a serving engine reaches."""

    name: str
    peak_flops: float
    mem_bandwidth: float
    memory: float
    link_bandwidth: float
    compute_efficiency: float = 0.55
    bandwidth_efficiency: float = 0.8
    step_overhead: float = 0.002
    allreduce_latency: float = 10e-6

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], field: str = "device") -> DeviceSpec:
        """Validate a table; errors name ``field.key``."""
        known_keys(field, data, {"name", *_DEVICE_NUMBERS})
        missing = [k for k in ("peak_flops", "mem_bandwidth", "memory", "link_bandwidth")
                   if k not in data]
        if missing:
            raise SimConfigError(f"{field}.{missing[0]}", "is required")
        values: dict[str, Any] = {"name": str(data.get("name", field))}
        for key, (positive, maximum) in _DEVICE_NUMBERS.items():
            if key in data:
                values[key] = number(f"{field}.{key}", data[key], positive=positive,
                                     minimum=0.0, maximum=maximum)
        return cls(**values)


_DEVICE_NUMBERS: dict[str, tuple[bool, float | None]] = {
    "peak_flops": (True, None), "mem_bandwidth": (True, None), "memory": (True, None),
    "link_bandwidth": (True, None), "compute_efficiency": (True, 1.0),
    "bandwidth_efficiency": (True, 1.0), "step_overhead": (False, None),
    "allreduce_latency": (False, None),
}


@frozen(slots=True)
class ModelSpec:
    """A transformer's shape: what the roofline needs to count FLOPs and bytes."""

    name: str
    params: float
    active_params: float
    layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (MoE: every expert)."""
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes across all layers (K and V)."""
        return 2 * self.layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], field: str = "model") -> ModelSpec:
        """Validate a table; errors name ``field.key``."""
        ints = ("layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                "max_model_len", "dtype_bytes")
        known_keys(field, data, {"name", "params", "active_params", *ints})
        for key in ("params", "layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "vocab_size", "max_model_len"):
            if key not in data:
                raise SimConfigError(f"{field}.{key}", "is required")
        params = number(f"{field}.params", data["params"], positive=True)
        active = number(f"{field}.active_params", data.get("active_params", params), positive=True,
                        maximum=params)
        values = {k: integer(f"{field}.{k}", data[k], minimum=1) for k in ints if k in data}
        if values["num_heads"] % values["num_kv_heads"]:
            raise SimConfigError(f"{field}.num_kv_heads", "must divide num_heads")
        return cls(name=str(data.get("name", field)), params=params, active_params=active,
                   **values)


@cache
def _builtin(kind: str) -> dict[str, Any]:
    return load_toml(str(files("servekit.sim") / "data" / f"{kind}.toml"), kind)


def device_names() -> list[str]:
    """Names of the built-in devices."""
    return sorted(_builtin("devices"))


def model_names() -> list[str]:
    """Names of the built-in models."""
    return sorted(_builtin("models"))


def device_spec(spec: str | Mapping[str, Any] | DeviceSpec, field: str = "device") -> DeviceSpec:
    """A built-in device by name (case-insensitive), a table, or a spec."""
    if isinstance(spec, DeviceSpec):
        return spec
    if isinstance(spec, str):
        data = _builtin("devices").get(spec.lower())
        if data is None:
            raise SimConfigError(field, f"unknown device {spec!r}; built in: {device_names()}")
        return DeviceSpec.from_dict(data, field)
    if isinstance(spec, Mapping):
        return DeviceSpec.from_dict(spec, field)
    raise SimConfigError(field, f"must be a device name or table, got {spec!r}")


def model_spec(spec: str | Mapping[str, Any] | ModelSpec, field: str = "model") -> ModelSpec:
    """A built-in model by name (case-insensitive), a table, or a spec."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        data = _builtin("models").get(spec.lower())
        if data is None:
            raise SimConfigError(field, f"unknown model {spec!r}; built in: {model_names()}")
        return ModelSpec.from_dict(data, field)
    if isinstance(spec, Mapping):
        return ModelSpec.from_dict(spec, field)
    raise SimConfigError(field, f"must be a model name or table, got {spec!r}")
