"""A one-page plot of a simulation (matplotlib, from the ``sim`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from servekit._optional import require
from servekit.sim.results import SimResult

__all__ = ["plot_result"]


def plot_result(result: SimResult, path: str | Path, *, title: str = "") -> None:
    """TTFT CDF per tenant, end-to-end latency CDF, KV usage and queue depth over time,
    preemptions over time; written as PNG to ``path``."""
    mpl = require("matplotlib", "sim")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "sim")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    tenants = sorted({r.tenant for r in result.records})
    for tenant in tenants:
        done = [r for r in result.records if r.tenant == tenant and r.outcome == "finished"]
        for ax, values in ((axes[0][0], [r.ttft for r in done]),
                           (axes[0][1], [r.end - r.arrival for r in done])):
            v = np.sort(np.array(values))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=tenant)
    axes[0][0].set(title="TTFT CDF", xlabel="seconds", xscale="log")
    axes[0][1].set(title="end-to-end latency CDF", xlabel="seconds", xscale="log")
    axes[0][0].legend()
    tl = result.timeline
    axes[1][0].plot(tl.time, tl.kv_usage, label="KV usage (mean)")
    axes[1][0].plot(tl.time, tl.kv_usage_max, label="KV usage (max replica)")
    axes[1][0].set(title="KV cache usage", xlabel="simulated seconds", ylim=(0, 1.05))
    axes[1][0].legend()
    ax = axes[1][1]
    ax.plot(tl.time, tl.running, label="running")
    ax.plot(tl.time, tl.waiting, label="waiting")
    ax.plot(tl.time, tl.preemptions, label="preemptions (cumulative)")
    ax.set(title="requests", xlabel="simulated seconds")
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
