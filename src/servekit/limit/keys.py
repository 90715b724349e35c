"""API keys: who is calling, under which limits, with which prefix-cache salt.

Keys come from a JSON file or an environment variable::

    {"keys": [{"key": "sk-alice", "tenant": "alice", "rpm": 60, "tpm": 40000,
               "cache_salt": "alice"}]}

(``"admin": true`` marks a key that may also use ``servekit gateway``'s admin endpoints), or,
in the variable, a comma-separated list of bare keys (tenant ``default``, no limits). A key
without ``cache_salt`` gets its own salt, derived from the key, so no two keys share cached
prefixes unless configured to. Lookup hashes the presented key (SHA-256) and compares digests
with :func:`hmac.compare_digest`, so the time taken does not depend on how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attrs import field, frozen

from servekit.errors import ServekitError
from servekit.protocol.errors import UnauthorizedError

__all__ = ["ApiKey", "KeyConfigError", "KeyStore"]

#: The environment variable :meth:`KeyStore.from_env` reads by default.
ENV_VAR = "SERVEKIT_API_KEYS"


class KeyConfigError(ServekitError, ValueError):
    """The key file or variable is malformed; the message names the entry and field."""


@frozen(slots=True)
class ApiKey:
    """One API key: its tenant, its per-minute limits (None = unlimited), its cache salt, and
    whether it is an admin key (the gateway's admin endpoints)."""

    key: str = field(repr=False)
    tenant: str = "default"
    rpm: int | None = None
    tpm: int | None = None
    cache_salt: str | None = None
    admin: bool = False

    @property
    def salt(self) -> str:
        """The prefix-cache salt: the configured one, else one derived from the key."""
        if self.cache_salt is not None:
            return self.cache_salt
        return hashlib.sha256(b"servekit-salt:" + self.key.encode()).hexdigest()[:16]


class KeyStore:
    """The set of valid keys; empty means the server is open (no authentication)."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        for k in keys:
            digest = _digest(k.key)
            if digest in self._by_digest:
                raise KeyConfigError(f"duplicate API key for tenant {k.tenant!r}")
            self._by_digest[digest] = k

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def open(self) -> bool:
        """True when no keys are configured: every request is let in."""
        return not self._by_digest

    @property
    def has_admin(self) -> bool:
        """True when some key is marked admin."""
        return any(k.admin for k in self._by_digest.values())

    def from_authorization(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from an ``Authorization: Bearer`` header (None when the store is
        open); an UnauthorizedError (401) when it is missing or wrong."""
        if self.open:
            return None
        if not authorization:
            raise UnauthorizedError("You didn't provide an API key: send "
                                    "'Authorization: Bearer YOUR_KEY'")
        scheme, _, token = authorization.partition(" ")
        key = self.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise UnauthorizedError("Incorrect API key provided")
        return key

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key matching ``presented``, or None."""
        digest = _digest(presented)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(_digest(found.key), digest):
            return None
        return found

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyStore:
        """Load ``{"keys": [...]}`` (or a bare list) from a JSON file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise KeyConfigError(f"cannot read API keys from {str(path)!r}: {exc}") from exc
        return cls(_parse_entries(data, str(path)))

    @classmethod
    def from_env(cls, var: str = ENV_VAR, environ: dict[str, str] | None = None) -> KeyStore:
        """Keys from an environment variable: JSON as in a file, or comma-separated bare keys."""
        value = (os.environ if environ is None else environ).get(var, "").strip()
        if not value:
            return cls()
        if value[0] in "[{":
            try:
                return cls(_parse_entries(json.loads(value), var))
            except json.JSONDecodeError as exc:
                raise KeyConfigError(f"{var}: invalid JSON: {exc}") from exc
        return cls(ApiKey(key=k.strip()) for k in value.split(",") if k.strip())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_entries(data: Any, source: str) -> list[ApiKey]:
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise KeyConfigError(f"{source}: expected {{\"keys\": [...]}} or a list of keys")
    keys = []
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if isinstance(entry, str):
            entry = {"key": entry}
        if not isinstance(entry, dict):
            raise KeyConfigError(f"{where}: expected an object or a string")
        unknown = set(entry) - {"key", "tenant", "rpm", "tpm", "cache_salt", "admin"}
        if unknown:
            raise KeyConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        key = entry.get("key")
        if not isinstance(key, str) or not key:
            raise KeyConfigError(f"{where}.key: must be a non-empty string")
        for name in ("rpm", "tpm"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise KeyConfigError(f"{where}.{name}: must be a positive integer or null")
        for name in ("tenant", "cache_salt"):
            value = entry.get(name)
            if value is not None and not isinstance(value, str):
                raise KeyConfigError(f"{where}.{name}: must be a string")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise KeyConfigError(f"{where}.admin: must be true or false")
        keys.append(ApiKey(key=key, tenant=entry.get("tenant") or "default",
                           rpm=entry.get("rpm"), tpm=entry.get("tpm"),
                           cache_salt=entry.get("cache_salt"), admin=admin))
    return keys
