"""The capacity planner: the fewest GPUs that serve N tokens per minute within an SLO.

For each configuration (tensor-parallel degree, ``max_num_seqs``, token budget) it simulates a
slice of ``k`` replicas behind the real router at ``k/N`` of the traffic and bisects the
per-replica request rate that still meets the SLO (with a safety ``margin``); the fleet size is
the total rate over that. A configuration is only bisected when one simulation shows it could
beat the best so far. The answer is verified by simulating the slice at its share of the
traffic for twice the duration; a failed verification adds 3 % replicas to that candidate and
the candidate with the fewest GPUs is verified next.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import attrs
from attrs import frozen

from servekit.sim._check import integer, number
from servekit.sim.errors import InfeasibleError, SimConfigError
from servekit.sim.results import SimResult
from servekit.sim.scenario import SLO, GatewayConfig, ReplicaConfig, Scenario, fleet_sizes
from servekit.sim.simulator import simulate
from servekit.sim.specs import DeviceSpec, ModelSpec
from servekit.sim.steptime import RooflineModel, StepShape
from servekit.sim.workload import Workload

__all__ = ["Plan", "PlanConfig", "plan_capacity"]


@frozen(slots=True)
class PlanConfig:
    """One candidate replica configuration and the per-replica rate it sustains."""

    tp: int
    max_num_seqs: int
    max_num_batched_tokens: int
    rate_per_replica: float  # requests/s within the SLO (0: never)
    simulations: int


@frozen(slots=True)
class Plan:
    """The planner's answer."""

    model: str
    device: str
    tokens_per_minute: float
    request_rate: float  # requests/s the tokens per minute mean for this workload
    replicas: int
    tp: int
    gpus: int
    max_num_seqs: int
    max_num_batched_tokens: int
    rate_per_replica: float  # what the search found one replica sustains within the SLO
    headroom: float  # sustainable rate of the fleet / required rate - 1
    verification: SimResult  # the slice at its share of the traffic, 2x duration
    slice_replicas: int
    candidates: tuple[PlanConfig, ...]
    simulations: int
    seconds: float

    def format(self) -> str:
        """A human-readable summary."""
        v = self.verification.all
        lines = [
            f"{self.model} on {self.device}: {self.tokens_per_minute:.3g} tokens/min "
            f"= {self.request_rate:.1f} requests/s",
            f"-> {self.replicas} replicas x TP{self.tp} = {self.gpus} GPUs "
            f"(max_num_seqs {self.max_num_seqs}, max_num_batched_tokens "
            f"{self.max_num_batched_tokens}), {self.rate_per_replica:.2f} req/s per replica, "
            f"headroom {self.headroom:.1%}",
            f"verified on a slice of {self.slice_replicas} replicas: TTFT p50/p90/p99 "
            f"{v.ttft.p50:.3f}/{v.ttft.p90:.3f}/{v.ttft.p99:.3f} s, ITL p50/p99 "
            f"{v.itl.p50 * 1e3:.1f}/{v.itl.p99 * 1e3:.1f} ms, e2e p50 {v.e2e.p50:.2f} s",
            f"searched {len(self.candidates)} configurations with {self.simulations} simulations "
            f"in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "model": self.model, "device": self.device,
            "tokens_per_minute": self.tokens_per_minute, "request_rate": self.request_rate,
            "replicas": self.replicas, "tp": self.tp, "gpus": self.gpus,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "rate_per_replica": self.rate_per_replica, "headroom": self.headroom,
            "slice_replicas": self.slice_replicas,
            "verification": self.verification.to_dict(timeline=False),
            "candidates": [attrs.asdict(c) for c in self.candidates],
            "simulations": self.simulations, "seconds": self.seconds,
        }


def plan_capacity(
    model: ModelSpec,
    device: DeviceSpec,
    workload: Workload,
    *,
    tokens_per_minute: float,
    ttft_p99: float,
    itl_p99: float,
    tp_options: Sequence[int] = (1, 2, 4, 8),
    max_num_seqs_options: Sequence[int] = (256, 128),
    token_budget_options: Sequence[int] = (2048, 512),
    slice_replicas: int = 4,
    duration: float = 40.0,
    warmup: float = 8.0,
    margin: float = 0.1,
    precision: float = 0.05,
    seed: int = 0,
    routing: str = "consistent_hash",
    log: Callable[[str], None] | None = None,
) -> Plan:
    """Search the fewest GPUs that serve ``tokens_per_minute`` (prompt + output) within p99
    TTFT and p99 ITL; see the module docstring. Raises :class:`InfeasibleError` when no
    configuration meets the SLO even at a tiny load."""
    start = time.perf_counter()
    tpm = number("tokens_per_minute", tokens_per_minute, positive=True)
    ttft = number("ttft_p99", ttft_p99, positive=True)
    itl = number("itl_p99", itl_p99, positive=True)
    k = integer("slice_replicas", slice_replicas, minimum=1)
    number("duration", duration, positive=True)
    number("warmup", warmup, minimum=0.0, maximum=duration * 0.5)
    number("margin", margin, minimum=0.0, maximum=0.9)
    number("precision", precision, positive=True, maximum=0.5)
    for name, opts in (("tp", tp_options), ("max_num_seqs", max_num_seqs_options),
                       ("max_num_batched_tokens", token_budget_options)):
        if not opts:
            raise SimConfigError(name, "needs at least one option")
        for o in opts:
            integer(name, o, minimum=1)
    mean_tokens = workload.mean_request_tokens()
    total_rate = tpm / 60.0 / mean_tokens
    target = SLO(ttft * (1 - margin), itl * (1 - margin))
    sims = 0

    def run(cfg: tuple[int, int, int], replicas: int, rate: float, dur: float,
            slo: SLO, search: bool = True) -> SimResult:
        nonlocal sims
        sims += 1
        sc = _scenario(model, device, workload, cfg, replicas, rate, dur, warmup, seed, slo,
                       routing)
        # p99 fails once more than 1 % of the expected requests missed the TTFT
        give_up = None if not search else max(1, int(0.01 * rate * dur))
        return simulate(sc, give_up_after=give_up)

    def ok(cfg: tuple[int, int, int], per_replica: float, dur: float = duration) -> bool:
        return run(cfg, k, per_replica * k, dur, target).meets(target.ttft, target.itl)

    configs = [(tp, s, b) for tp in sorted(set(tp_options)) for s in max_num_seqs_options
               for b in token_budget_options if b >= s]
    if not configs:
        raise SimConfigError("max_num_batched_tokens", "every option is below max_num_seqs")
    best: tuple[int, tuple[int, int, int], float] | None = None  # gpus, config, rate
    found: list[tuple[int, int, int, tuple[int, int, int], float]] = []  # gpus, tp, replicas..
    searched: list[PlanConfig] = []
    for cfg in configs:
        tp, seqs, budget = cfg
        try:
            rm = RooflineModel(model, device, tp=tp)
            fleet_sizes(ReplicaConfig(max_num_seqs=seqs), model, rm)
        except SimConfigError:
            continue  # the weights do not fit, or tp does not split the heads
        before = sims
        if best is not None:
            # worth bisecting only if it could need fewer GPUs than the best so far
            fewer = (best[0] - 1) // tp
            # a half-length trial: an overload shows early
            if fewer < 1 or not ok(cfg, total_rate / fewer, max(duration / 2, 2 * warmup)):
                searched.append(PlanConfig(tp, seqs, budget, 0.0, sims - before))
                if log is not None:
                    log(f"tp {tp}, max_num_seqs {seqs}, budget {budget}: cannot beat "
                        f"{best[0]} GPUs ({time.perf_counter() - start:.0f} s so far)")
                continue
            lo = total_rate / fewer
        else:
            lo = 0.0
        rate = _bisect(functools.partial(ok, cfg), lo, _guess(rm, workload, seqs), precision)
        searched.append(PlanConfig(tp, seqs, budget, rate, sims - before))
        if log is not None:
            log(f"tp {tp}, max_num_seqs {seqs}, budget {budget}: {rate:.2f} req/s per replica "
                f"({sims - before} simulations, {time.perf_counter() - start:.0f} s so far)")
        if rate <= 0:
            continue
        replicas = math.ceil(total_rate / rate)
        found.append((replicas * tp, tp, replicas, cfg, rate))
        if best is None or replicas * tp < best[0]:
            best = (replicas * tp, cfg, rate)
    if best is None:
        raise InfeasibleError(
            f"no configuration of {model.name} on {device.name} meets TTFT p99 <= {ttft:g} s and "
            f"ITL p99 <= {itl:g} s even at a tiny load: the SLO is impossible for this hardware")
    # verify the fewest-GPU candidate; a failure adds 3 % replicas (at least one) to it, and
    # the next verification takes whichever candidate is then the fewest GPUs
    for _ in range(8):
        found.sort(key=lambda f: (f[0], f[1]))
        _, tp, replicas, cfg, rate = found[0]
        slice_n = min(k, replicas)
        result = run(cfg, slice_n, total_rate * slice_n / replicas, 2 * duration, SLO(ttft, itl),
                     search=False)
        passed = result.meets(ttft, itl)
        if log is not None:
            log(f"verify {replicas} replicas x TP{tp} (max_num_seqs {cfg[1]}, budget {cfg[2]}) "
                f"on a slice of {slice_n}: {'meets' if passed else 'misses'} the SLO")
        if passed:
            break
        more = max(replicas + 1, math.ceil(replicas * 1.03))
        found[0] = (more * tp, tp, more, cfg, rate)
    else:
        raise InfeasibleError("the plan failed its verification eight times; raise the margin")
    tp, seqs, budget = cfg
    return Plan(model.name, device.name, tpm, total_rate, replicas, tp, replicas * tp, seqs,
                budget, rate, rate * replicas / total_rate - 1, result, slice_n, tuple(searched),
                sims, time.perf_counter() - start)


def _guess(model: RooflineModel, workload: Workload, seqs: int) -> float:
    """A per-replica rate near saturation: ``seqs`` requests decoding at once, each holding
    its slot for its mean output length."""
    ctx = workload.prompt.mean() + workload.output.mean() / 2
    step = model.step_time(StepShape(0, seqs, int(seqs * ctx), seqs * ctx))
    return seqs / (workload.output.mean() * step)


def _bisect(ok: Callable[[float], bool], lo: float, guess: float, precision: float) -> float:
    """The largest rate (to ``precision``, relative) with ``ok``, knowing ``ok(lo)`` (or lo 0)."""
    hi = max(guess, lo * 1.5, 1e-3)
    while ok(hi):  # find a failing upper bound
        lo, hi = hi, hi * 2
        if hi > 1e7:
            return lo
    if lo == 0.0:
        probe = hi / 64
        if not ok(probe):
            return 0.0  # not even a tiny load meets the SLO
        lo = probe
    while hi - lo > precision * lo:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _scenario(model: ModelSpec, device: DeviceSpec, workload: Workload,
              cfg: tuple[int, int, int], replicas: int, rate: float, duration: float,
              warmup: float, seed: int, slo: SLO, routing: str) -> Scenario:
    tp, seqs, budget = cfg
    step_model = RooflineModel(model, device, tp=tp)
    rc = ReplicaConfig(count=replicas, max_num_seqs=seqs, max_num_batched_tokens=budget)
    num_blocks, max_len = fleet_sizes(rc, model, step_model)
    # a slice that falls far behind will never meet the SLO: stop a while after the arrivals
    return Scenario(workload.with_rate(rate), step_model, num_blocks, max_len, rc,
                    GatewayConfig(routing=routing), slo, duration, warmup, drain=duration / 2,
                    seed=seed, sample_interval=duration / 20, vocab_size=model.vocab_size,
                    model=model, device=device, tp=tp)
