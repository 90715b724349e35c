"""Micro-benchmarks of servekit's parts, reusable on plugins (``python -m servekit.bench``).

The measurements behind ``benchmarks/bench_<part>.py`` live here, so a plugin author runs the
same one on their plugin beside the built-in one and reads the ratio::

    python -m servekit.bench scheduler --policy deadline --quick
    python -m servekit.bench limiter --store redis://127.0.0.1:6379/0
    python -m servekit.bench router --routing-policy 'my_policy:{"spread": 2}'
    python -m servekit.bench hooks --hook statsd --json results.json

Names resolve through :mod:`servekit.plugins` (built-ins and entry points alike).
"""
