"""Re-simulate recorded ``bench_sim.py --validate`` runs offline, without a server.

A validation run records the server's metrics per load and repeat, the fitted server profile
(``server_coefficients``), the front end's cost (``frontend``) and latency, and the rate of each
load; the arrival traces are the scenario's (``arrival_trace``, deterministic for a seed). This
script rebuilds each scenario as ``validate`` built it and simulates it again:

- ``serial``: the shipped front-end model (``FrontendCost`` charged between steps); for the
  latest run this reproduces the recorded simulator column;
- ``overlap (same fit)``: the same recorded coefficients, but a step takes
  ``max(profile(step), front-end work)``: the front end's work (streaming the previous step's
  tokens, admitting the requests that arrived during it) runs beside the step, not after it;
- ``overlap (refit)``: ``serial + max(forward(step), per_request * arrivals + per_token *
  tokens)``, the forward being the run's in-process engine profile and ``serial``,
  ``per_request`` and ``per_token`` fitted (:func:`fit_overlap`) to the cycles the run's
  profiling sweep logged. The in-process profile's coefficients are the run's
  ``engine_coefficients`` where the run recorded them; for older runs they are recovered from
  the simulator rows the run recorded with it (:func:`calibrate_forward`). The sweep's cycles
  are recovered from the run's fitted server profile (:func:`sweep_cycles`: the shapes a
  closed-loop sweep produces, timed as the serial model predicts them, i.e. the data's
  least-squares summary stands in for the data); newer runs keep the real ones in their step
  log (``step_log``, ``phases``), not used here yet.

``--speeds`` checks runs of the current harness (their step logs kept) at each load's measured
speed instead: ``speed_factors`` as ``bench_sim.py --validate`` applies it, one factor for steps
and front end together, the speed measured on the load before (``speed_factors_before``, which
set the load's rate in runs since l: a forecast made before the load ran), and
the sweep's profile as fitted (:func:`rescaled`).

It prints, per run and load, the server's medians over its repeats, its own spread (half the
range between its repeats, relative to their median) and each model's relative error. Output
throughput is counted two ways, as ``bench_sim.py --validate`` now records them:
``out_tok_per_s``, the tokens emitted within the load's duration (``tokens_in_window``), and
``sent_tok_per_s``, every token of the load's requests over the duration (the offered load).
Runs recorded before these fields counted the server's ``out_tok_per_s`` the second way, in
streamed chunks rather than tokens (a token whose text the detokenizer held back has no chunk
of its own: ~3 % fewer on the demo model), and kept no per-token times: their server figure is
shown as ``sent_tok_per_s`` and the first way is not known for the server.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sim import OUTPUT, PROMPT, _scenario, sim_row
from servekit.sched.output import StepShape
from servekit.sim.frontend import FrontendCost
from servekit.sim.simulator import _RESUME, Simulator, arrival_trace
from servekit.sim.steptime import ProfiledModel, features, nnls

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"c": "sim-validation-cpu-2026-12-06c.json", "d": "sim-validation-cpu-2026-12-06d.json"}
METRICS = ("ttft_p50", "ttft_p90", "itl_p50", "out_tok_per_s", "sent_tok_per_s", "goodput_rps")


# --------------------------------------------------------------------------- the overlap model

class _OverlapStep:
    """``serial + max(forward(shape), front-end work)``; the work is the simulator's, set
    before each step starts."""

    def __init__(self, forward: ProfiledModel, serial: float) -> None:
        self.forward = forward
        self.serial = serial
        self.work = 0.0

    def step_time(self, shape: StepShape) -> float:
        return self.serial + max(self.forward.step_time(shape), self.work)


class OverlapSimulator(Simulator):
    """The simulator with the front end's work after a step overlapping the next step: the
    next step starts at once (with the requests admitted by the step's end, as before), and
    takes ``serial + max(forward, work)``. An idle replica still admits a request first."""

    def __init__(self, scenario: Any, *, forward: ProfiledModel, serial: float,
                 arrivals: Any = None) -> None:
        super().__init__(scenario, arrivals=arrivals)
        self._step = _OverlapStep(forward, serial)
        self._model = self._step
        self._work: dict[str, float] = {}

    def _start_step(self, rep: Any) -> None:
        self._step.work = self._work.pop(rep.name, 0.0)
        super()._start_step(rep)

    def _frontend_work(self, rep: Any, seconds: float) -> None:
        if not rep.busy and rep.cutoff >= 0 and rep.fe_end < 0:  # at a step's end
            self._work[rep.name] = seconds
            rep.fe_end = self.now
            self._push(self.now, _RESUME, rep)
            return
        super()._frontend_work(rep, seconds)

    def _resume(self, rep: Any) -> None:
        if rep.busy:  # a stale wake-up: the step's end admits the pending requests
            return
        super()._resume(rep)
        if not rep.busy:  # idle: the streaming ended before any next step
            self._work.pop(rep.name, None)


def fit_overlap(x: np.ndarray, z: np.ndarray, y: np.ndarray, *,
                forward: np.ndarray | None = None,
                iterations: int = 50) -> tuple[float, np.ndarray, np.ndarray]:
    """Fit ``y ~ s + max(x @ beta, z @ gamma)`` (all coefficients >= 0) by alternating: each
    cycle is assigned to the regime whose term is larger, and the coefficients are refitted by
    non-negative least squares on the assignment, until it stops changing. ``forward``: the
    forward term's values, fixed (then only ``s`` and ``gamma`` are fitted). Returns ``(s,
    beta, gamma)``; several starting assignments are tried and the best fit kept."""
    n = len(y)
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    order = np.argsort(z.sum(axis=1))
    for share in (0.0, 0.25, 0.5, 0.75):
        g_bound = np.zeros(n, dtype=bool)
        g_bound[order[int(n * (1 - share)):]] = True
        for _ in range(iterations):
            ones = np.ones((n, 1))
            gz = z * g_bound[:, None]
            if forward is None:
                fx = x * ~g_bound[:, None]
                coef = nnls(np.hstack([ones, fx, gz]), y)
                s, beta, gamma = coef[0], coef[1:1 + x.shape[1]], coef[1 + x.shape[1]:]
                f_val = x @ beta
            else:
                coef = nnls(np.hstack([ones, gz]), y - forward * ~g_bound)
                s, beta, gamma = coef[0], np.zeros(x.shape[1]), coef[1:]
                f_val = forward
            new = z @ gamma > f_val
            if (new == g_bound).all():
                break
            g_bound = new
        sse = float(((y - s - np.maximum(f_val, z @ gamma)) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(s), beta, gamma)
    assert best is not None
    return best[1], best[2], best[3]


def sweep_cycles(profile: ProfiledModel, fe: FrontendCost,
                 seconds_per_level: float = 8.0,
                 seed: int = 7) -> tuple[list[StepShape], np.ndarray, np.ndarray, np.ndarray]:
    """The busy cycles ``validate``'s profiling sweep logs (closed loop at 1, 2, 4, 8, 16
    streams; prompts of 8-127 tokens, outputs of 8-63), each timed as ``profile`` and ``fe``
    (the serial model) predict: shapes, arrivals, tokens streamed, seconds."""
    rng = np.random.default_rng(seed)
    shapes: list[StepShape] = []
    arrivals: list[int] = []
    streamed: list[int] = []
    seconds: list[float] = []

    def new() -> list[int]:  # [prompt, output wanted, generated]
        return [int(rng.integers(8, 2 * PROMPT)), int(rng.integers(8, 2 * OUTPUT)), -1]

    for level in (1, 2, 4, 8, 16):
        running = [new() for _ in range(level)]
        queued: list[list[int]] = []  # sent during the last cycle: prefilled next step
        prev_out, clock = level, 0.0
        while clock < seconds_per_level:
            prefill = decodes = kv = 0
            pairs = 0.0
            for r in running:
                if r[2] < 0:
                    prefill += r[0]
                    kv += r[0]
                    pairs += r[0] * (r[0] + 1) / 2
                else:
                    decodes += 1
                    kv += r[0] + r[2] + 1
                    pairs += r[0] + r[2] + 1
            shape = StepShape(prefill, decodes, kv, pairs)
            arrived = len(queued)
            dt = profile.step_time(shape) + fe.per_request * arrived + fe.per_token * prev_out
            shapes.append(shape)
            arrivals.append(arrived)
            streamed.append(prev_out)
            seconds.append(dt)
            clock += dt
            prev_out = len(running)
            for r in running:
                r[2] += 1
            done = [r for r in running if r[2] + 1 >= r[1]]
            running = [r for r in running if r[2] + 1 < r[1]] + queued
            queued = [new() for _ in done]  # the client sends the next one at once
    return shapes, np.array(arrivals, float), np.array(streamed, float), np.array(seconds)


# --------------------------------------------------------------------------- re-simulation

def _row(sim: Simulator) -> dict[str, Any]:
    return sim_row(sim.run(), sim.scenario.duration)


def server_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's server rows, with the throughput named as ``validate`` now records it (before,
    ``out_tok_per_s`` counted every token of the load's requests: ``sent_tok_per_s``)."""
    rows = [r for r in doc["rows"] if r["source"] == "server"]
    return [r if "sent_tok_per_s" in r else {**r, "sent_tok_per_s": r["out_tok_per_s"],
                                               "out_tok_per_s": None} for r in rows]


def _run_models(sim_cls: Any, **kw: Any) -> Any:
    def run(sc: Any, trace: Any) -> dict[str, Any]:
        return _row(sim_cls(sc, arrivals=trace, **kw))
    return run


def _meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc["server_profile"][k] for k in ("num_blocks", "max_model_len", "vocab_size")}


def calibrate_forward(doc: dict[str, Any], duration: float = 40.0,
                      iterations: int = 6) -> tuple[ProfiledModel, dict[str, Any]]:
    """The run's in-process engine profile, whose coefficients were not recorded, recovered
    from what was: the simulator's rows with it (``sim (in-process profile)``). A profile
    ``c0 + c1 * prefill_tokens + c2 * decodes`` is solved (Newton, finite differences) for
    that column's light-load ITL and TTFT p50 and overloaded ITL p50, medians over repeats."""
    meta = _meta(doc)
    latency = doc["steps_only_latency"]
    recorded = [r for r in doc["rows"] if r["source"] == "sim (in-process profile)"]
    targets = (("light", "itl_p50"), ("light", "ttft_p50"), ("overloaded", "itl_p50"))

    def measure(c: np.ndarray) -> np.ndarray:
        prof = ProfiledModel([c[0], c[1], c[2], 0.0, 0.0])
        got = {}
        for load in ("light", "overloaded"):
            vals: dict[str, list[float]] = {"itl_p50": [], "ttft_p50": []}
            for row in recorded:
                if row["load"] != load:
                    continue
                sc = _scenario(prof, meta, row["rate"], duration, 1 + row["repeat"], latency)
                res = _row(Simulator(sc, arrivals=arrival_trace(sc)))
                for k in vals:
                    vals[k].append(res[k])
            for k, v in vals.items():
                got[load, k] = statistics.median(v)
        return np.array([got[t] for t in targets])

    want = np.array([statistics.median(r[m] for r in recorded if r["load"] == ld)
                     for ld, m in targets])
    c = np.array([want[0] * 0.8, 3e-5, want[0] * 0.05])
    for _ in range(iterations):
        base = measure(c)
        jac = np.column_stack([(measure(c + d) - base) / d[i]
                               for i, d in enumerate(np.diag(c * 0.05))])
        c = np.maximum(c + np.linalg.solve(jac, want - base), 1e-7)
    got = measure(c)
    return ProfiledModel([*c.tolist(), 0.0, 0.0]), {
        "targets": [f"{ld} {m}" for ld, m in targets], "recorded": want.tolist(),
        "reproduced": got.tolist()}


def resimulate(name: str, doc: dict[str, Any], duration: float = 40.0) -> dict[str, Any]:
    meta = _meta(doc)
    fe = FrontendCost(**doc["frontend"])
    profile = ProfiledModel(doc["server_coefficients"], frontend=fe)
    latency = doc["frontend_latency"]
    if "engine_coefficients" in doc:
        forward = ProfiledModel(doc["engine_coefficients"])
        calibration: dict[str, Any] = {"recorded": True}
    else:
        forward, calibration = calibrate_forward(doc, duration)
    shapes, arr, streamed, secs = sweep_cycles(profile, fe)
    x = np.array([features(s) for s in shapes])
    z = np.column_stack([arr, streamed])
    serial, _, (per_request, per_token) = fit_overlap(
        x, z, secs, forward=np.array([forward.step_time(s) for s in shapes]))
    pred = serial + np.maximum([forward.step_time(s) for s in shapes],
                               per_request * arr + per_token * streamed)
    fit = {"serial": serial, "per_request": per_request, "per_token": per_token,
           "forward": list(forward.coefficients), "forward_calibration": calibration,
           "sweep_cycles": len(secs),
           "r2_vs_serial_model": 1 - float(((secs - pred) ** 2).sum()
                                           / ((secs - secs.mean()) ** 2).sum())}
    refit_fe = FrontendCost(per_request, per_token)
    models = {
        "serial": (_run_models(Simulator), profile, fe, latency),
        "overlap (same fit)": (_run_models(OverlapSimulator, forward=profile, serial=0.0),
                               profile, fe, latency),
        "overlap (refit)": (_run_models(OverlapSimulator, forward=forward, serial=serial),
                            forward, refit_fe, latency),
    }
    rows = []
    for row in server_rows(doc):
        rows.append(row)
        for model, (run, prof, cost, lat) in models.items():
            sc = _scenario(prof, meta, row["rate"], duration, 1 + row["repeat"], lat, cost,
                           doc.get("max_waiting"))  # recorded since the bound was set
            rows.append({"load": row["load"], "repeat": row["repeat"], "source": model,
                         "rate": row["rate"], **run(sc, arrival_trace(sc))})
    recorded = [r for r in doc["rows"] if r["source"] == "sim"]
    return {"run": name, "rows": rows, "overlap_fit": fit, "recorded_sim": recorded,
            "models": list(models)}


RESCALINGS = ("two factors", "one factor", "previous load's speed", "sim")


def rescaled(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A run of the current harness (a kept step log, ``phases``) checked up to four ways: the
    server profile rescaled to each load's measured speed by ``speed_factors`` (steps and front
    end apart, as ``bench_sim.py --validate`` does since 2026-12-07 02:15), by one factor for
    both (the cycles' measured time over the predicted, the first version), to the speed
    measured on the load before (runs that recorded ``speed_factors_before``), and as fitted on
    the sweep (the run's own ``sim`` rows)."""
    from bench_sim import _validation_summary
    from servekit.sim.profile import speed_factors, step_log_cycles

    logged = step_log_cycles(path.parent / doc["step_log"])
    assert logged is not None  # the current harness's logs have the cycle fields
    duration = doc.get("duration", 40.0)  # recorded since 2026-12-07 03:40; 40 s before
    profile = ProfiledModel(doc["server_coefficients"],
                            frontend=FrontendCost(**doc["frontend"]))
    rows = [r for r in doc["rows"] if r["source"] in ("server", "sim")]
    factors = []
    for phase in doc["phases"][1:]:
        cycles = logged.window(phase["start"], phase["end"])
        steps, frontend = cycles.predicted(profile)
        one = sum(cycles.seconds) / float((steps + frontend).sum())
        two = speed_factors(profile, cycles)
        factors.append({"load": phase["phase"], "repeat": phase["repeat"], "one": one,
                        "two": list(two)})
        rate = next(r["rate"] for r in rows if r["load"] == phase["phase"]
                    and r["repeat"] == phase["repeat"])
        scalings = [("two factors", profile.scaled(*two)), ("one factor", profile.scaled(one))]
        if "speed_factors_before" in phase:  # adaptive-rate runs: a prediction, not a fit
            scalings.append(("previous load's speed",
                             profile.scaled(*phase["speed_factors_before"])))
        for source, scaled in scalings:
            sc = _scenario(scaled, _meta(doc), rate, duration, 1 + phase["repeat"],
                           doc["frontend_latency"], scaled.frontend, doc.get("max_waiting"))
            rows.append({"load": phase["phase"], "repeat": phase["repeat"], "rate": rate,
                         "source": source, **_row(Simulator(sc, arrivals=arrival_trace(sc)))})
    return {"run": path.name, "factors": factors,
            "checks": {source: _validation_summary(rows, source) for source in RESCALINGS
                       if any(r["source"] == source for r in rows)}}


def table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per load and metric: the server's median and spread (None where not recorded), each
    model's value and its error against the server."""
    rows = result["rows"]
    out = []
    for load in dict.fromkeys(r["load"] for r in rows):
        for metric in METRICS:
            server = [r[metric] for r in rows if r["load"] == load and r["source"] == "server"]
            med = None if None in server else statistics.median(server)
            line: dict[str, Any] = {
                "run": result["run"], "load": load, "metric": metric, "server": med,
                "server_repeats": server,
                "server_spread": None if med is None else (max(server) - min(server)) / 2 / med}
            for model in result["models"]:
                sim = statistics.median(r[metric] for r in rows
                                        if r["load"] == load and r["source"] == model)
                line[model] = sim
                line[f"{model} error"] = None if med is None else (sim - med) / med
            out.append(line)
    return out


def _format(line: dict[str, Any], models: list[str]) -> str:
    unit = 1e3 if line["metric"].startswith(("ttft", "itl")) else 1.0

    def cell(value: float | None, error: float | None) -> str:
        if value is None:
            return f"{'not recorded':>9}"
        return f"{value * unit:9.4g}" + ("" if error is None else f" ({error:+.1%})")

    server = ("server " + cell(line["server"], None)
              + ("" if line["server_spread"] is None else f" (spread {line['server_spread']:.0%})"))
    cells = "  ".join(f"{m} {cell(line[m], line[f'{m} error'])}" for m in models)
    return f"{line['load']:<16}{line['metric']:<15}{server:<33}{cells}"


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="*", default=list(RUNS),
                        help=f"recorded runs ({', '.join(RUNS)}) or paths of --validate JSONs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--speeds", action="store_true",
                        help="check runs of the current harness (paths of --validate JSONs "
                        "with their step logs) at each load's measured speed, the speed "
                        "before it and the sweep's")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.speeds:
        checked = []
        for name in args.runs:
            path = Path(name)
            result = rescaled(json.loads(path.read_text()), path)
            checked.append(result)
            print(f"\n{result['run']}")
            for source, checks in result["checks"].items():
                worst = max(checks.items(), key=lambda kv: kv[1]["error"] / kv[1]["tolerance"])
                missed = [f"{k} {v['error']:.1%}" for k, v in checks.items() if not v["holds"]]
                print(f"  {source:<12} {sum(v['holds'] for v in checks.values())} of "
                      f"{len(checks)} hold; largest {worst[0]} {worst[1]['error']:.1%}"
                      + (f"; missed: {', '.join(missed)}" if missed else ""))
        if args.json is not None:
            args.json.write_text(json.dumps({"load_average": list(load), "results": checked},
                                            indent=1) + "\n")
        return
    results, lines = [], []
    for name in args.runs:
        doc = json.loads((RESULTS / RUNS[name] if name in RUNS else Path(name)).read_text())
        result = resimulate(name, doc)
        results.append(result)
        fit = result["overlap_fit"]
        print(f"\nrun {name}: overlap refit serial {fit['serial'] * 1e3:.2f} ms, per request "
              f"{fit['per_request'] * 1e3:.2f} ms, per token {fit['per_token'] * 1e3:.3f} ms, "
              f"r2 vs the serial model's sweep cycles {fit['r2_vs_serial_model']:.3f}; forward "
              f"{[round(c * 1e3, 4) for c in fit['forward']]} ms, {fit['forward_calibration']}")
        replayed = [r for r in result["rows"] if r["source"] == "serial"]
        same = all(abs(r[m] - s[m]) < 1e-12 for r, s in zip(replayed, result["recorded_sim"],
                                                             strict=True)
                   for m in ("ttft_p50", "itl_p50", "out_tok_per_s"))
        print(f"  serial re-simulation reproduces the recorded simulator rows: {same}")
        for line in table(result):
            lines.append(line)
            print("  " + _format(line, result["models"]))
    if args.json is not None:
        args.json.write_text(json.dumps({"load_average": list(load),
                                         "results": results, "table": lines},
                                        indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
