"""What a simulation produced: per-request records, the timeline, and the summary
(percentiles per tenant, throughput, goodput, rejections, KV usage, router balance)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import define, field, frozen

if TYPE_CHECKING:
    from servekit.sim.simulator import Simulator

__all__ = ["OUTCOMES", "LatencyStats", "Record", "SimResult", "TenantStats", "Timeline",
           "in_window", "summarize", "tokens_in_window"]

#: every request ends as exactly one of these ("unfinished": still in flight when the
#: simulation stopped, only possible with a finite ``drain``)
OUTCOMES = ("finished", "cancelled", "rejected_rate_limit", "rejected_queue_full",
            "rejected_invalid", "unfinished")
PERCENTILES = (50, 90, 99)


def in_window(time: float, start: float, end: float) -> bool:
    """Whether an output token emitted at ``time`` counts toward the throughput of the window
    ``[start, end]``: it does if it was emitted within it, whenever its request arrived (a
    token emitted after ``end`` is served load of a later window, not of this one)."""
    return start <= time <= end


def tokens_in_window(times: Iterable[float], start: float, end: float) -> int:
    """How many of the output tokens emitted at ``times`` count toward the window's
    throughput (:func:`in_window`); output tokens/s is this over ``end - start``."""
    return sum(1 for t in times if in_window(t, start, end))


class Record:
    """One request's life in the simulation (times in simulated seconds)."""

    __slots__ = ("arrival", "cached", "end", "first", "gateway", "id", "itl", "last",
                 "max_tokens", "n_out", "outcome", "preemptions", "prompt_len", "replica",
                 "request", "reservation", "session", "tenant", "turn")

    def __init__(self, rid: str, tenant: str, arrival: float, prompt_len: int, max_tokens: int,
                 turn: int, itl: dict[float, int]) -> None:
        self.id = rid
        self.tenant = tenant
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.turn = turn
        self.itl = itl  # the histogram (interval -> count) this request's gaps go to
        self.first = -1.0
        self.last = -1.0
        self.end = -1.0
        self.n_out = 0
        self.cached = 0
        self.preemptions = 0
        self.outcome: str | None = None
        self.replica = ""
        self.gateway = 0
        self.session: Any = None
        self.request: Any = None
        self.reservation: Any = None

    @property
    def ttft(self) -> float:
        """Seconds to the first token (inf if none came)."""
        return self.first - self.arrival if self.first >= 0 else math.inf

    @property
    def tpot(self) -> float:
        """Mean seconds between output tokens (0 with one token)."""
        return (self.last - self.first) / (self.n_out - 1) if self.n_out > 1 else 0.0


@define(slots=True)
class Timeline:
    """Fleet gauges sampled every ``sample_interval`` simulated seconds."""

    time: list[float] = field(factory=list)
    kv_usage: list[float] = field(factory=list)
    kv_usage_max: list[float] = field(factory=list)
    running: list[int] = field(factory=list)
    waiting: list[int] = field(factory=list)
    preemptions: list[int] = field(factory=list)

    def add(self, t: float, *, kv_usage: float, kv_usage_max: float, running: int, waiting: int,
            preemptions: int) -> None:
        """Append one sample."""
        self.time.append(t)
        self.kv_usage.append(kv_usage)
        self.kv_usage_max.append(kv_usage_max)
        self.running.append(running)
        self.waiting.append(waiting)
        self.preemptions.append(preemptions)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """Column lists."""
        return {"time": self.time, "kv_usage": self.kv_usage, "kv_usage_max": self.kv_usage_max,
                "running": self.running, "waiting": self.waiting,
                "preemptions": self.preemptions}


@frozen(slots=True)
class LatencyStats:
    """Percentiles (p50, p90, p99) and mean of one latency, in seconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    count: int

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready (inf as None)."""
        return {k: _finite(getattr(self, k)) for k in ("p50", "p90", "p99", "mean", "count")}


@frozen(slots=True)
class TenantStats:
    """One tenant's (or the whole fleet's, ``"all"``) outcomes and latencies over the window."""

    tenant: str
    outcomes: Mapping[str, int]
    ttft: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    goodput: float  # requests/s meeting the SLO
    slo_attainment: float  # fraction of admitted requests meeting the SLO

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"tenant": self.tenant, "outcomes": dict(self.outcomes),
                "ttft": self.ttft.to_dict(), "itl": self.itl.to_dict(),
                "e2e": self.e2e.to_dict(), "goodput_rps": self.goodput,
                "slo_attainment": self.slo_attainment}


@frozen(slots=True)
class SimResult:
    """The summary of one simulation (``records`` and ``timeline`` keep the detail)."""

    duration: float
    window: float  # measured seconds: duration - warmup
    tenants: Mapping[str, TenantStats]  # per tenant, plus "all"
    throughput: Mapping[str, float]  # requests/s, output tokens/s, total tokens/s
    router: Mapping[str, Any]  # balance and prefix-cache hit rate
    preemptions: int
    kv_usage_peak: float
    timeline: Timeline
    records: list[Record]
    sim_time: float  # simulated seconds, drain included
    stopped_early: bool = False  # gave up once the TTFT objective had clearly failed
    tail_ttft_p90: float = math.nan  # TTFT p90 of the last quarter's arrivals (a growing queue)

    @property
    def all(self) -> TenantStats:
        """The fleet-wide stats."""
        return self.tenants["all"]

    def meets(self, ttft_p99: float, itl_p99: float) -> bool:
        """True when every request was served (none rejected or left unfinished) and the
        fleet's p99 TTFT and p99 ITL are within the bounds."""
        if self.stopped_early:
            return False
        o = self.all.outcomes
        served = all(o.get(k, 0) == 0 for k in OUTCOMES if k not in ("finished", "cancelled"))
        # a queue that still grows at the end of the window would miss the SLO in a longer run
        stable = not self.tail_ttft_p90 > ttft_p99
        return (served and stable and self.all.ttft.p99 <= ttft_p99
                and self.all.itl.p99 <= itl_p99)

    def to_dict(self, *, timeline: bool = True) -> dict[str, Any]:
        """JSON-ready summary (records left out)."""
        out: dict[str, Any] = {
            "duration": self.duration, "window": self.window, "sim_time": self.sim_time,
            "tenants": {k: v.to_dict() for k, v in self.tenants.items()},
            "throughput": dict(self.throughput), "router": dict(self.router),
            "preemptions": self.preemptions, "kv_usage_peak": self.kv_usage_peak,
            "stopped_early": self.stopped_early,
            "tail_ttft_p90": _finite(self.tail_ttft_p90),
        }
        if timeline:
            out["timeline"] = self.timeline.to_dict()
        return out

    def format(self) -> str:
        """A human-readable table."""
        lines = [f"simulated {self.duration:g} s (+{self.sim_time - self.duration:.1f} s drain), "
                 f"measured over {self.window:g} s",
                 f"{'tenant':<12}{'arrived':>8}{'done':>8}{'rej':>6}{'canc':>6}"
                 f"{'ttft p50':>10}{'p90':>8}{'p99':>8}{'itl p50':>9}{'p99':>8}"
                 f"{'e2e p50':>9}{'goodput':>9}"]
        for name, t in self.tenants.items():
            o = t.outcomes
            rej = sum(v for k, v in o.items() if k.startswith("rejected"))
            lines.append(
                f"{name:<12}{sum(o.values()):>8}{o.get('finished', 0):>8}{rej:>6}"
                f"{o.get('cancelled', 0):>6}{_ms(t.ttft.p50):>10}{_ms(t.ttft.p90):>8}"
                f"{_ms(t.ttft.p99):>8}{_ms(t.itl.p50):>9}{_ms(t.itl.p99):>8}"
                f"{_ms(t.e2e.p50):>9}{t.goodput:>9.2f}")
        tp = self.throughput
        lines.append(f"throughput: {tp['requests_per_s']:.2f} req/s, "
                     f"{tp['output_tokens_per_s']:.0f} output tok/s, "
                     f"{tp['total_tokens_per_s']:.0f} total tok/s; preemptions "
                     f"{self.preemptions}; KV usage peak {self.kv_usage_peak:.0%}")
        r = self.router
        lines.append(f"router: max/mean requests {r['max_over_mean']:.3f}, prefix hit rate "
                     f"{r['prefix_hit_rate']:.1%}")
        return "\n".join(lines)


def _ms(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x * 1e3:.0f}ms"


def _finite(x: float) -> float | None:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _stats(values: Iterable[float]) -> LatencyStats:
    a = np.fromiter(values, dtype=np.float64)
    if a.size == 0:
        return LatencyStats(math.nan, math.nan, math.nan, math.nan, 0)
    p50, p90, p99 = np.percentile(a, PERCENTILES, method="inverted_cdf")
    mean = float(a.mean()) if np.isfinite(a).all() else math.inf
    return LatencyStats(float(p50), float(p90), float(p99), mean, int(a.size))


def _weighted_stats(hists: Iterable[Mapping[float, int]]) -> LatencyStats:
    merged: dict[float, int] = {}
    for h in hists:
        for k, v in h.items():
            merged[k] = merged.get(k, 0) + v
    if not merged:
        return LatencyStats(math.nan, math.nan, math.nan, math.nan, 0)
    keys = np.array(sorted(merged), dtype=np.float64)
    weights = np.array([merged[k] for k in keys], dtype=np.float64)
    cum = np.cumsum(weights)
    total = cum[-1]
    ps = [float(keys[min(int(np.searchsorted(cum, total * p / 100)), keys.size - 1)])
          for p in PERCENTILES]
    return LatencyStats(ps[0], ps[1], ps[2], float((keys * weights).sum() / total), int(total))


def summarize(sim: Simulator) -> SimResult:
    """Turn a finished simulation into a :class:`SimResult`."""
    sc = sim.scenario
    for rec in sim.records:
        if rec.outcome is None:
            rec.outcome = "unfinished"
            if rec.request is not None:
                rec.n_out = rec.request.num_output_tokens
    window = sc.duration - sc.warmup
    arrived = [r for r in sim.records if in_window(r.arrival, sc.warmup, sc.duration)]
    slo = sc.slo
    tenants: dict[str, TenantStats] = {}
    groups: list[tuple[str, list[Record], list[Mapping[float, int]]]] = [
        (t.name, [r for r in arrived if r.tenant == t.name], [sim._itl[t.name]])
        for t in sc.workload.tenants]
    groups.append(("all", arrived, list(sim._itl.values())))
    for name, recs, hists in groups:
        outcomes = {k: 0 for k in OUTCOMES}
        for r in recs:
            outcomes[r.outcome or "unfinished"] += 1
        admitted = [r for r in recs if r.outcome in ("finished", "unfinished")]
        done = [r for r in recs if r.outcome == "finished"]
        good = sum(1 for r in done if r.ttft <= slo.ttft and r.tpot <= slo.itl)
        tenants[name] = TenantStats(
            name, outcomes, _stats(r.ttft for r in admitted), _weighted_stats(hists),
            _stats(r.end - r.arrival for r in done), good / window,
            good / len(admitted) if admitted else math.nan)
    tail_start = sc.duration - window / 4
    tail = [r for r in arrived
            if r.arrival >= tail_start and r.outcome in ("finished", "unfinished")]
    finished_in_window = [r for r in sim.records if r.outcome == "finished"
                          and in_window(r.end, sc.warmup, sc.duration)]
    throughput = {
        "requests_per_s": len(finished_in_window) / window,
        "output_tokens_per_s": sim._outputs_in_window / window,
        "total_tokens_per_s": sum(r.prompt_len + r.n_out for r in finished_in_window) / window,
    }
    counts = np.array([rep.requests for rep in sim.replicas.values()], dtype=np.float64)
    prompt = sum(r.prompt_len for r in sim.records if r.outcome in ("finished", "cancelled"))
    cached = sum(r.cached for r in sim.records if r.outcome in ("finished", "cancelled"))
    queries = sum(rep.kv.prefix_queries for rep in sim.replicas.values())
    hits = sum(rep.kv.prefix_hits for rep in sim.replicas.values())
    router = {
        "requests_per_replica": {n: rep.requests for n, rep in sim.replicas.items()},
        "max_over_mean": float(counts.max() / counts.mean()) if counts.sum() else math.nan,
        "prefix_hit_rate": cached / prompt if prompt else 0.0,
        "prefix_block_queries": queries,
        "prefix_block_hits": hits,
    }
    tl = sim.timeline
    return SimResult(sc.duration, window, tenants, throughput, router,
                     sum(rep.sched.num_preemptions for rep in sim.replicas.values()),
                     max(tl.kv_usage_max, default=0.0), tl, sim.records, sim.now,
                     sim.stopped_early, _stats(r.ttft for r in tail).p90)
