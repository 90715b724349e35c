"""``servekit sim profile``: measure this machine's engine and fit a :class:`ProfiledModel`.

Two sources of measured steps:

- :func:`profile_engine` runs an ``LLMEngine`` in-process (torch is imported only then) over a
  workload that sweeps the batch from one request to ``max_num_seqs`` with mixed prompt lengths,
  so the fit sees pure-decode and mixed prefill steps.
- :func:`profile_step_log` fits the steps a running server recorded with the ``step_log`` hook
  (``servekit serve --hook 'step_log:{"path": "steps.jsonl"}'``): the engine measured through
  the server, as it serves, with its HTTP work competing for the same cores. A log that
  records the front end's work (``arrivals``, ``output_tokens``) is fitted as cycles, one
  step's end to the next, with the front end's cost (:func:`step_log_cycles`).
"""

from __future__ import annotations

import gzip
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from servekit.sim.errors import SimConfigError
from servekit.sim.frontend import FrontendCost
from servekit.sim.steptime import (
    ProfiledModel,
    StepShape,
    fit_profile,
    fit_with_frontend,
    nnls,
    shape_of,
)

_STEP_LOG_KEYS = ("prefill_tokens", "num_decodes", "kv_tokens", "attention_pairs", "duration")
_CYCLE_KEYS = ("time", "num_running", "num_waiting", "arrivals", "output_tokens")

__all__ = ["Cycles", "measure_engine", "profile_engine", "profile_step_log", "read_step_log",
           "speed_factors", "step_log_cycles"]


def measure_engine(engine: Any, *, max_num_seqs: int, steps: int, seed: int = 0,
                   warmup: int = 10) -> tuple[list[StepShape], list[float]]:
    """Run ``engine`` (an :class:`~servekit.engine.LLMEngine`) for ``steps`` timed steps over
    a sweep of concurrencies; the shape and wall seconds of each."""
    from servekit.sched.params import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = engine.vocab_size
    max_len = engine.max_model_len
    levels = [c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256) if c <= max_num_seqs]
    per_level = max(1, (steps + warmup) // len(levels))
    shapes: list[StepShape] = []
    seconds: list[float] = []
    done = 0
    for level in levels:
        for _ in range(per_level):
            while engine.num_unfinished_requests < level:
                prompt_len = int(rng.integers(4, max(5, max_len // 4)))
                out_len = int(rng.integers(8, max(9, min(128, max_len - prompt_len - 1))))
                engine.add_request(rng.integers(0, vocab, prompt_len).tolist(),
                                   SamplingParams(max_tokens=out_len, temperature=0.0,
                                                  ignore_eos=True))
            t0 = time.perf_counter()
            plan = engine.schedule()
            sampled = engine.execute(plan)
            engine.finish(plan, sampled)
            dt = time.perf_counter() - t0
            done += 1
            if done > warmup and plan.out.requests:
                shapes.append(shape_of(plan.out))
                seconds.append(dt)
    engine.abort_all()
    return shapes, seconds


def profile_engine(model: str | Path | None = None, *, device: str = "cpu",
                   max_num_seqs: int = 32, max_num_batched_tokens: int = 512, steps: int = 400,
                   seed: int = 0) -> ProfiledModel:
    """Load the engine on ``model`` (default: the bundled demo model), measure ``steps`` steps
    and fit a profile (its ``meta`` records the machine, the config and the fit quality)."""
    from importlib.resources import files

    import torch

    from servekit.engine import EngineConfig, LLMEngine

    path = Path(model) if model is not None else Path(str(files("servekit") / "demo_model"))
    if not path.is_dir():
        raise SimConfigError("--model", f"{str(path)!r} is not a model directory")
    if steps < 20:
        raise SimConfigError("--steps", f"must be >= 20, got {steps}")
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          device=device)
    engine = LLMEngine(str(path), config=config)
    shapes, seconds = measure_engine(engine, max_num_seqs=max_num_seqs, steps=steps, seed=seed)
    return _fit_with_quality(shapes, seconds, {
        "source": "engine", "model": str(path), "device": device, "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "num_blocks": engine.runner.num_blocks, "block_size": config.block_size,
        "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    })


def _records(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a ``step_log`` file (gzip-compressed if its name ends in ``.gz``, as
    ``bench_sim.py --validate`` keeps them), each checked for the step's shape keys."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().splitlines()
        else:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:  # a gzip error has no strerror
        raise SimConfigError("--step-log",
                             f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = "not a JSON object"
        try:
            step = json.loads(line)
        except ValueError as exc:
            step, problem = None, str(exc)
        if isinstance(step, dict):
            missing = [key for key in _STEP_LOG_KEYS if key not in step]
            if not missing:
                records.append(step)
                continue
            problem = f"no {missing[0]!r}"
        raise SimConfigError("--step-log", f"{path}:{number} is not a step record "
                             f"with {', '.join(_STEP_LOG_KEYS)}: {problem}")
    return records


def _shape(step: dict[str, Any]) -> StepShape:
    return StepShape(int(step["prefill_tokens"]), int(step["num_decodes"]),
                     int(step["kv_tokens"]), float(step["attention_pairs"]))


def read_step_log(path: str | Path) -> tuple[list[StepShape], list[float]]:
    """The shapes and durations of the steps in a ``step_log`` file (empty steps skipped)."""
    steps = [s for s in _records(path) if s["prefill_tokens"] or s["num_decodes"]]
    return [_shape(s) for s in steps], [float(s["duration"]) for s in steps]


class Cycles:
    """A step log as engine cycles, each from one step's end to the next one's: the step's
    ``shapes``, the ``arrivals`` (requests added in the cycle), the tokens ``streamed`` (the
    previous step's output, written out during the cycle), the cycle's wall ``seconds`` and
    when it ended (``ends``, the log's ``time`` clock: ``time.monotonic``)."""

    def __init__(self) -> None:
        self.shapes: list[StepShape] = []
        self.arrivals: list[int] = []
        self.streamed: list[int] = []
        self.seconds: list[float] = []
        self.ends: list[float] = []

    def window(self, start: float, end: float) -> Cycles:
        """The cycles that ended within ``[start, end]``, e.g. one load of a longer run."""
        part = Cycles()
        for i, at in enumerate(self.ends):
            if start <= at <= end:
                part.shapes.append(self.shapes[i])
                part.arrivals.append(self.arrivals[i])
                part.streamed.append(self.streamed[i])
                part.seconds.append(self.seconds[i])
                part.ends.append(at)
        return part

    def predicted(self, profile: ProfiledModel) -> tuple[np.ndarray, np.ndarray]:
        """The seconds ``profile`` predicts for each cycle: its step's, and its front end's
        work (admitting the cycle's arrivals, streaming the previous step's tokens; zeros for
        a profile without a front-end cost)."""
        fe = profile.frontend or FrontendCost()
        steps = np.array([profile.step_time(s) for s in self.shapes], dtype=np.float64)
        frontend = np.array([fe.per_request * a + fe.per_token * k
                             for a, k in zip(self.arrivals, self.streamed, strict=True)],
                            dtype=np.float64)
        return steps, frontend


def step_log_cycles(path: str | Path) -> Cycles | None:
    """The busy cycles of a ``step_log`` file; None for a log without the front end's fields
    (``arrivals``, ``output_tokens``: written by servekit since the front-end cost model).

    A cycle counts only when the engine had work left after the previous step (otherwise it
    waited, idle, for an arrival) and its step did work."""
    records = _records(path)
    if not records or any(key not in s for s in records for key in _CYCLE_KEYS):
        return None
    cycles = Cycles()
    for prev, step in itertools.pairwise(records):
        if not (prev["num_running"] or prev["num_waiting"]):
            continue
        if not (step["prefill_tokens"] or step["num_decodes"]):
            continue
        cycles.shapes.append(_shape(step))
        cycles.arrivals.append(int(step["arrivals"]))
        cycles.streamed.append(int(prev["output_tokens"]))
        cycles.seconds.append(float(step["time"]) - float(prev["time"]))
        cycles.ends.append(float(step["time"]))
    return cycles


def speed_factors(profile: ProfiledModel, cycles: Cycles) -> tuple[float, float]:
    """How much longer than ``profile`` predicts the ``cycles``' steps and their front-end work
    took: ``(step, frontend)``, the non-negative least-squares weights of the two predicted
    parts of each cycle's time (> 1: slower than when the profile was fitted). A profile
    without a front-end cost, or cycles with no front-end work, get the step's factor for
    both. ``profile.scaled(*factors)`` is the profile at those speeds."""
    steps, frontend = cycles.predicted(profile)
    if not cycles.seconds or steps.sum() <= 0:
        raise SimConfigError("cycles", "no busy cycles to compare the profile with")
    seconds = np.asarray(cycles.seconds, dtype=np.float64)
    if frontend.sum() <= 0:
        step = float(seconds.sum() / steps.sum())
        return step, step
    step, front = nnls(np.column_stack([steps, frontend]), seconds)
    if step <= 0:
        raise SimConfigError("cycles", "the cycles leave the profile's steps no time")
    return float(step), float(front) if front > 0 else float(step)


def profile_step_log(path: str | Path, *, meta: dict[str, Any] | None = None) -> ProfiledModel:
    """Fit a profile to the steps a server recorded with the ``step_log`` hook; ``meta`` (the
    server's configuration: ``num_blocks``, ``max_model_len``, ``vocab_size``...) is kept.

    A log with the front end's fields is fitted as busy cycles (:func:`step_log_cycles`),
    with the front end's cost, which the profile then carries (``frontend``); an older log is
    fitted on its steps' durations alone."""
    meta = {"source": "step_log", "step_log": str(path), **(meta or {})}
    cycles = step_log_cycles(path)
    if cycles is None:
        shapes, seconds = read_step_log(path)
        return _fit_with_quality(shapes, seconds, meta)
    return _fit_with_quality(cycles.shapes, cycles.seconds, meta, cycles)


def _fit_with_quality(shapes: list[StepShape], seconds: list[float], meta: dict[str, Any],
                      cycles: Cycles | None = None) -> ProfiledModel:
    """Fit, and record the fit's quality and the machine in the profile's ``meta``."""
    import os
    import platform

    if cycles is None:
        fitted = fit_profile(shapes, seconds)
        pred = np.array([fitted.step_time(s) for s in shapes])
    else:
        fitted = fit_with_frontend(shapes, cycles.arrivals, cycles.streamed, seconds)
        steps, frontend = cycles.predicted(fitted)
        pred = steps + frontend
    y = np.array(seconds)
    r2 = 1 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    meta = {**meta, "steps": len(shapes), "fitted_on": "steps" if cycles is None else "cycles",
            "r2": r2,
            "median_abs_error": float(np.median(np.abs(y - pred))),
            "median_step": float(np.median(y)), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version()}
    return ProfiledModel(fitted.coefficients, meta=meta, frontend=fitted.frontend)
