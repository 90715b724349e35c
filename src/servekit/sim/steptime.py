"""Step-time models: how long one engine step takes, from the shape of the scheduler's batch.

A model implements :class:`StepTimeModel` (``step_time(shape) -> seconds``). The shape of a
step (:class:`StepShape`) is what the GPU work depends on: prefill tokens, decode rows, the KV
tokens read and the attention work. Two models ship: :class:`RooflineModel` (from device and
model specs) and :class:`ProfiledModel` (a linear fit to measurements of a real engine).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from servekit.sched.output import StepShape, shape_of
from servekit.sim._check import integer, number
from servekit.sim.errors import SimConfigError
from servekit.sim.frontend import FrontendCost, frontend_from
from servekit.sim.specs import DeviceSpec, ModelSpec

__all__ = [
    "ProfiledModel",
    "RooflineModel",
    "StepShape",
    "StepTimeModel",
    "fit_profile",
    "fit_with_frontend",
    "shape_of",
]


@runtime_checkable
class StepTimeModel(Protocol):
    """Seconds one engine step of a given shape takes."""

    def step_time(self, shape: StepShape) -> float:
        """Seconds for a step of ``shape`` (> 0)."""
        ...


class RooflineModel:
    """Compute-bound prefill, memory-bound decode: ``max(FLOPs / compute, bytes / bandwidth)
    + all-reduce + overhead``.

    FLOPs = 2 · active params · tokens + 4 · layers · heads · head_dim · attention pairs.
    Bytes = all weights + KV bytes read + KV bytes written. Tensor parallelism divides both by
    ``tp`` and adds two ring all-reduces of the activations per layer.
    """

    def __init__(self, model: ModelSpec, device: DeviceSpec, *, tp: int = 1) -> None:
        self.model = model
        self.device = device
        self.tp = integer("tp", tp, minimum=1)
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise SimConfigError("tp", f"{tp} does not split {model.num_kv_heads} KV heads")
        self._flops_per_token = 2.0 * model.active_params
        self._attn_flops = 4.0 * model.layers * model.num_heads * model.head_dim
        self._compute = tp * device.peak_flops * device.compute_efficiency
        self._bandwidth = tp * device.mem_bandwidth * device.bandwidth_efficiency
        self._weights = model.weight_bytes
        self._kv = float(model.kv_bytes_per_token)
        self._overhead = device.step_overhead
        # two all-reduces per layer; ring: 2 (tp - 1) / tp of the message over each link
        self._ar_bytes_per_token = (2 * model.layers * model.hidden_size * model.dtype_bytes
                                    * 2 * (tp - 1) / tp)
        self._ar_latency = 2 * model.layers * device.allreduce_latency if tp > 1 else 0.0

    def step_time(self, shape: StepShape) -> float:
        """Seconds for a step of ``shape``."""
        tokens = shape.prefill_tokens + shape.decodes
        flops = self._flops_per_token * tokens + self._attn_flops * shape.attention_pairs
        moved = self._weights + self._kv * (shape.kv_tokens + tokens)
        t = max(flops / self._compute, moved / self._bandwidth) + self._overhead
        if self.tp > 1:
            t += self._ar_bytes_per_token * tokens / self.device.link_bandwidth + self._ar_latency
        return t

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9,
                           activation_reserve: float = 0.04) -> int:
        """Tokens of KV cache that fit beside the weights on ``tp`` devices."""
        usable = self.tp * self.device.memory * (gpu_memory_utilization - activation_reserve)
        free = usable - self.model.weight_bytes
        if free <= 0:
            raise SimConfigError(
                "tp", f"{self.model.name} ({self.model.weight_bytes / 1e9:.0f} GB of weights) "
                f"does not fit {self.tp} x {self.device.name} at "
                f"gpu_memory_utilization {gpu_memory_utilization}")
        return int(free // self.model.kv_bytes_per_token)


#: the features a profile is linear in, in order
PROFILE_FEATURES = ("const", "prefill_tokens", "decodes", "kv_tokens", "attention_pairs")


def features(shape: StepShape) -> tuple[float, float, float, float, float]:
    return (1.0, float(shape.prefill_tokens), float(shape.decodes), float(shape.kv_tokens),
            shape.attention_pairs)


class ProfiledModel:
    """A linear step-time model fitted to a real engine's steps:
    ``t = c0 + c1·prefill_tokens + c2·decodes + c3·kv_tokens + c4·attention_pairs``
    (coefficients >= 0). A profile fitted through a server may carry the server's
    ``frontend`` cost too (:class:`~servekit.sim.frontend.FrontendCost`)."""

    def __init__(self, coefficients: Sequence[float], *, meta: Mapping[str, Any] | None = None,
                 field: str = "profile", frontend: FrontendCost | None = None) -> None:
        if len(coefficients) != len(PROFILE_FEATURES):
            raise SimConfigError(f"{field}.coefficients",
                                 f"needs {len(PROFILE_FEATURES)} numbers {PROFILE_FEATURES}")
        self.coefficients = tuple(number(f"{field}.coefficients[{i}]", c, minimum=0.0)
                                  for i, c in enumerate(coefficients))
        if self.coefficients[0] <= 0 and self.coefficients[1] <= 0 and self.coefficients[2] <= 0:
            raise SimConfigError(f"{field}.coefficients", "a step must take time (all zero)")
        self.meta = dict(meta or {})
        self.frontend = frontend

    def step_time(self, shape: StepShape) -> float:
        """Seconds for a step of ``shape``."""
        c0, c1, c2, c3, c4 = self.coefficients
        return (c0 + c1 * shape.prefill_tokens + c2 * shape.decodes + c3 * shape.kv_tokens
                + c4 * shape.attention_pairs)

    def scaled(self, factor: float, frontend_factor: float | None = None) -> ProfiledModel:
        """This profile on a machine ``factor`` times slower (> 1) or faster (< 1) at steps and
        ``frontend_factor`` (default ``factor``) at its front-end work, e.g. the
        :func:`~servekit.sim.profile.speed_factors` of a later run."""
        factor = number("factor", factor, positive=True)
        front = number("frontend_factor", factor if frontend_factor is None else frontend_factor,
                       minimum=0.0)
        fe = self.frontend
        return ProfiledModel([c * factor for c in self.coefficients],
                             meta={**self.meta, "scaled": [factor, front]},
                             frontend=None if fe is None else FrontendCost(
                                 fe.per_request * front, fe.per_token * front))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what :meth:`load` reads)."""
        out: dict[str, Any] = {"kind": "profiled", "features": list(PROFILE_FEATURES),
                               "coefficients": list(self.coefficients), "meta": self.meta}
        if self.frontend is not None:
            out["frontend"] = self.frontend.to_dict()
        return out

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, field: str = "profile") -> ProfiledModel:
        """Read a profile written by :meth:`save` (``servekit sim profile``)."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise SimConfigError(field, f"profile file {str(path)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise SimConfigError(field, f"{path}: invalid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != "profiled":
            raise SimConfigError(field, f"{path}: not a servekit step-time profile")
        frontend = (frontend_from(data["frontend"], f"{field}.frontend")
                    if "frontend" in data else None)
        return cls(data.get("coefficients", ()), meta=data.get("meta"), field=field,
                   frontend=frontend)


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of ``y`` on the columns of ``x`` with non-negative coefficients: columns
    whose coefficient would go negative are dropped and the rest refitted."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
        sol = sol / scale[active]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def _explained(x: np.ndarray, y: np.ndarray) -> float:
    """The share of ``y``'s variance that a least-squares fit on ``x``'s columns explains
    (1 for a constant ``y``, which the constant column explains)."""
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - x @ sol) ** 2).sum()) / total if total > 0 else 1.0


def fit_profile(shapes: Sequence[StepShape], seconds: Sequence[float], *,
                meta: Mapping[str, Any] | None = None) -> ProfiledModel:
    """Least squares with non-negative coefficients (features that would go negative are
    dropped and the rest refitted) of step times on step shapes."""
    if len(shapes) != len(seconds) or len(shapes) < len(PROFILE_FEATURES):
        raise SimConfigError("shapes", f"need >= {len(PROFILE_FEATURES)} measured steps, "
                             f"got {len(shapes)} shapes and {len(seconds)} times")
    x = np.array([features(s) for s in shapes], dtype=np.float64)
    coef = nnls(x, np.asarray(seconds, dtype=np.float64))
    return ProfiledModel([float(c) for c in coef], meta=meta)


def fit_with_frontend(shapes: Sequence[StepShape], arrivals: Sequence[int],
                      streamed: Sequence[int], seconds: Sequence[float], *,
                      meta: Mapping[str, Any] | None = None) -> ProfiledModel:
    """Fit the step-time profile and the front-end cost together: ``seconds[i]``, the wall
    time of one cycle (a step and the work the process did around it), ~ profile(``shapes[i]``)
    + per_request · ``arrivals[i]`` + per_token · ``streamed[i]``, by non-negative least
    squares. The profile returned carries the fitted ``frontend``.

    The tokens a step streams are mostly the next step's decode rows, so ``per_token`` and the
    profile's per-decode (and constant) terms are nearly collinear. Where the log cannot
    tell them apart (the other columns explain 99 % of the streamed tokens' variance, or the
    fit leaves the step no time of its own), ``per_token`` is dropped (0) and the step's terms
    absorb it: the same time per cycle, charged as engine time."""
    n = len(shapes)
    if not n == len(arrivals) == len(streamed) == len(seconds):
        raise SimConfigError("shapes", f"need one arrivals, streamed and seconds per shape, "
                             f"got {n}, {len(arrivals)}, {len(streamed)} and {len(seconds)}")
    width = len(PROFILE_FEATURES) + 2
    if n < width:
        raise SimConfigError("shapes", f"need >= {width} measured cycles, got {n}")
    x = np.array([(*features(s), a, k) for s, a, k in zip(shapes, arrivals, streamed,
                                                           strict=True)], dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    coef = nnls(x, y)
    if _explained(x[:, :-1], x[:, -1]) >= 0.99 or not (coef[:3] > 0).any():
        coef = np.append(nnls(x[:, :-1], y), 0.0)
    return ProfiledModel([float(c) for c in coef[:-2]], meta=meta,
                         frontend=FrontendCost(float(coef[-2]), float(coef[-1])))
