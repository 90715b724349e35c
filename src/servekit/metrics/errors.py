"""Errors raised by ``servekit.metrics``."""

from __future__ import annotations

from servekit.errors import ServekitError


class MetricsConfigError(ServekitError, ValueError):
    """An exporter was configured with a bad value; ``field`` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
