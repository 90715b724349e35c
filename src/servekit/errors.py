"""The root of servekit's exception hierarchy.

Every part raises subclasses of :class:`ServekitError` (and of the matching builtin where one
fits, e.g. ``ValueError`` for bad input), so a caller can catch everything servekit raises.
"""

from __future__ import annotations


class ServekitError(Exception):
    """Base class of every error servekit raises on purpose."""


class MissingExtraError(ServekitError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""
