"""A response that wraps another: what the gateway's ledger and tracing responses share."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

__all__ = ["WrappedResponse"]


class WrappedResponse(Response):
    """Stands for ``inner`` (its status and headers); a subclass's ``__call__`` sends it."""

    def __init__(self, inner: Response) -> None:
        self.inner = inner
        self.background = None
        self.status_code = inner.status_code

    @property
    def headers(self) -> Any:  # type: ignore[override]
        """The inner response's headers."""
        return self.inner.headers
