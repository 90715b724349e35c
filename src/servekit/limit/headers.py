"""Render a :class:`Decision` as OpenAI's rate-limit response headers."""

from __future__ import annotations

import math

from servekit.limit.decision import Decision


def format_duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format at millisecond resolution: ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if not seconds > 0:
        return "0s"
    ms = math.ceil(seconds * 1000.0 - 1e-6)
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, frac = divmod(ms, 1000)
    text = f"{secs}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def openai_headers(
    decision: Decision, *, requests: str | None = "requests", tokens: str | None = "tokens"
) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and, when denied, ``retry-after``.

    ``requests`` and ``tokens`` name the limits reported as OpenAI's request and token limits
    (``None`` or a name the limiter does not have: that triple is left out). Remaining counts are
    rounded down, resets and retry-after up, so a client that obeys them is never denied early.
    """
    headers: dict[str, str] = {}
    index = decision.limits.index
    for suffix, name in (("requests", requests), ("tokens", tokens)):
        if name is None or name not in index:
            continue
        status = decision.statuses[index[name]]
        headers[f"x-ratelimit-limit-{suffix}"] = str(int(status.limit))
        headers[f"x-ratelimit-remaining-{suffix}"] = str(math.floor(status.remaining + 1e-9 * status.limit))
        headers[f"x-ratelimit-reset-{suffix}"] = format_duration(status.reset)
    if not decision.allowed:
        wait = decision.retry_after
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(0, math.ceil(wait * 1000.0)))
    return headers
