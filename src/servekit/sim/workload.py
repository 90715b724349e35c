"""Workloads: who sends what, when.

A :class:`Workload` has tenants, each with its own arrival stream (Poisson or gamma bursts,
shaped by a diurnal curve, optionally limited to a time window), prompt and output length
distributions (fixed, uniform, lognormal, or rows of a trace file), shared system prompts,
multi-turn sessions and cancellations. :func:`workload_from_dict` reads one from a TOML table;
every error names the field.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from attrs import field, frozen

from servekit.sim._check import integer, join, known_keys, number, table
from servekit.sim.errors import SimConfigError

__all__ = [
    "Arrival",
    "Diurnal",
    "LengthDist",
    "Sessions",
    "Tenant",
    "Workload",
    "length_from",
    "workload_from_dict",
]


# ----------------------------------------------------------------------------- lengths


@frozen(slots=True)
class LengthDist:
    """A token-length distribution: ``fixed`` (``value``), ``uniform`` (``low``..``high``
    inclusive), ``lognormal`` (``median``, ``sigma``, clipped to ``low``..``high``) or
    ``trace`` (``values`` drawn uniformly)."""

    kind: str
    value: int = 0
    low: int = 1
    high: int = 1 << 30
    median: float = 0.0
    sigma: float = 0.0
    values: tuple[int, ...] = ()

    def sample(self, rng: np.random.Generator, n: int | None = None) -> Any:
        """One length (``n`` None) or an array of ``n``."""
        size = 1 if n is None else n
        if self.kind == "fixed":
            out = np.full(size, self.value, dtype=np.int64)
        elif self.kind == "uniform":
            out = rng.integers(self.low, self.high + 1, size=size)
        elif self.kind == "lognormal":
            raw = rng.lognormal(math.log(self.median), self.sigma, size=size)
            out = np.clip(np.rint(raw), self.low, self.high).astype(np.int64)
        else:
            out = np.asarray(self.values, dtype=np.int64)[rng.integers(0, len(self.values), size)]
        return int(out[0]) if n is None else out

    def mean(self) -> float:
        """The distribution's mean (lognormal: of 200k seeded draws, clipping included)."""
        if self.kind == "fixed":
            return float(self.value)
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "lognormal":
            return float(self.sample(np.random.default_rng(0), 200_000).mean())
        return float(np.mean(self.values))

    @property
    def maximum(self) -> int:
        """The largest length it can draw."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "trace":
            return max(self.values)
        return self.high


def length_from(spec: object, name: str) -> LengthDist:
    """A :class:`LengthDist` from an int (fixed) or a table with ``dist``."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return LengthDist("fixed", value=integer(name, spec, minimum=1))
    data = table(name, spec)
    kind = data.get("dist")
    if kind == "fixed":
        known_keys(name, data, {"dist", "value"})
        return LengthDist("fixed", value=integer(join(name, "value"), data.get("value"), minimum=1))
    if kind == "uniform":
        known_keys(name, data, {"dist", "low", "high"})
        low = integer(join(name, "low"), data.get("low"), minimum=1)
        high = integer(join(name, "high"), data.get("high"), minimum=low)
        return LengthDist("uniform", low=low, high=high)
    if kind == "lognormal":
        known_keys(name, data, {"dist", "median", "sigma", "min", "max"})
        median = number(join(name, "median"), data.get("median"), positive=True)
        sigma = number(join(name, "sigma"), data.get("sigma", 0.5), minimum=0.0)
        low = integer(join(name, "min"), data.get("min", 1), minimum=1)
        high = integer(join(name, "max"), data.get("max", 1 << 30), minimum=low)
        return LengthDist("lognormal", low=low, high=high, median=median, sigma=sigma)
    raise SimConfigError(join(name, "dist"),
                         f"must be 'fixed', 'uniform' or 'lognormal', got {kind!r}")


def read_trace(path: str | Path, name: str = "workload.trace") -> tuple[LengthDist, LengthDist]:
    """Prompt and output length distributions from a CSV with columns ``prompt_tokens`` and
    ``output_tokens`` (rows drawn jointly: the same row index for both)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as exc:
        raise SimConfigError(name, f"trace file {str(path)!r} does not exist") from exc
    if not rows:
        raise SimConfigError(name, f"trace file {str(path)!r} has no rows")
    prompts, outputs = [], []
    for i, row in enumerate(rows, start=2):
        try:
            p, o = int(row["prompt_tokens"]), int(row["output_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SimConfigError(name, f"{path} line {i}: needs integer prompt_tokens and "
                                 f"output_tokens columns") from exc
        if p < 1 or o < 1:
            raise SimConfigError(name, f"{path} line {i}: lengths must be >= 1")
        prompts.append(p)
        outputs.append(o)
    return LengthDist("trace", values=tuple(prompts)), LengthDist("trace", values=tuple(outputs))


# ----------------------------------------------------------------------------- arrivals


@frozen(slots=True)
class Diurnal:
    """A rate multiplier over time: ``1 + amplitude * sin(2π (t - phase) / period)``, or a
    periodic piecewise-linear ``curve`` of ``(seconds, multiplier)`` points."""

    period: float = 86_400.0
    amplitude: float = 0.0
    phase: float = 0.0
    curve: tuple[tuple[float, float], ...] = ()

    def __call__(self, t: float) -> float:
        if self.curve:
            xs = [p[0] for p in self.curve]
            ys = [p[1] for p in self.curve]
            return float(np.interp(t % self.period, xs, ys))
        return 1.0 + self.amplitude * math.sin(2 * math.pi * (t - self.phase) / self.period)

    @property
    def peak(self) -> float:
        """The largest multiplier."""
        return max(p[1] for p in self.curve) if self.curve else 1.0 + self.amplitude


def diurnal_from(spec: object, name: str) -> Diurnal:
    """A :class:`Diurnal` from its table."""
    data = table(name, spec)
    known_keys(name, data, {"period", "amplitude", "phase", "curve"})
    period = number(join(name, "period"), data.get("period", 86_400.0), positive=True)
    amplitude = number(join(name, "amplitude"), data.get("amplitude", 0.0), minimum=0.0,
                       maximum=1.0)
    phase = number(join(name, "phase"), data.get("phase", 0.0))
    curve: list[tuple[float, float]] = []
    for i, point in enumerate(data.get("curve", ())):
        where = f"{join(name, 'curve')}[{i}]"
        if not isinstance(point, Sequence) or len(point) != 2:
            raise SimConfigError(where, f"must be [seconds, multiplier], got {point!r}")
        t = number(where, point[0], minimum=0.0, maximum=period)
        curve.append((t, number(where, point[1], minimum=0.0)))
    if curve and any(b[0] <= a[0] for a, b in itertools.pairwise(curve)):
        raise SimConfigError(join(name, "curve"), "times must increase")
    if curve and max(m for _, m in curve) <= 0:
        raise SimConfigError(join(name, "curve"), "needs a multiplier > 0 somewhere")
    return Diurnal(period, amplitude, phase, tuple(curve))


@frozen(slots=True)
class Sessions:
    """Multi-turn conversations: ``turns`` per session; each next turn arrives ``think_time``
    seconds (exponential mean) after the last one finished, its prompt being the whole
    conversation so far plus ``user_tokens`` new ones."""

    turns: LengthDist
    think_time: float
    user_tokens: LengthDist


@frozen(slots=True)
class Tenant:
    """A traffic source: ``weight`` (share of the workload's rate) or an absolute ``rate``
    (requests/s), sending between ``start`` and ``end`` seconds; ``rpm``/``tpm`` limits enforced
    at the gateway; ``priority`` for the priority policy."""

    name: str
    weight: float = 1.0
    rate: float | None = None
    start: float = 0.0
    end: float = math.inf
    rpm: float | None = None
    tpm: float | None = None
    priority: int = 0


@frozen(slots=True)
class Arrival:
    """A new session (or single request) of ``tenant`` at ``time``."""

    time: float
    tenant: int


@frozen(slots=True)
class Workload:
    """Everything about the traffic (see the module docstring). ``rate`` is requests (new
    sessions) per second across the tenants that give a weight instead of a rate."""

    rate: float
    prompt: LengthDist
    output: LengthDist
    arrival: str = "poisson"
    cv: float = 1.0
    diurnal: Diurnal | None = None
    system_prompts: int = 0
    system_prompt_tokens: int = 0
    sessions: Sessions | None = None
    cancel_probability: float = 0.0
    cancel_after: float = 1.0
    tenants: tuple[Tenant, ...] = field(default=(Tenant("default"),))
    paired_lengths: bool = False  # trace rows: draw prompt and output with the same index

    def with_rate(self, rate: float) -> Workload:
        """The same workload at ``rate`` requests/s."""
        return attrs.evolve(self, rate=number("workload.rate", rate, positive=True))

    def tenant_rates(self) -> list[float]:
        """Mean requests/s of each tenant while it sends."""
        weighted = [t for t in self.tenants if t.rate is None]
        total = sum(t.weight for t in weighted)
        return [t.rate if t.rate is not None else
                (self.rate * t.weight / total if total > 0 else 0.0) for t in self.tenants]

    def mean_request_tokens(self) -> float:
        """Expected prompt + output tokens of one request (first turns; system prompt included)."""
        return self.prompt.mean() + self.output.mean() + (
            self.system_prompt_tokens if self.system_prompts else 0)

    def arrivals(self, rng: np.random.Generator, until: float) -> Iterator[Arrival]:
        """Session starts of every tenant in time order, up to ``until`` seconds."""
        streams = [self._stream(rng, i, rate, until)
                   for i, rate in enumerate(self.tenant_rates()) if rate > 0]
        for t, i in heapq.merge(*streams):
            yield Arrival(t, i)

    def _stream(self, rng: np.random.Generator, index: int, rate: float,
                until: float) -> Iterator[tuple[float, int]]:
        tenant = self.tenants[index]
        t, end = tenant.start, min(tenant.end, until)
        shape = self.diurnal
        # one child generator per tenant, so one tenant's draws never shift another's
        child = np.random.default_rng(rng.integers(1 << 62))
        peak = shape.peak if shape is not None else 1.0
        if self.arrival == "poisson":
            # thinning: candidates at the peak rate, kept with probability m(t) / peak
            while True:
                t += child.exponential(1.0 / (rate * peak))
                if t >= end:
                    return
                if shape is None or child.random() * peak < shape(t):
                    yield (t, index)
        else:
            k = 1.0 / (self.cv * self.cv)  # gamma shape for this coefficient of variation
            while True:
                m = shape(t) if shape is not None else 1.0
                if m <= 0:
                    t += 0.01 * (shape.period if shape is not None else 1.0)
                    if t >= end:
                        return
                    continue
                t += child.gamma(k, 1.0 / (k * rate * m))
                if t >= end:
                    return
                yield (t, index)


_WORKLOAD_KEYS = frozenset({
    "preset", "rate", "arrival", "cv", "diurnal", "prompt", "output", "trace", "system_prompts",
    "sessions", "cancel", "tenants",
})


def workload_from_dict(data: Mapping[str, Any], name: str = "workload",
                       base: str | Path | None = None) -> Workload:
    """A :class:`Workload` from a TOML table; ``preset`` (``chat``, ``rag``, ``batch``)
    supplies defaults the other keys override; a relative ``trace`` path is read from ``base``."""
    from servekit.sim.presets import preset_table

    data = table(name, data)
    known_keys(name, data, _WORKLOAD_KEYS)
    merged: dict[str, Any] = {}
    if "preset" in data:
        merged.update(preset_table(data["preset"], join(name, "preset")))
    merged.update({k: v for k, v in data.items() if k != "preset"})
    if "rate" not in merged:
        raise SimConfigError(join(name, "rate"), "is required (requests per second)")
    rate = number(join(name, "rate"), merged["rate"], minimum=0.0)
    arrival = merged.get("arrival", "poisson")
    if arrival not in ("poisson", "gamma"):
        raise SimConfigError(join(name, "arrival"), f"must be 'poisson' or 'gamma', got {arrival!r}")
    cv = number(join(name, "cv"), merged.get("cv", 1.0), positive=True)
    diurnal = diurnal_from(merged["diurnal"], join(name, "diurnal")) if "diurnal" in merged else None
    paired = False
    if "trace" in merged:
        path = Path(str(merged["trace"]))
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        prompt, output = read_trace(path, join(name, "trace"))
        paired = True
    else:
        for key in ("prompt", "output"):
            if key not in merged:
                raise SimConfigError(join(name, key), "is required (or give a trace)")
        prompt = length_from(merged["prompt"], join(name, "prompt"))
        output = length_from(merged["output"], join(name, "output"))
    count = tokens = 0
    if "system_prompts" in merged:
        where = join(name, "system_prompts")
        sp = table(where, merged["system_prompts"])
        known_keys(where, sp, {"count", "tokens"})
        count = integer(join(where, "count"), sp.get("count", 1), minimum=0)
        tokens = integer(join(where, "tokens"), sp.get("tokens"), minimum=1)
    sessions = None
    if "sessions" in merged:
        where = join(name, "sessions")
        ss = table(where, merged["sessions"])
        known_keys(where, ss, {"turns", "think_time", "user_tokens"})
        sessions = Sessions(
            length_from(ss.get("turns", 1), join(where, "turns")),
            number(join(where, "think_time"), ss.get("think_time", 0.0), minimum=0.0),
            length_from(ss["user_tokens"], join(where, "user_tokens"))
            if "user_tokens" in ss else prompt)
    cancel_p, cancel_after = 0.0, 1.0
    if "cancel" in merged:
        where = join(name, "cancel")
        cc = table(where, merged["cancel"])
        known_keys(where, cc, {"probability", "after"})
        cancel_p = number(join(where, "probability"), cc.get("probability", 0.0), minimum=0.0,
                          maximum=1.0)
        cancel_after = number(join(where, "after"), cc.get("after", 1.0), positive=True)
    tenants = tuple(_tenant(t, f"{join(name, 'tenants')}[{i}]")
                    for i, t in enumerate(merged.get("tenants", [{"name": "default"}])))
    if not tenants:
        raise SimConfigError(join(name, "tenants"), "needs at least one tenant")
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise SimConfigError(join(name, "tenants"), f"names must be distinct, got {names}")
    return Workload(rate, prompt, output, arrival, cv, diurnal, count, tokens, sessions, cancel_p,
                    cancel_after, tenants, paired)


def _tenant(spec: object, name: str) -> Tenant:
    data = table(name, spec)
    known_keys(name, data, {"name", "weight", "rate", "start", "end", "rpm", "tpm", "priority"})
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise SimConfigError(join(name, "name"), "must be a non-empty string")

    def opt(key: str) -> float | None:
        return None if key not in data else number(join(name, key), data[key], positive=True)

    start = number(join(name, "start"), data.get("start", 0.0), minimum=0.0)
    end = number(join(name, "end"), data["end"], minimum=start) if "end" in data else math.inf
    rate = None if "rate" not in data else number(join(name, "rate"), data["rate"], minimum=0.0)
    return Tenant(data["name"], number(join(name, "weight"), data.get("weight", 1.0), minimum=0.0),
                  rate, start, end, opt("rpm"), opt("tpm"),
                  integer(join(name, "priority"), data.get("priority", 0)))
