"""API keys (moved to :mod:`servekit.limit.keys`, shared by the server and the gateway)."""

from servekit.limit.keys import ENV_VAR, ApiKey, KeyConfigError, KeyStore

__all__ = ["ENV_VAR", "ApiKey", "KeyConfigError", "KeyStore"]
