"""Abort work when an HTTP client goes away (the OpenAI routes and the gRPC REST mapping)."""

from __future__ import annotations

from typing import Any

import anyio

__all__ = ["cancel_on_disconnect"]


async def cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the ASGI ``receive`` channel reports ``http.disconnect``."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
