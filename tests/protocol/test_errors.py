"""OpenAI error bodies: what the server writes, the client reads."""

from __future__ import annotations

import json

from servekit.protocol.errors import error_body, parse_error_body, retry_after_seconds


def test_an_error_body_round_trips() -> None:
    body = error_body("bad 'n'", "invalid_request_error", "n", None)
    assert json.loads(body) == {"error": {"message": "bad 'n'", "type": "invalid_request_error",
                                          "param": "n", "code": None}}
    assert parse_error_body(body) == {"message": "bad 'n'", "type": "invalid_request_error",
                                      "param": "n", "code": None}


def test_a_body_that_is_not_json_becomes_the_message() -> None:
    assert parse_error_body(b"<html>bad gateway</html>") == {"message": "<html>bad gateway</html>"}
    assert parse_error_body(b"") is None
    assert parse_error_body(b'{"error": "plain"}') == {"message": "plain"}


def test_retry_after_prefers_milliseconds_and_skips_junk() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "-1"}) is None
    assert retry_after_seconds({}) is None
