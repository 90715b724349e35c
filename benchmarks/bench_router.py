"""Hash ring: servekit.route.HashRing against uhashring's default ring, in the same process.

Keys ``session-%d`` over 100 nodes ``node-%d``: scalar and vectorized lookups per second,
max/mean and min/mean keys per node (also at 128 nodes), the fraction of keys moved when a node
is added or removed (and how many moved between two unchanged nodes), build time and memory.

    python benchmarks/bench_router.py --quick --json benchmarks/results/router-cpu-DATE.json

The measurements are :mod:`servekit.bench.router` (``python -m servekit.bench router
--routing-policy NAME`` runs the router-level ones on a routing-policy plugin).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from uhashring import HashRing as UHashRing

from _common import (
    bar,
    measure,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)
from servekit.bench.router import (
    balance,
    movement,
    names,
    retained_bytes,
    scalar_rate,
)
from servekit.route import HashRing
from servekit.route.hashing import hash_keys

NODES = 100


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    num_keys = 1_000_000  # balance and movement need the full key set in --quick too
    scalar_keys = 200_000 if args.quick else 1_000_000
    rounds = args.rounds or (3 if args.quick else 5)
    keys = [f"session-{i}" for i in range(num_keys)]
    nodes = names(NODES)
    rows: list[dict[str, Any]] = []

    def row(impl: str, metric: str, samples: Sequence[float], **extra: Any) -> dict[str, Any]:
        r = {"impl": impl, "metric": metric, **summary(samples), **extra}
        rows.append(r)
        return r

    # -- build time and memory ---------------------------------------------------------------
    ours, ours_mem = retained_bytes(lambda: HashRing(nodes))
    peer, peer_mem = retained_bytes(lambda: UHashRing(nodes=nodes))
    row("servekit", "build s", measure(lambda: HashRing(nodes), rounds))
    row("uhashring", "build s", measure(lambda: UHashRing(nodes=nodes), rounds))
    row("servekit", "memory MB", [ours_mem / 1e6], points=len(nodes) * ours.vnodes)
    row("uhashring", "memory MB", [peer_mem / 1e6], points=len(peer.get_points()))

    # -- scalar lookups, interleaved so both see the same machine load ------------------------
    sk: list[float] = []
    uh: list[float] = []
    for _ in range(rounds):
        sk += scalar_rate(ours.lookup, keys[:scalar_keys], 1)
        uh += scalar_rate(peer.get_node, keys[:scalar_keys], 1)
    r_sk = row("servekit", "scalar lookups/s", sk)
    r_uh = row("uhashring", "scalar lookups/s", uh)
    scalar_ratio = r_sk["median"] / r_uh["median"]
    r_sk["ratio"] = scalar_ratio

    # -- vectorized lookups --------------------------------------------------------------------
    row(
        "servekit",
        "vectorized lookups/s (with hashing)",
        [num_keys / s for s in measure(lambda: ours.lookup_many(keys), rounds)],
    )
    hashes = hash_keys(keys)
    row(
        "servekit",
        "vectorized lookups/s (prehashed)",
        [num_keys / s for s in measure(lambda: ours.locate_hashes(hashes), rounds)],
    )

    # -- balance ---------------------------------------------------------------------------------
    ours_owners = ours.lookup_many(keys)
    peer_owners = [peer.get_node(k) for k in keys]
    ours_max, ours_min = balance(ours_owners, nodes)
    peer_max, peer_min = balance(peer_owners, nodes)
    row("servekit", "max/mean keys per node", [ours_max])
    row("servekit", "min/mean keys per node", [ours_min])
    shares = np.array(list(ours.shares().values())) * NODES
    row("servekit", "max/mean exact hash-space share", [float(shares.max())])
    row("uhashring", "max/mean keys per node", [peer_max])
    row("uhashring", "min/mean keys per node", [peer_min])
    nodes128 = names(128)
    max128, min128 = balance(HashRing(nodes128).lookup_many(keys), nodes128)
    row("servekit", "max/mean keys per node (128 nodes)", [max128])
    row("servekit", "min/mean keys per node (128 nodes)", [min128])

    # -- movement on +1 / -1 node ---------------------------------------------------------------
    ours.add("node-100")
    peer.add_node("node-100")
    add_frac, add_between = movement(ours_owners, ours.lookup_many(keys), "node-100")
    peer_add_frac, peer_add_between = movement(
        peer_owners, [peer.get_node(k) for k in keys], "node-100"
    )
    ours.remove("node-100")
    peer.remove_node("node-100")
    ours.remove("node-42")
    peer.remove_node("node-42")
    rm_frac, rm_between = movement(ours_owners, ours.lookup_many(keys), "node-42")
    peer_rm_frac, peer_rm_between = movement(
        peer_owners, [peer.get_node(k) for k in keys], "node-42"
    )
    add_ratio = add_frac / (1 / (NODES + 1))
    rm_ratio = rm_frac / (1 / NODES)
    row("servekit", "moved on +1 node (x 1/N)", [add_ratio], between_unchanged=add_between)
    row("servekit", "moved on -1 node (x 1/N)", [rm_ratio], between_unchanged=rm_between)
    row(
        "uhashring",
        "moved on +1 node (x 1/N)",
        [peer_add_frac * (NODES + 1)],
        between_unchanged=peer_add_between,
    )
    row(
        "uhashring",
        "moved on -1 node (x 1/N)",
        [peer_rm_frac * NODES],
        between_unchanged=peer_rm_between,
    )

    print(
        f"{num_keys:,} keys 'session-%d' over {NODES} nodes, {rounds} rounds "
        f"(scalar: {scalar_keys:,} keys per round)"
    )
    print_table(rows, ["impl", "metric", "median", "min", "max", "ratio", "between_unchanged"])

    bars = {
        "scalar_lookups_vs_uhashring": bar(scalar_ratio, 2.0),
        "max_over_mean_100_nodes": bar(ours_max, 1.05, higher_is_better=False),
        "max_over_mean_128_nodes": bar(max128, 1.05, higher_is_better=False),
        "moved_on_add_x_1_over_n": bar(add_ratio, 1.1, higher_is_better=False),
        "moved_on_remove_x_1_over_n": bar(rm_ratio, 1.1, higher_is_better=False),
        "moved_between_unchanged_nodes": bar(
            float(add_between + rm_between), 0.0, higher_is_better=False
        ),
    }
    print_bars(bars)
    write_json(
        args.json,
        "router",
        rows,
        bars,
        keys=num_keys,
        nodes=NODES,
        rounds=rounds,
        note="scalar bar: the issue asks 2x uhashring (DESIGN.md says 1.5x)",
    )


if __name__ == "__main__":
    main()
