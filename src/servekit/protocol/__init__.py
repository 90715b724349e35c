"""servekit.protocol: the wire formats every front end, client and gateway shares.

OpenAI's request bodies (:mod:`~servekit.protocol.schema`, pydantic), OpenAI-shaped errors
(:mod:`~servekit.protocol.errors`), server-sent-event framing (:mod:`~servekit.protocol.sse`),
chat messages as chat templates take them (:mod:`~servekit.protocol.messages`) and the generated gRPC code (``servekit.protocol.grpc_gen``, from ``servekit.proto``). A leaf:
it imports nothing else of servekit but :mod:`servekit.errors`, and never torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it, imported on first use (schema needs pydantic,
# the stream decoders httpx-sse; errors and encoding need nothing).
_EXPORTS: dict[str, str] = {
    "ChatCompletionRequest": "servekit.protocol.schema",
    "CompletionRequest": "servekit.protocol.schema",
    "ChatMessageParam": "servekit.protocol.schema",
    "StatusError": "servekit.protocol.errors",
    "InvalidRequestError": "servekit.protocol.errors",
    "UnauthorizedError": "servekit.protocol.errors",
    "ModelNotFoundError": "servekit.protocol.errors",
    "TooManyRequestsError": "servekit.protocol.errors",
    "ServiceUnavailableError": "servekit.protocol.errors",
    "error_body": "servekit.protocol.errors",
    "encode_event": "servekit.protocol.sse",
    "iter_events": "servekit.protocol.sse",
    "aiter_events": "servekit.protocol.sse",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit.protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
