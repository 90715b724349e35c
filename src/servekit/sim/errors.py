"""The simulator's errors: every bad input names the field it came from."""

from __future__ import annotations

from servekit.errors import ServekitError


class SimConfigError(ServekitError, ValueError):
    """A scenario, spec, workload or SLO value is invalid; ``field`` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InfeasibleError(ServekitError, RuntimeError):
    """The planner found no configuration that meets the SLO (the message says why)."""
