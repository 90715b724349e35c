"""servekit: embeddable LLM-serving building blocks.

The public names of every part are re-exported here and imported lazily, so ``import
servekit`` stays cheap and a part that needs torch (or an extra) loads only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; extended as parts land.
_EXPORTS: dict[str, str] = {
    "ServekitError": "servekit.errors",
    "MissingExtraError": "servekit.errors",
    "SamplingParams": "servekit.sched.params",
    "InvalidParameterError": "servekit.sched.params",
    "Hook": "servekit.metrics.hooks",
    "HookSet": "servekit.metrics.hooks",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
