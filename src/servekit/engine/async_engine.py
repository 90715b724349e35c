"""AsyncEngine: one engine loop serving many concurrent callers, on asyncio or trio (anyio).

``async with AsyncEngine(engine) as e:`` starts the loop task in the engine's own task group.
Each step schedules on the event loop, runs the model in a worker thread
(``anyio.to_thread.run_sync``) so the loop stays responsive, then appends the deltas to the
per-request :class:`OutputQueue`s (no task switch, no copy). Adds and aborts happen on the event
loop between and during steps: the worker thread reads only the step's plan. Leaving
``generate``'s iteration early (break, cancellation, an exception) aborts the request and frees
its blocks. With ``generate(..., coalesce=True)`` the deltas that queued up while the consumer
was busy (a slow client, a busy process) come as one merged delta; a consumer that keeps up
still gets one delta per step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from servekit.engine.chat import render_chat
from servekit.engine.engine import LLMEngine
from servekit.engine.outputs import RequestOutput, merge_outputs
from servekit.errors import ServekitError
from servekit.sched.params import SamplingParams

__all__ = ["AsyncEngine", "EngineClosedError"]


class EngineClosedError(ServekitError, RuntimeError):
    """The AsyncEngine is not running (use ``async with``), or its loop failed."""


class OutputQueue:
    """One request's deltas, from the engine loop to its consumer.

    The loop appends without waiting; :meth:`get_batch` returns every delta queued so far,
    waiting (one wake-up) only when there is none. A consumer that keeps up gets one delta per
    step; one that fell behind gets all of them in one batch, with no task switch per delta.
    Given the asyncio ``loop``, a wait is a bare future (0.9 us per delta, wake-up included,
    against 3.4 us with an :class:`anyio.Event`); without one (trio), an :class:`anyio.Event`.
    """

    __slots__ = ("_closed", "_loop", "_queue", "_wake")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._queue: deque[RequestOutput] = deque()
        self._loop = loop
        self._wake: asyncio.Future[None] | anyio.Event | None = None
        self._closed = False

    def put(self, out: RequestOutput) -> None:
        """Queue a delta (dropped once the queue is closed: nobody will read it)."""
        if self._closed:
            return
        self._queue.append(out)
        if self._wake is not None:
            self._set()

    def close(self) -> None:
        """No more deltas: :meth:`get_batch` returns what is left, then ``[]``."""
        self._closed = True
        if self._wake is not None:
            self._set()

    def _set(self) -> None:
        wake = self._wake
        if isinstance(wake, anyio.Event):
            wake.set()
        elif wake is not None and not wake.done():
            wake.set_result(None)

    async def get_batch(self) -> list[RequestOutput]:
        """Every queued delta, in order (waits for one); ``[]`` once closed and empty."""
        while not self._queue:
            if self._closed:
                return []
            try:
                if self._loop is not None:
                    self._wake = future = self._loop.create_future()
                    await future
                else:
                    self._wake = event = anyio.Event()
                    await event.wait()
            finally:
                self._wake = None
        batch = list(self._queue)
        self._queue.clear()
        return batch


class AsyncEngine:
    """Async front of an :class:`~servekit.engine.engine.LLMEngine`.

    >>> async with AsyncEngine(LLMEngine(path)) as engine:  # doctest: +SKIP
    ...     async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
    ...         print(out.new_text, end="")
    """

    #: ``generate`` takes ``coalesce`` (front ends ask for merged deltas when they can).
    coalesces_outputs = True

    def __init__(self, engine: LLMEngine | str | Path, **engine_kwargs: Any) -> None:
        """Wrap ``engine``, or build an :class:`LLMEngine` from a model path and its keywords
        (``config``, ``tokenizer``, ``hooks``, ``clock``)."""
        if not isinstance(engine, LLMEngine):
            engine = LLMEngine(engine, **engine_kwargs)
        elif engine_kwargs:
            raise TypeError("engine keywords apply only when AsyncEngine builds the engine")
        self.engine = engine
        self._streams: dict[str, OutputQueue] = {}
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # asyncio's, when running on it

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        """The served model's name."""
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""
        return self.engine.max_model_len

    async def __aenter__(self) -> AsyncEngine:
        if self._tg is not None:
            raise EngineClosedError("this AsyncEngine is already running")
        self._loop = _asyncio_loop()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._failure = None
        tg.start_soon(self._run)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        deadline: float | None = None,
        coalesce: bool = False,
        output_token_ids: Sequence[int] = (),
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's deltas; the last has ``finished=True``.

        With ``coalesce``, the deltas queued since the consumer last asked come merged into one
        (:func:`~servekit.engine.outputs.merge_outputs`). Raises InvalidParameterError or
        QueueFullError at the first iteration. Breaking out of the iteration, or cancelling the
        task that iterates, aborts the request. ``output_token_ids`` resumes a generation cut
        short elsewhere (:meth:`LLMEngine.add_request`).
        """
        queue, rid = self._open(prompt, params, request_id=request_id, tenant=tenant,
                                priority=priority, cache_salt=cache_salt, deadline=deadline,
                                output_token_ids=output_token_ids)
        done = False
        try:
            while not done:
                batch = await queue.get_batch()
                if not batch:
                    break
                if coalesce and len(batch) > 1:
                    batch = [merge_outputs(batch)]
                for out in batch:
                    done = out.finished
                    yield out
            if not done and self._failure is not None:
                raise EngineClosedError(f"the engine loop failed: {self._failure!r}")
        finally:
            if not done:
                self._abort_now(rid)

    def _open(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        deadline: float | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> tuple[OutputQueue, str]:
        if self._tg is None:
            raise EngineClosedError("the AsyncEngine is not running: use 'async with'")
        if self._failure is not None:  # the loop died: nobody would ever serve this stream
            raise EngineClosedError(f"the engine loop failed: {self._failure!r}")
        rid = self.engine.add_request(prompt, params, request_id=request_id, tenant=tenant,
                                      priority=priority, cache_salt=cache_salt, deadline=deadline,
                                      output_token_ids=output_token_ids)
        queue = self._streams[rid] = OutputQueue(self._loop)
        self._wake.set()
        return queue, rid

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Like :meth:`generate`, for chat messages rendered by the tokenizer's chat template."""
        ids = render_chat(self.tokenizer, messages)
        async for out in self.generate(ids, params, **kwargs):
            yield out

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); its stream ends with ``abort``."""
        self._abort_now(request_id)

    def _abort_now(self, rid: str) -> None:
        out = self.engine.abort(rid)
        queue = self._streams.pop(rid, None)
        if queue is not None:
            if out is not None:
                queue.put(out)
            queue.close()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        engine = self.engine
        plan = None
        try:
            while True:
                if not engine.has_unfinished_requests():
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                plan = engine.schedule()
                try:
                    sampled = await anyio.to_thread.run_sync(engine.execute, plan)
                except Exception as exc:  # the step failed: fail its requests, keep serving
                    outputs = engine.fail_step(plan, f"step failed: {exc!r}")
                else:
                    outputs = engine.finish(plan, sampled)
                plan = None
                self._deliver(outputs)
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self._failure = exc
            raise
        finally:  # stopping: every open request ends with "abort", the scheduler is settled
            self._deliver(engine.abort_all())
            for queue in self._streams.values():
                queue.close()
            self._streams.clear()
            if plan is not None:
                engine.finish(plan, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            queue = streams.get(out.request_id)
            if queue is None:
                continue
            queue.put(out)
            if out.finished:
                del streams[out.request_id]
                queue.close()


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop; None on another backend (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
