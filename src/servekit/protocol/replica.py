"""The private protocol between a servekit gateway and its replicas: header names and the
stream extensions a trusted gateway asks for.

Both tiers import these names; a client never sees them (the gateway drops every header with
:data:`PRIVATE_HEADER_PREFIX` in both directions, and the replica honours them only with the
gateway secret). docs/gateway.md describes the exchange.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT_HEADER",
    "CACHE_SALT_HEADER",
    "COMMENT_PREFIX",
    "EXTENSIONS_HEADER",
    "GATEWAY_SECRET_HEADER",
    "PRIVATE_HEADER_PREFIX",
    "TENANT_HEADER",
    "TOKEN_IDS",
    "USAGE",
]

#: Every gateway <-> replica header starts with this.
PRIVATE_HEADER_PREFIX = "x-servekit-"
#: The shared secret that makes a replica trust the gateway's other headers.
GATEWAY_SECRET_HEADER = "x-servekit-gateway-secret"
#: The stream extensions the gateway asks for; the replica names the ones it sends in the
#: response's header of the same name.
EXTENSIONS_HEADER = "x-servekit-extensions"
#: The attempt key of a gateway that writes the ledger record itself: the replica records the
#: attempt under it, for analytics only.
ATTEMPT_HEADER = "x-servekit-attempt"
#: The caller's tenant and prefix-cache salt, as the gateway authenticated it.
TENANT_HEADER = "x-servekit-tenant"
CACHE_SALT_HEADER = "x-servekit-cache-salt"
#: Extension: each streamed event is preceded by its output token ids (failover resumes).
TOKEN_IDS = "token_ids"
#: Extension: the job's usage precedes the final ``[DONE]`` (the gateway's ledger record).
USAGE = "usage"
#: How the extensions' SSE comment lines begin (clients skip comments).
COMMENT_PREFIX = b": servekit "
