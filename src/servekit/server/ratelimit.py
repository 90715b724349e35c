"""Per-key RPM/TPM limits (moved to :mod:`servekit.limit.keyed`, shared by the server and the
gateway)."""

from servekit.limit.keyed import Admission, KeyLimits

__all__ = ["Admission", "KeyLimits"]
