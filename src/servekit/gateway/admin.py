"""The gateway's admin endpoints: the replica list, read and replaced at run time.

``GET /admin/replicas`` answers ``{"replicas": [{"url", "state"}]}``; ``PUT /admin/replicas``
with ``{"replicas": [URL, ...]}`` makes those the fleet (plus the ``--replica`` flags), as an
edit of the replicas file does: new replicas join, missing ones leave (their requests in flight
finish). Both need ``Authorization: Bearer KEY`` with a key marked ``"admin": true`` in the keys
file: 401 without a valid key, 403 with a key that is not admin, 404 when no key is admin (the
endpoints are off). A body that is not such a list is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from servekit.gateway.fleet import Fleet, is_replica_url
from servekit.limit.keys import KeyStore
from servekit.protocol.errors import InvalidRequestError, StatusError

__all__ = ["mount_admin"]


class _NotAdminError(StatusError):
    """403: the key is valid but not an admin key."""

    status = 403
    type = "permission_error"


class _AdminOffError(StatusError):
    """404: no key is an admin key, so the admin endpoints do not exist."""

    status = 404
    type = "invalid_request_error"


def mount_admin(app: FastAPI, fleet: Fleet, keys: KeyStore, *, has_admin: bool) -> None:
    """Add the admin endpoints to ``app`` (``has_admin``: some key in ``keys`` is admin)."""

    def check(headers: Mapping[str, str]) -> None:
        if not has_admin:
            raise _AdminOffError("Not Found")
        key = keys.from_authorization(headers.get("authorization"))
        if key is None or not key.admin:
            raise _NotAdminError("this API key is not an admin key", code="not_admin")

    def listing() -> JSONResponse:
        health = fleet.router.health
        return JSONResponse({"replicas": [{"url": u, "state": health.state(u).value}
                                          for u in fleet.urls]})

    @app.get("/admin/replicas", include_in_schema=False)
    async def get_replicas(request: Request) -> Response:
        try:
            check(request.headers)
        except StatusError as exc:
            return _error(exc)
        return listing()

    @app.put("/admin/replicas", include_in_schema=False)
    async def put_replicas(request: Request) -> Response:
        try:
            check(request.headers)
            fleet.set_replicas(_urls(await request.body()))
        except StatusError as exc:
            return _error(exc)
        return listing()


def _urls(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidRequestError("the body must be JSON: {\"replicas\": [URL, ...]}",
                                  param="replicas") from None
    urls = doc.get("replicas") if isinstance(doc, dict) else None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise InvalidRequestError("must be a list of replica base URLs", param="replicas")
    for i, url in enumerate(urls):
        if not is_replica_url(url):
            raise InvalidRequestError(f"not a replica base URL (http:// or https://): {url!r}",
                                      param=f"replicas[{i}]")
    return urls


def _error(exc: StatusError) -> Response:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")
