"""``python -m servekit.bench PART --<plugin> SPEC``: a plugin beside the built-in one.

Each part runs its measurement on the plugin and on the baseline (``--baseline``) in
interleaved rounds, prints medians with min-max and the speed ratio (plugin over baseline:
above 1 the plugin is faster), and with ``--json PATH`` writes the machine, the rows and the
ratios.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from servekit.bench import hooks as hooks_bench
from servekit.bench import limiter as limiter_bench
from servekit.bench import router as router_bench
from servekit.bench import sched as sched_bench
from servekit.bench.report import add_common_args, print_table, summary, write_json

Rows = list[dict[str, Any]]
Ratios = dict[str, float]


def _interleave(runs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return samples


def _rows(metric: str, samples: Mapping[str, Sequence[float]]) -> Rows:
    return [{"impl": name, "metric": metric, **summary(s)} for name, s in samples.items()]


def _ratio(samples: Mapping[str, Sequence[float]], plugin: str, baseline: str,
           higher_is_better: bool) -> float:
    p, b = statistics.median(samples[plugin]), statistics.median(samples[baseline])
    return p / b if higher_is_better else b / p


def run_scheduler(args: argparse.Namespace) -> tuple[Rows, Ratios]:
    from servekit.sched.policy import make_policy

    n = args.running or (64 if args.quick else 512)
    steps = warmup = 60 if args.quick else 300
    specs = {f"plugin: {args.policy}": args.policy, f"baseline: {args.baseline}": args.baseline}
    for spec in specs.values():
        make_policy(spec)  # an unknown name or bad arguments fail before any measuring
    rows: Rows = []
    ratios: Ratios = {}
    for name, prefix, blocks_per_request in sched_bench.SCENARIOS:
        samples: dict[str, list[float]] = {label: [] for label in specs}
        for rnd in range(args.rounds or (3 if args.quick else 5)):
            work = sched_bench.workload(n + 8 * (warmup + steps), seed=rnd, shared_prefix=prefix)
            for label, spec in specs.items():
                result = sched_bench.run_servekit(work, n, n * blocks_per_request, warmup, steps,
                                                  policy=make_policy(spec), mixed=True)
                samples[label].append(result["us_per_step"])
        rows += _rows(f"CPU us per step, {name}-{n}", samples)
        plugin, baseline = specs
        ratios[f"{name}-{n}"] = _ratio(samples, plugin, baseline, higher_is_better=False)
    return rows, ratios


def run_limiter(args: argparse.Namespace) -> tuple[Rows, Ratios]:
    from servekit.limit import store_from_url

    makers = {f"{label}: {url}": (lambda rate, u=url: limiter_bench.store_checker(
                  rate, rate, store=store_from_url(u)))
              for label, url in (("plugin", args.store), ("baseline", args.baseline))}
    scenarios = dict(limiter_bench.SCENARIOS)
    if args.quick:
        scenarios["10k keys"] = (limiter_bench.BIG, 10_000)
        del scenarios["100k keys"]
    measured = limiter_bench.compare_checks(
        makers, n=args.checks or (5_000 if args.quick else 100_000),
        rounds=args.rounds or (3 if args.quick else 7), scenarios=scenarios)
    names = list(makers)
    rows: Rows = []
    ratios: Ratios = {}
    for scenario, samples in measured.items():
        rows += _rows(f"checks/s, {scenario}", samples)
        ratios[scenario] = _ratio(samples, names[0], names[1], higher_is_better=True)
    return rows, ratios


def run_router(args: argparse.Namespace) -> tuple[Rows, Ratios]:
    from servekit.route.policy import make_routing_policy

    keys = [f"session-{i}" for i in range(args.keys or (5_000 if args.quick else 100_000))]
    replicas = args.replicas
    specs = {f"plugin: {args.routing_policy}": args.routing_policy,
             f"baseline: {args.baseline}": args.baseline}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in specs}
    for _ in range(args.rounds or (3 if args.quick else 5)):
        for name, spec in specs.items():
            results[name].append(router_bench.measure_policy(
                partial(make_routing_policy, spec), replicas=replicas, keys=keys))
    rows: Rows = []
    for metric in results[next(iter(specs))][0]:
        rows += _rows(metric, {name: [r[metric] for r in rs] for name, rs in results.items()})
    names = list(specs)
    rates = {name: [r["routes/s"] for r in rs] for name, rs in results.items()}
    return rows, {"routes/s": _ratio(rates, names[0], names[1], higher_is_better=True)}


def run_hooks(args: argparse.Namespace) -> tuple[Rows, Ratios]:
    from servekit import plugins

    size = hooks_bench.sizes(args.quick, args.rounds)
    configs = {f"{label}: {spec}": (lambda s=spec: [plugins.resolve("hook", s)])
               for label, spec in (("plugin", args.hook), ("baseline", args.baseline))}
    measured = hooks_bench.measure_hooks(configs, batch=size["batch"], steps=size["steps"],
                                         rounds=size["rounds"])
    samples = {name: measured[name, True]["cpu"] for name in configs}
    names = list(configs)
    ratio = _ratio(samples, names[0], names[1], higher_is_better=False)
    return _rows("us per new-token event (thread CPU)", samples), {"event cost": ratio}


PARTS: dict[str, tuple[Callable[[argparse.Namespace], tuple[Rows, Ratios]], str]] = {
    "scheduler": (run_scheduler, "scheduler + KV manager time per step with a policy"),
    "limiter": (run_limiter, "limiter checks/s on a store"),
    "router": (run_router, "routes/s, balance and movement of a routing policy"),
    "hooks": (run_hooks, "cost of a new-token event with a hook"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m servekit.bench`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m servekit.bench", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("scheduler", help=PARTS["scheduler"][1])
    p.add_argument("--policy", required=True, help="policy plugin: NAME or NAME:JSON")
    p.add_argument("--baseline", default="fcfs", help="built-in to compare (default fcfs)")
    p.add_argument("--running", type=int, default=None, help="running requests (512; 64 quick)")
    p = sub.add_parser("limiter", help=PARTS["limiter"][1])
    p.add_argument("--store", required=True, help="store URL; its scheme names the plugin")
    p.add_argument("--baseline", default="memory://", help="store URL (default memory://)")
    p.add_argument("--checks", type=int, default=None, help="checks per round on one key")
    p = sub.add_parser("router", help=PARTS["router"][1])
    p.add_argument("--routing-policy", required=True, help="NAME or NAME:JSON")
    p.add_argument("--baseline", default="consistent_hash", help="default consistent_hash")
    p.add_argument("--replicas", type=int, default=16, help="replicas (default 16)")
    p.add_argument("--keys", type=int, default=None, help="session keys (100k; 5k quick)")
    p = sub.add_parser("hooks", help=PARTS["hooks"][1])
    p.add_argument("--hook", required=True, help="hook plugin: NAME or NAME:JSON")
    p.add_argument("--baseline", default="stats", help="built-in hook (default stats)")
    for p in sub.choices.values():
        add_common_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one part; print the table and the ratio; write the JSON when asked."""
    args = build_parser().parse_args(argv)
    run, title = PARTS[args.part]
    rows, ratios = run(args)
    print_table(rows, ["impl", "metric", "median", "min", "max"], title=title)
    print("\nratio (plugin speed / baseline speed; above 1: the plugin is faster)")
    for name, value in ratios.items():
        print(f"  {name}: {value:.3g}")
    write_json(args.json, f"servekit.bench {args.part}", rows, {}, ratios=ratios,
               arguments={k: v for k, v in vars(args).items() if k != "json"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
