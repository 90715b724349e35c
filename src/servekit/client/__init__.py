"""servekit's client SDK (``servekit[client]``): sync and async, typed, with retries.

The gRPC clients (``GrpcClient``, ``AsyncGrpcClient``; ``servekit[grpc]``) load lazily, so the
HTTP client never imports grpc.
"""

from typing import Any

from servekit._deprecation import moved_names
from servekit.client._core import RetryPolicy, Timeout
from servekit.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
)
from servekit.client.http import AsyncClient, Client
from servekit.client.structured import ParseError
from servekit.client.tools import FunctionTool, ToolRun, function_tool
from servekit.client.types import ChatCompletion, Completion, ToolCall

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncGrpcClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "Client",
    "ClientError",
    "Completion",
    "FunctionTool",
    "GrpcClient",
    "InternalServerError",
    "NotFoundError",
    "OverloadedError",
    "ParseError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "Timeout",
    "ToolCall",
    "ToolRun",
    "function_tool",
]


# Names that were exported here before and now live only in their modules: they still resolve,
# with a DeprecationWarning, for one release.
_moved = moved_names(__name__, {
    "ChatChoice": "servekit.client.types",
    "ChatMessage": "servekit.client.types",
    "CompletionChoice": "servekit.client.types",
    "Usage": "servekit.client.types",
})


def __getattr__(name: str) -> Any:
    if name in ("GrpcClient", "AsyncGrpcClient"):
        from servekit.client import grpc

        return getattr(grpc, name)
    return _moved(name)
