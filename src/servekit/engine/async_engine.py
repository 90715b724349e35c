"""AsyncEngine: one engine loop serving many concurrent callers, on asyncio or trio (anyio).

``async with AsyncEngine(engine) as e:`` starts the loop task in the engine's own task group.
Each step schedules on the event loop, runs the model in a worker thread
(``anyio.to_thread.run_sync``) so the loop stays responsive, then hands the deltas to the
per-request memory object streams. Adds and aborts happen on the event loop between and during
steps: the worker thread reads only the step's plan. Leaving ``generate``'s iteration early
(break, cancellation, an exception) aborts the request and frees its blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from servekit.engine.chat import render_chat
from servekit.engine.engine import LLMEngine
from servekit.engine.outputs import RequestOutput
from servekit.errors import ServekitError
from servekit.sched.params import SamplingParams

__all__ = ["AsyncEngine", "EngineClosedError"]


class EngineClosedError(ServekitError, RuntimeError):
    """The AsyncEngine is not running (use ``async with``), or its loop failed."""


class AsyncEngine:
    """Async front of an :class:`~servekit.engine.engine.LLMEngine`.

    >>> async with AsyncEngine(LLMEngine(path)) as engine:  # doctest: +SKIP
    ...     async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
    ...         print(out.new_text, end="")
    """

    def __init__(self, engine: LLMEngine | str | Path, **engine_kwargs: Any) -> None:
        """Wrap ``engine``, or build an :class:`LLMEngine` from a model path and its keywords
        (``config``, ``tokenizer``, ``hooks``, ``clock``)."""
        if not isinstance(engine, LLMEngine):
            engine = LLMEngine(engine, **engine_kwargs)
        elif engine_kwargs:
            raise TypeError("engine keywords apply only when AsyncEngine builds the engine")
        self.engine = engine
        self._streams: dict[str, MemoryObjectSendStream[RequestOutput]] = {}
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._failure: BaseException | None = None

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
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's deltas; the last has ``finished=True``.

        Raises InvalidParameterError or QueueFullError at the first iteration. Breaking out of the
        iteration, or cancelling the task that iterates, aborts the request.
        """
        if self._tg is None:
            raise EngineClosedError("the AsyncEngine is not running: use 'async with'")
        if self._failure is not None:  # the loop died: nobody would ever serve this stream
            raise EngineClosedError(f"the engine loop failed: {self._failure!r}")
        rid = self.engine.add_request(prompt, params, request_id=request_id, tenant=tenant,
                                      priority=priority, cache_salt=cache_salt, deadline=deadline)
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        self._streams[rid] = send
        self._wake.set()
        done = False
        try:
            with receive:
                async for out in receive:
                    done = out.finished
                    yield out
                    if done:
                        return
            if self._failure is not None:
                raise EngineClosedError(f"the engine loop failed: {self._failure!r}")
        finally:
            if not done:
                self._abort_now(rid)

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
        send = self._streams.pop(rid, None)
        if send is not None:
            if out is not None:
                _send(send, out)
            send.close()

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
            for send in self._streams.values():
                send.close()
            self._streams.clear()
            if plan is not None:
                engine.finish(plan, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            send = streams.get(out.request_id)
            if send is None:
                continue
            _send(send, out)
            if out.finished:
                del streams[out.request_id]
                send.close()


def _send(send: MemoryObjectSendStream[RequestOutput], out: RequestOutput) -> None:
    with contextlib.suppress(anyio.BrokenResourceError):  # the consumer is gone (aborting)
        send.send_nowait(out)
