"""servekit's client SDK (``servekit[client]``): sync and async, typed, with retries."""

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
from servekit.client.types import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Client",
    "ClientError",
    "Completion",
    "CompletionChoice",
    "InternalServerError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "Timeout",
    "Usage",
]
