"""The discrete-event simulator: arrivals, gateways, replicas and step completions on one
virtual clock. No threads, no sleeping: time jumps from event to event.

Each replica runs the real :class:`~servekit.sched.Scheduler` over a real
:class:`~servekit.kv.KVCacheManager`: a step is ``schedule()``, then the step-time model says
how long the GPU would take, then ``update()`` at that time with one (dummy) token per sampling
request, exactly as :meth:`servekit.engine.LLMEngine.step` drives them. Gateways route with the
real :class:`~servekit.route.Router` and admit with the real :class:`~servekit.limit.Limiter`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from typing import Any

import numpy as np

from servekit.limit.errors import InvalidCostError
from servekit.limit.limiter import Limiter
from servekit.route.policy import ReplicaLoad
from servekit.route.router import Router
from servekit.sched.errors import QueueFull
from servekit.sched.output import SchedulerOutput
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.sched.request import FinishReason
from servekit.sim.errors import SimConfigError
from servekit.sim.fleet import KVEventIndex, Replica, SimRequest, make_limiters, make_router
from servekit.sim.results import Record, SimResult, Timeline, in_window, summarize
from servekit.sim.scenario import Scenario
from servekit.sim.steptime import shape_of
from servekit.sim.workload import Arrival, Tenant

__all__ = ["Simulator", "arrival_trace", "simulate"]

# event kinds; at equal times they run in this order
_ARRIVAL, _CANCEL, _STEP, _RESUME, _SAMPLE = 0, 1, 2, 3, 4

#: ``observer(replica_name, now, output)``: called after each schedule(), before the step runs
StepObserver = Callable[[str, float, SchedulerOutput], None]


class _Session:
    __slots__ = ("gateway", "history", "id", "system", "tenant", "turn", "turns")

    def __init__(self, sid: str, tenant: Tenant, turns: int, gateway: int, system: int) -> None:
        self.id = sid
        self.tenant = tenant
        self.turns = turns
        self.turn = 0
        self.gateway = gateway
        self.system = system
        self.history: list[int] = []


class Simulator:
    """Runs one :class:`~servekit.sim.scenario.Scenario`; :meth:`run` returns the result."""

    def __init__(self, scenario: Scenario, *, observer: StepObserver | None = None,
                 give_up_after: int | None = None,
                 arrivals: Iterable[Arrival] | None = None) -> None:
        self.scenario = sc = scenario
        self.now = 0.0
        self.observer = observer
        # stop early once this many requests (warmup included: an overload shows there first)
        # missed the TTFT objective; a search only needs to know that the SLO fails
        self.give_up_after = give_up_after
        self.ttft_misses = 0
        self.stopped_early = False
        clock = self.clock
        n = sc.replicas.count
        names = [f"r{i}" for i in range(n)]
        self.index = KVEventIndex() if sc.gateways.cache_index else None
        self.replicas = {name: Replica(name, sc.replicas, sc.num_blocks, sc.max_model_len, clock,
                                       self.index) for name in names}
        self.routers: list[Router] = [
            make_router(sc.gateways, names, sc.seed * 1000 + g, clock, self.index)
            for g in range(sc.gateways.count)]
        self.limiters: dict[str, Limiter] = dict(make_limiters(sc.workload.tenants, clock))
        self.rng = np.random.default_rng([sc.seed, 1])
        # new sessions: the scenario's own draw, or a given trace (replayed elsewhere too)
        self._arrivals: Iterator[Arrival] = (_draw_arrivals(sc) if arrivals is None
                                             else iter(arrivals))
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = count()
        self._ids = count()
        self.records: list[Record] = []
        self._itl: dict[str, dict[float, int]] = {t.name: {} for t in sc.workload.tenants}
        self._itl_warmup: dict[float, int] = {}
        self.timeline = Timeline()
        self._outputs_in_window = 0
        wl = sc.workload
        self._systems = [self.rng.integers(0, sc.vocab_size, wl.system_prompt_tokens).tolist()
                         for _ in range(wl.system_prompts)]
        self._session_serial = count()
        self._model = sc.step_model
        self._frontend = sc.frontend

    def clock(self) -> float:
        """The simulated time (the parts' injected clock)."""
        return self.now

    # ------------------------------------------------------------------ the loop

    def run(self) -> SimResult:
        """Simulate until the arrivals end and the fleet drains (or ``drain`` seconds pass)."""
        sc = self.scenario
        self._next_arrival()
        self._push(0.0, _SAMPLE, None)
        end = sc.duration + sc.drain
        events = self._events
        pop = heapq.heappop
        while events and not self.stopped_early:
            t, kind, _, obj = pop(events)
            if t > end:
                break
            self.now = t
            if kind == _STEP:
                self._step_done(obj)
            elif kind == _ARRIVAL:
                if isinstance(obj, Arrival):
                    self._next_arrival()
                    self._start_session(obj)
                else:
                    self._submit(obj)
            elif kind == _CANCEL:
                self._cancel(obj)
            elif kind == _RESUME:
                self._resume(obj)
            else:
                self._sample()
                if events:  # anything left to happen (a busy replica has its step queued)
                    self._push(t + sc.sample_interval, _SAMPLE, None)
        return summarize(self)

    def _push(self, t: float, kind: int, obj: Any) -> None:
        heapq.heappush(self._events, (t, kind, next(self._seq), obj))

    def _next_arrival(self) -> None:
        a = next(self._arrivals, None)
        if a is not None:
            self._push(a.time, _ARRIVAL, a)

    # ------------------------------------------------------------------ requests

    def _start_session(self, a: Arrival) -> None:
        wl = self.scenario.workload
        tenant = wl.tenants[a.tenant]
        turns = wl.sessions.turns.sample(self.rng) if wl.sessions is not None else 1
        serial = next(self._session_serial)
        system = int(self.rng.integers(len(self._systems))) if self._systems else -1
        self._submit(_Session(f"s{serial}", tenant, turns, serial % len(self.routers), system))

    def _lengths(self, s: _Session) -> tuple[int, int]:
        wl, rng = self.scenario.workload, self.rng
        if s.turn > 0 and wl.sessions is not None:
            return wl.sessions.user_tokens.sample(rng), wl.output.sample(rng)
        if wl.paired_lengths:
            i = int(rng.integers(len(wl.prompt.values)))
            return wl.prompt.values[i], wl.output.values[i]
        return wl.prompt.sample(rng), wl.output.sample(rng)

    def _submit(self, s: _Session) -> None:
        sc, now = self.scenario, self.now
        user, max_tokens = self._lengths(s)
        prefix = s.history if s.turn > 0 else (self._systems[s.system] if s.system >= 0 else [])
        limit = sc.max_model_len
        if s.turn > 0 and len(prefix) + user + 1 > limit:
            return  # the conversation outgrew the context window: the session ends
        user = max(1, min(user, limit - 1 - len(prefix)))
        prompt = prefix + self.rng.integers(0, sc.vocab_size, user).tolist()
        max_tokens = max(1, min(max_tokens, limit - len(prompt)))
        tenant = s.tenant
        rid = f"q{next(self._ids)}"
        warm = now >= sc.warmup
        rec = Record(rid, tenant.name, now, len(prompt), max_tokens, s.turn,
                     self._itl[tenant.name] if warm else self._itl_warmup)
        self.records.append(rec)
        limiter = self.limiters.get(tenant.name)
        if limiter is not None:
            cost = {"requests": 1.0, "tokens": float(len(prompt) + max_tokens)}
            cost = {k: v for k, v in cost.items() if k in limiter.limits.names}
            try:
                decision = limiter.try_acquire(tenant.name, cost, reserve=True)
            except InvalidCostError:
                rec.end, rec.outcome = now, "rejected_rate_limit"
                return
            if not decision.allowed:
                rec.end, rec.outcome = now, "rejected_rate_limit"
                return
            rec.reservation = decision.reservation
        router = self.routers[s.gateway]
        route = router.route(session_id=s.id if sc.workload.sessions is not None else None,
                             token_ids=prompt, api_key=tenant.name, tenant=tenant.name)
        rep = self.replicas[route.node]
        rec.replica, rec.gateway, rec.session = route.node, s.gateway, s
        req = SimRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                         priority=tenant.priority, tenant=tenant.name, arrival_time=now, rec=rec)
        frontend = self._frontend
        if frontend is None:  # the engine alone: the request joins the scheduler at once
            if not self._add(rep, rec, req):
                return
        else:  # the front end admits it first, in the replica's time (see _resume)
            rep.pending.append((rec, req))
            if rep.busy:  # its admission runs beside the step in flight, charged at its end
                rep.uncharged += 1
            else:
                self._frontend_work(rep, frontend.per_request)
        wl = sc.workload
        if wl.cancel_probability and self.rng.random() < wl.cancel_probability:
            self._push(now + self.rng.exponential(wl.cancel_after), _CANCEL, rec)
        if frontend is None and not rep.busy:
            self._start_step(rep)

    def _add(self, rep: Replica, rec: Record, req: SimRequest) -> bool:
        """Add an admitted request to its replica's scheduler; False if it was rejected."""
        try:
            rep.sched.add_request(req)
        except (QueueFull, InvalidParameterError) as exc:
            self.routers[rec.gateway].release(rec.replica, None)
            self._settle(rec, 0)
            rec.end = self.now
            rec.outcome = ("rejected_queue_full" if isinstance(exc, QueueFull)
                           else "rejected_invalid")
            return False
        rep.requests += 1
        rec.request = req
        return True

    def _settle(self, rec: Record, used_output: int) -> None:
        if rec.reservation is not None:
            limiter = self.limiters[rec.tenant]
            used = {"requests": 1.0, "tokens": float(rec.prompt_len + used_output)}
            limiter.settle(rec.reservation, {k: v for k, v in used.items()
                                             if k in limiter.limits.names})
            rec.reservation = None

    def _cancel(self, rec: Record) -> None:
        if rec.outcome is not None:
            return
        req = rec.request
        rep = self.replicas[rec.replica]
        if req is None:  # still waiting for the front end to admit it
            rep.pending = [p for p in rep.pending if p[0] is not rec]
            self._close(rec, "cancelled", 0, None)
            return
        rep.sched.abort(rec.id)
        self._close(rec, "cancelled", req.num_output_tokens, None)

    def _close(self, rec: Record, outcome: str, n_out: int, success: bool | None,
               seen: float | None = None) -> None:
        """End a request; ``seen``: when the client saw its last token (default: now plus
        the front end's latency)."""
        rec.end = self.now + self.scenario.frontend_latency if seen is None else seen
        rec.outcome, rec.n_out = outcome, n_out
        self.routers[rec.gateway].release(rec.replica, success)
        self._settle(rec, n_out)
        req = rec.request
        if req is not None:
            rec.preemptions = req.num_preemptions
            rec.cached = req.num_cached_tokens
        s = rec.session
        rec.session = None
        rec.request = None  # the request (and its token list) is no longer needed
        if outcome == "finished" and s is not None and req is not None and s.turn + 1 < s.turns:
            s.turn += 1
            s.history = req.token_ids
            wl = self.scenario.workload
            think = wl.sessions.think_time if wl.sessions is not None else 0.0
            self._push(self.now + (self.rng.exponential(think) if think > 0 else 0.0),
                       _ARRIVAL, s)

    # ------------------------------------------------------------------ steps

    def _start_step(self, rep: Replica) -> None:
        out = rep.sched.schedule()
        for r in out.finished:  # deadlines (not used by the simulator's requests)
            self._close(r.rec, "cancelled", r.num_output_tokens, None)  # type: ignore[attr-defined]
        if not out.requests:
            rep.sched.update(out, [])
            rep.busy = False
            if rep.sched.has_unfinished_requests():
                raise SimConfigError("replicas", f"replica {rep.name} cannot schedule any of its "
                                     f"{rep.sched.num_unfinished} requests")
            return
        if self.observer is not None:
            self.observer(rep.name, self.now, out)
        rep.out = out
        rep.busy = True
        dt = self._model.step_time(shape_of(out))
        if not dt > 0 or math.isinf(dt):
            raise SimConfigError("step_model", f"step time must be finite and > 0, got {dt!r}")
        self._push(self.now + dt, _STEP, rep)

    def _step_done(self, rep: Replica) -> None:
        out = rep.out
        assert out is not None
        rep.out = None
        rep.steps += 1
        res = rep.sched.update(out, [0] * out.num_samples)
        # when the client sees this step's tokens: the front end streams them one by one
        now = seen_from = self.now + self.scenario.frontend_latency
        frontend = self._frontend
        per_token = frontend.per_token if frontend is not None else 0.0
        ttft_slo, warm_itl = self.scenario.slo.ttft, self._itl_warmup
        give_up = self.give_up_after is not None
        for r in res.requests:
            now += per_token
            rec = r.rec  # type: ignore[attr-defined]
            if rec.first < 0:
                rec.first = now
                if now - rec.arrival > ttft_slo and (give_up or rec.itl is not warm_itl):
                    self._missed()
            else:
                h = rec.itl
                iv = now - rec.last
                h[iv] = h.get(iv, 0) + 1
            rec.last = now
        sc = self.scenario
        if in_window(self.now, sc.warmup, sc.duration):
            self._outputs_in_window += len(res.requests)
        for r in res.finished:
            rec = r.rec  # type: ignore[attr-defined]
            if rec.outcome is None:
                reason = r.finish_reason
                ok = reason is FinishReason.STOP or reason is FinishReason.LENGTH
                self._close(rec, "finished" if ok else "cancelled", r.num_output_tokens,
                            True if ok else None,
                            None if frontend is None else max(rec.last, seen_from))
        if frontend is not None:  # stream the tokens and admit the arrivals, then step again
            rep.busy = False
            rep.cutoff = self.now
            self._frontend_work(rep, per_token * len(res.requests)
                                + frontend.per_request * rep.uncharged)
            rep.uncharged = 0
        elif rep.sched.has_unfinished_requests():
            self._start_step(rep)
        else:
            rep.busy = False

    # ------------------------------------------------------------------ the front end

    def _frontend_work(self, rep: Replica, seconds: float) -> None:
        """Charge ``seconds`` of front-end work to the replica's thread: after the step in
        flight (whose end charges it), else from now or the end of the work already queued."""
        if rep.busy:
            return
        if rep.fe_end < 0:
            rep.fe_end = self.now + seconds
            self._push(rep.fe_end, _RESUME, rep)
        else:
            rep.fe_end += seconds

    def _resume(self, rep: Replica) -> None:
        """The front end's work is done: the requests it admitted join the scheduler and the
        next step starts.

        A request's admission takes ``per_request`` seconds from its arrival, beside the step
        in flight (the server's event loop parses it while the step runs in a worker thread):
        one not admitted when that step ended misses the next step, as in the server, where
        the engine schedules the next step at once with the requests queued by then."""
        if self.now < rep.fe_end:  # more work was queued meanwhile
            self._push(rep.fe_end, _RESUME, rep)
            return
        rep.fe_end = -1.0
        cutoff = self.now if rep.cutoff < 0 else rep.cutoff
        rep.cutoff = -1.0
        cost = self._frontend.per_request if self._frontend is not None else 0.0
        pending, rep.pending = rep.pending, []
        for rec, req in pending:
            if rec.outcome is not None:
                continue
            if req.arrival_time + cost <= cutoff:
                self._add(rep, rec, req)
            else:
                rep.pending.append((rec, req))
        if rep.sched.has_unfinished_requests():
            self._start_step(rep)
        elif rep.pending:  # idle: the engine takes the next one as soon as it is admitted
            self._push(rep.pending[0][1].arrival_time + cost, _RESUME, rep)

    def _missed(self) -> None:
        self.ttft_misses += 1
        if self.give_up_after is not None and self.ttft_misses > self.give_up_after:
            self.stopped_early = True

    def _sample(self) -> None:
        sc = self.scenario
        for rep in self.replicas.values():  # each replica reports its load to every gateway
            # requests the front end has yet to admit are waiting too
            load = ReplicaLoad(rep.sched.num_running, rep.sched.num_waiting + len(rep.pending),
                               min(1.0, max(0.0, rep.kv.usage)))
            for router in self.routers:
                router.report_load(rep.name, load)
        if self.give_up_after is not None and math.isfinite(sc.slo.ttft):
            # requests still waiting for their first token past the objective count too
            late = sum(1 for r in self.records[-4096:] if r.first < 0 and r.outcome is None
                       and self.now - r.arrival > sc.slo.ttft)
            if late + self.ttft_misses > self.give_up_after:
                self.stopped_early = True
        reps = self.replicas.values()
        self.timeline.add(
            self.now,
            kv_usage=sum(r.kv.usage for r in reps) / len(self.replicas),
            kv_usage_max=max(r.kv.usage for r in reps),
            running=sum(r.sched.num_running for r in reps),
            waiting=sum(r.sched.num_waiting + len(r.pending) for r in reps),
            preemptions=sum(r.sched.num_preemptions for r in reps),
        )


def arrival_trace(scenario: Scenario) -> list[Arrival]:
    """The session starts the simulator draws for ``scenario`` (from its seed), in time order:
    replay them against a real server to compare both on the same arrivals."""
    return list(_draw_arrivals(scenario))


def _draw_arrivals(scenario: Scenario) -> Iterator[Arrival]:
    return scenario.workload.arrivals(np.random.default_rng([scenario.seed, 2]),
                                      scenario.duration)


def simulate(scenario: Scenario, *, observer: StepObserver | None = None,
             give_up_after: int | None = None,
             arrivals: Iterable[Arrival] | None = None) -> SimResult:
    """Run ``scenario`` once and summarise it (``give_up_after``: stop once more than this
    many measured requests missed the TTFT objective; the result then says
    ``stopped_early``; ``arrivals``: replay this trace of session starts instead of drawing
    the scenario's, e.g. :func:`arrival_trace` of another scenario)."""
    return Simulator(scenario, observer=observer, give_up_after=give_up_after,
                     arrivals=arrivals).run()
