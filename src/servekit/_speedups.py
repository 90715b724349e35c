"""Choosing between an optional C core and its pure-Python fallback.

servekit's C cores (``servekit.kv._cpool``, ``servekit.sched._csched``) are built at install time
when a C compiler is available; the pure-Python code they mirror is always there. ``speedups``
arguments take ``None`` (use the C core when it is built, unless the environment variable
``SERVEKIT_NO_SPEEDUPS`` is set to anything but ``0``), ``True`` (require it) or ``False``.
"""

from __future__ import annotations

import os
from types import ModuleType


def resolve_speedups(speedups: bool | None, core: ModuleType | None, name: str) -> bool:
    """Whether to use the C core ``core`` (None when it is not built) named ``name``."""
    if speedups is None:
        return core is not None and os.environ.get("SERVEKIT_NO_SPEEDUPS", "") in ("", "0")
    if speedups and core is None:
        raise ImportError(
            f"speedups=True but {name}, an optional C core, is not built: install servekit "
            "with a C compiler and the Python headers available (`pip install -e .` or "
            "`bash scripts/setup.sh`), or pass speedups=None / False"
        )
    return bool(speedups)
