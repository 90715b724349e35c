"""Structured outputs at the server's boundary: compile a request's constraint before queueing."""

from __future__ import annotations

from typing import Any

import anyio

from servekit.protocol.errors import InvalidRequestError
from servekit.sched.params import GuidedDecoding, InvalidParameterError

__all__ = ["compile_guided"]


async def compile_guided(engine: Any, guided: GuidedDecoding | None) -> None:
    """Compile ``guided`` with the engine's grammar compiler in a worker thread (cached by spec),
    so an unusable schema is a 400 naming the field and the engine finds the grammar ready.

    Engines without a grammar compiler (a plugged fake) skip the check; their requests fail.
    """
    if guided is None:
        return
    inner = getattr(engine, "engine", engine)  # AsyncEngine wraps the LLMEngine
    if not hasattr(inner, "grammars"):
        return
    param = "response_format.json_schema.schema" if guided.kind == "json_schema" else "response_format"
    try:
        await anyio.to_thread.run_sync(lambda: inner.grammars.compile(guided))
    except InvalidParameterError as exc:
        raise InvalidRequestError(f"Invalid value for '{param}': {exc}", param=param) from exc
