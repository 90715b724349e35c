"""Build servekit's optional C cores (everything else is in pyproject.toml).

``servekit.kv._cpool`` runs the block pool's per-block loops, ``servekit.sched._csched`` the
per-request work of a decode step. ``optional=True``: without a C compiler the install still
succeeds and servekit runs the pure-Python code they mirror (``BlockPool.speedups`` and
``Scheduler.speedups`` are then False).
"""

import sys

from setuptools import Extension, setup

_FLAGS = [] if sys.platform == "win32" else ["-O2"]

setup(
    ext_modules=[
        Extension("servekit.kv._cpool", ["src/servekit/kv/_cpool.c"], optional=True,
                  extra_compile_args=_FLAGS),
        Extension("servekit.sched._csched", ["src/servekit/sched/_csched.c"], optional=True,
                  extra_compile_args=_FLAGS),
    ]
)
