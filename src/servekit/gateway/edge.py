"""Keys and per-key RPM/TPM limits at the gateway's edge (``servekit.limit``'s KeyStore and
KeyLimits, the server's own, so the keys file and the accounting are the same).

A request is authenticated (401), then reserves 1 request and ``prompt + max_tokens`` tokens
under its key and model before it is forwarded (429 with OpenAI's ``x-ratelimit-*`` headers;
a store outage is a 503 ``rate_limit_store_unavailable``, or admits unlimited with fail-open).
With a shared store (Redis), every gateway draws on one bucket per key and model, so N
gateways give a key exactly its limit in total. When the response ends — completed, failed,
cut, or the client gone — the reservation is settled with the tokens the replicas reported:
a whole response's ``usage``, a stream's usage chunk, or prompt + the output token ids relayed
(servekit replicas with the secret); a stream that reports nothing keeps its reservation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import anyio

from servekit.gateway.fleet import Fleet
from servekit.limit.keyed import Admission, KeyLimits
from servekit.limit.keys import ApiKey, KeyStore

__all__ = ["Edge", "usage_total"]

_TOTAL = re.compile(rb'"total_tokens":\s*(\d+)')
_CACHED = re.compile(rb'"cached_tokens":\s*(\d+)')
_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions


class Edge:
    """Authenticates and limits requests before the fleet sees them."""

    def __init__(self, keys: KeyStore, limits: KeyLimits, fleet: Fleet) -> None:
        self.keys, self.limits, self.fleet = keys, limits, fleet

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key (None when no keys are configured); UnauthorizedError (401)."""
        return self.keys.from_authorization(headers.get("authorization"))

    async def reserve(self, key: ApiKey | None, path: str, body: Mapping[str, Any] | None,
                      prompt_ids: list[int] | None) -> tuple[Admission, int]:
        """Reserve the request (429 / 503 as a StatusError); the admission and the tokens
        reserved."""
        tokens = self.reserved_tokens(path, body, prompt_ids)
        model = str(body.get("model", "")) if body is not None else ""
        return await self.limits.areserve(key, model, tokens), tokens

    def reserved_tokens(self, path: str, body: Mapping[str, Any] | None,
                        prompt_ids: list[int] | None) -> int:
        """``prompt + max_tokens`` per choice, as the server reserves (OpenAI's accounting);
        without a tokenizer the prompt counts a token per 4 bytes of its text."""
        if body is None:
            return 0
        if prompt_ids is not None:
            prompt = len(prompt_ids)
        else:
            text = body.get("prompt") if "prompt" in body else body.get("messages")
            prompt = len(str(text or "").encode()) // 4
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(requested, int):
            room = self.fleet.max_model_len()
            requested = (_DEFAULT_COMPLETION_TOKENS if not path.endswith("/chat/completions")
                         else max(0, room - prompt) if room is not None else 0)
        n = body.get("n", 1)
        return prompt + max(0, requested) * (n if isinstance(n, int) and n > 0 else 1)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        """Settle with the tokens really used (shielded: a cancelled request settles too)."""
        with anyio.CancelScope(shield=True):
            await self.limits.asettle(admission, used_tokens)


def usage_total(content: bytes) -> int | None:
    """``usage.total_tokens`` of a response body or a stream's last bytes, if it has one."""
    found = _TOTAL.findall(content)
    return int(found[-1]) if found else None


def cached_total(content: bytes) -> int | None:
    """The last ``cached_tokens`` (prompt tokens the replica found cached) of a response body
    or a stream's last bytes, if it has one."""
    found = _CACHED.findall(content)
    return int(found[-1]) if found else None
