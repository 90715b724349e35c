"""Named workload presets (documented in docs/sim.md); a scenario's keys override them."""

from __future__ import annotations

import copy
from typing import Any

from servekit.sim.errors import SimConfigError

__all__ = ["PRESETS", "preset_table"]

#: Interactive chat: medium prompts behind a few shared system prompts, medium answers.
CHAT: dict[str, Any] = {
    "arrival": "poisson",
    "prompt": {"dist": "lognormal", "median": 600, "sigma": 0.8, "min": 16, "max": 4096},
    "output": {"dist": "lognormal", "median": 200, "sigma": 0.7, "min": 8, "max": 1024},
    "system_prompts": {"count": 8, "tokens": 256},
}

#: Retrieval-augmented generation: long prompts (retrieved context), short answers.
RAG: dict[str, Any] = {
    "arrival": "poisson",
    "prompt": {"dist": "lognormal", "median": 3000, "sigma": 0.4, "min": 256, "max": 7000},
    "output": {"dist": "lognormal", "median": 150, "sigma": 0.5, "min": 8, "max": 512},
    "system_prompts": {"count": 4, "tokens": 512},
}

#: Offline batch jobs: bursty submissions (gamma, cv 3), medium prompts, long outputs.
BATCH: dict[str, Any] = {
    "arrival": "gamma",
    "cv": 3.0,
    "prompt": {"dist": "lognormal", "median": 800, "sigma": 0.6, "min": 16, "max": 4096},
    "output": {"dist": "lognormal", "median": 400, "sigma": 0.5, "min": 16, "max": 2048},
}

PRESETS: dict[str, dict[str, Any]] = {"chat": CHAT, "rag": RAG, "batch": BATCH}


def preset_table(name: object, field: str = "workload.preset") -> dict[str, Any]:
    """A copy of the preset's workload table."""
    if not isinstance(name, str) or name not in PRESETS:
        raise SimConfigError(field, f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
