"""Grammar compilation off the step loop: one worker thread, an LRU cache by spec, a time limit.

The engine never compiles on its step loop: :meth:`GrammarCompiler.submit` returns a future
(already done on a cache hit), and a request waits for it outside the scheduler, holding no KV
blocks. A compile that outlives ``timeout`` fails its requests; the worker cannot interrupt the
backend, so the compile finishes in the background and its result is still cached.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from cachetools import LRUCache

from servekit.sched.params import GuidedDecoding, InvalidParameterError
from servekit.structured.backend import CompiledGrammar, GrammarBackend

__all__ = ["GrammarCompiler"]


class GrammarCompiler:
    """Compiles constraints with ``backend`` in a worker thread, caching up to ``max_entries``.

    Errors are cached too (a bad schema fails fast the second time). Call :meth:`close` to stop
    the worker.
    """

    def __init__(self, backend: GrammarBackend, *, max_entries: int = 256,
                 timeout: float = 30.0) -> None:
        self.backend = backend
        self.timeout = timeout
        self._cache: LRUCache[GuidedDecoding, Future[CompiledGrammar]] = LRUCache(max_entries)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="servekit-grammar")
        self.compile_seconds = 0.0  # cumulative, for benchmarks
        self.compiles = 0

    def submit(self, spec: GuidedDecoding) -> Future[CompiledGrammar]:
        """The compiled grammar of ``spec``, as a future (done at once when cached)."""
        with self._lock:
            future = self._cache.get(spec)
            if future is None:
                future = self._pool.submit(self._compile, spec)
                self._cache[spec] = future
            return future

    def compile(self, spec: GuidedDecoding) -> CompiledGrammar:
        """Compile ``spec`` and wait (front ends: validate at the boundary, warm the cache).

        Raises InvalidParameterError naming ``guided.<kind>`` for an unusable constraint or a
        compile that exceeds the time limit.
        """
        future = self.submit(spec)
        return result_within(future, spec, self.timeout)

    def cached(self, spec: GuidedDecoding) -> bool:
        """True when ``spec`` was compiled (or is compiling)."""
        with self._lock:
            return spec in self._cache

    def close(self) -> None:
        """Stop the worker (pending compiles finish first)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: GuidedDecoding) -> CompiledGrammar:
        t0 = time.perf_counter()
        try:
            return self.backend.compile(spec)
        finally:
            self.compile_seconds += time.perf_counter() - t0
            self.compiles += 1


def result_within(future: Future[CompiledGrammar], spec: GuidedDecoding,
                  timeout: float) -> CompiledGrammar:
    """``future``'s grammar within ``timeout`` seconds, else InvalidParameterError."""
    try:
        return future.result(timeout=timeout)
    except FutureTimeout as exc:
        raise InvalidParameterError(
            f"guided.{spec.kind}", f"grammar compilation took longer than {timeout:g} s") from exc
