"""How a kit reports a broken contract: an :class:`InvariantViolationError` naming the invariant."""

from __future__ import annotations

from servekit.errors import ServekitError


class InvariantViolationError(ServekitError, AssertionError):
    """A plugin broke an invariant of its contract; ``invariant`` names it."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"invariant violated: {invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


def check(ok: object, invariant: str, detail: str = "") -> None:
    """Raise :class:`InvariantViolationError` for ``invariant`` unless ``ok`` is true.

    Unlike ``assert`` it also runs under ``python -O``.
    """
    if not ok:
        raise InvariantViolationError(invariant, detail)


def check_interface(plugin: object, kind: str) -> None:
    """``plugin`` implements the interface of plugin ``kind`` (see :data:`servekit.plugins.KINDS`)
    at the version this servekit speaks (``api_version``, default 1)."""
    import importlib

    from servekit.plugins import KINDS

    spec = KINDS[kind]
    module, _, name = spec.interface.partition(":")
    interface = getattr(importlib.import_module(module), name)
    check(isinstance(plugin, interface), f"implements the {kind} interface",
          f"{type(plugin).__name__} is not a {spec.interface}")
    declared = getattr(plugin, "api_version", 1)
    check(declared == spec.api_version, f"implements the {kind} interface",
          f"{type(plugin).__name__} declares api_version {declared!r}; this servekit speaks "
          f"version {spec.api_version}")
