"""``servekit sim`` and ``servekit plan``: run a scenario, profile this machine's engine,
plan a fleet. Called from :mod:`servekit.server.cli` (argv after the subcommand name)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servekit.sim.errors import InfeasibleError, SimConfigError

__all__ = ["main", "plan_main", "sim_main"]


def sim_main(argv: Sequence[str]) -> int:
    """``servekit sim SCENARIO.toml [--json PATH] [--plot PATH]`` or
    ``servekit sim profile --model PATH --out PROFILE.json``."""
    argv = list(argv)
    if argv and argv[0] == "profile":
        return _profile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="servekit sim",
                                     description="simulate one scenario (see docs/sim.md); "
                                     "'servekit sim profile --model PATH' measures this "
                                     "machine's engine")
    parser.add_argument("scenario", type=Path, help="scenario TOML file")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a PNG of latencies and KV usage (servekit[sim])")
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--duration", type=float, default=None,
                        help="override the scenario's duration (seconds)")
    args = parser.parse_args(argv)
    from servekit.sim.scenario import load_scenario
    from servekit.sim.simulator import simulate

    try:
        scenario = load_scenario(args.scenario)
        if args.seed is not None or args.duration is not None:
            import attrs

            scenario = attrs.evolve(
                scenario, seed=scenario.seed if args.seed is None else args.seed,
                duration=scenario.duration if args.duration is None else args.duration)
        result = simulate(scenario)
    except SimConfigError as exc:
        print(f"servekit sim: error: {exc}", file=sys.stderr)
        return 2
    print(result.format())
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2, default=_json) + "\n")
    if args.plot is not None:
        from servekit.sim.plot import plot_result

        plot_result(result, args.plot, title=str(args.scenario.name))
    return 0


def plan_main(argv: Sequence[str]) -> int:
    """``servekit plan --model M --device D --tokens-per-minute N --ttft-p99 S --itl-p99 S
    --workload chat``."""
    parser = argparse.ArgumentParser(prog="servekit plan",
                                     description="the fewest GPUs that serve N tokens/min "
                                     "within an SLO (simulated with the real scheduler)")
    parser.add_argument("--model", required=True, help="built-in model name or a TOML spec")
    parser.add_argument("--device", required=True, help="built-in device name or a TOML spec")
    parser.add_argument("--tokens-per-minute", type=float, required=True,
                        help="prompt + output tokens per minute to serve")
    parser.add_argument("--ttft-p99", type=float, required=True, help="seconds")
    parser.add_argument("--itl-p99", type=float, required=True, help="seconds")
    parser.add_argument("--workload", default="chat",
                        help="preset (chat, rag, batch) or a TOML file with a [workload] table")
    parser.add_argument("--tp", type=_ints, default=(1, 2, 4, 8),
                        help="tensor-parallel degrees to try (comma-separated)")
    parser.add_argument("--max-num-seqs", type=_ints, default=(256, 128))
    parser.add_argument("--max-num-batched-tokens", type=_ints, default=(2048, 512))
    parser.add_argument("--slice", type=int, default=4, help="replicas simulated per trial")
    parser.add_argument("--duration", type=float, default=40.0,
                        help="simulated seconds per trial (the verification runs twice this)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="search against the SLO scaled by 1 - margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from servekit.sim.planner import plan_capacity
    from servekit.sim.specs import device_spec, model_spec
    from servekit.sim.workload import workload_from_dict

    try:
        model = model_spec(_spec(args.model, "model"), "--model")
        device = device_spec(_spec(args.device, "device"), "--device")
        workload = workload_from_dict(_workload(args.workload), "--workload")
        plan = plan_capacity(
            model, device, workload, tokens_per_minute=args.tokens_per_minute,
            ttft_p99=args.ttft_p99, itl_p99=args.itl_p99, tp_options=args.tp,
            max_num_seqs_options=args.max_num_seqs,
            token_budget_options=args.max_num_batched_tokens, slice_replicas=args.slice,
            duration=args.duration, margin=args.margin, seed=args.seed,
            log=None if args.quiet else lambda m: print(m, file=sys.stderr))
    except (SimConfigError, InfeasibleError) as exc:
        print(f"servekit plan: error: {exc}", file=sys.stderr)
        return 2
    print(plan.format())
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_dict(), indent=2, default=_json) + "\n")
    return 0


def _profile_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="servekit sim profile",
                                     description="measure this machine's engine step times and "
                                     "fit a profiled step-time model")
    parser.add_argument("--model", type=Path, default=None,
                        help="local model directory (default: the bundled demo model)")
    parser.add_argument("--out", type=Path, default=Path("profile.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400, help="engine steps to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-log", type=Path, default=None,
                        help="fit the steps a server recorded with the step_log hook instead of "
                        "running the engine here")
    args = parser.parse_args(argv)
    from servekit.sim.profile import profile_engine, profile_step_log

    try:
        if args.step_log is not None:
            model = profile_step_log(args.step_log)
        else:
            model = profile_engine(args.model, device=args.device,
                                   max_num_seqs=args.max_num_seqs,
                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                   steps=args.steps, seed=args.seed)
    except SimConfigError as exc:
        print(f"servekit sim profile: error: {exc}", file=sys.stderr)
        return 2
    model.save(args.out)
    meta = model.meta
    fe = model.frontend
    front = ("" if fe is None else f"; front end {fe.per_request * 1e3:.3f} ms per request, "
             f"{fe.per_token * 1e3:.3f} ms per streamed token")
    print(f"measured {meta['steps']} {'steps' if fe is None else 'cycles'}; fit r2 "
          f"{meta['r2']:.3f}, median abs error {meta['median_abs_error'] * 1e3:.2f} ms"
          f"{front}; wrote {args.out}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _spec(value: str, kind: str) -> str | dict[str, Any]:
    if value.endswith(".toml"):
        from servekit.sim._toml import load_toml

        return load_toml(value, f"--{kind}")
    return value


def _workload(value: str) -> dict[str, object]:
    if value.endswith(".toml"):
        from servekit.sim._toml import load_toml

        data = load_toml(value, "--workload")
        wl = data.get("workload", data)
        if not isinstance(wl, dict):
            raise SimConfigError("--workload", "needs a [workload] table")
        return {"rate": 1.0, **wl}
    return {"preset": value, "rate": 1.0}


def _json(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m servekit.sim.cli sim|plan ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("sim", "plan"):
        print("usage: servekit {sim,plan} ...", file=sys.stderr)
        return 2
    return (sim_main if argv[0] == "sim" else plan_main)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
