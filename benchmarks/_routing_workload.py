"""The routing-quality workload of ``bench_gateway.py``: tenants with long shared system prompts,
multi-turn sessions, and a closed-loop client that replays them through one URL.

A session belongs to a tenant (Zipf-skewed: a few tenants are popular) and runs ``turns``
streamed completions; turn ``t``'s prompt is the tenant's system prompt, every earlier user
message and reply, and a new user message, so it shares its prefix with the tenant's other
sessions and, longer, with the session's earlier turns. ``concurrency`` sessions are live at a
time (workers start staggered); a session's turns carry its id in ``x-session-id`` (what the
consistent-hash policy routes on). A run ``nonce`` opens every prompt, so caches warmed by an
earlier run share nothing with this one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import attrs

from bench_server import Conn

_WORDS = tuple(["policy", "refund", "order", "invoice", "account", "shipping", "warranty", "support", "upgrade", "plan", "billing", "region", "quota", "latency", "model", "token", "cache", "replica", "gateway", "session", "tenant", "prompt", "customer", "ticket", "escalate", "summary", "answer", "politely", "briefly", "cite", "the", "manual", "always", "never", "before", "after"])


@attrs.frozen
class Session:
    """One conversation: its id, its tenant's system prompt and its user messages."""

    id: str
    tenant: int
    system: str
    messages: tuple[str, ...]


def _text(rng: random.Random, n_bytes: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_bytes:
        words.append(rng.choice(_WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:n_bytes]


def sessions(*, nonce: str, tenants: int, system_bytes: int, n: int, turns: int,
             message_bytes: int, seed: int = 0) -> list[Session]:
    """``n`` sessions over ``tenants`` tenants (weight ``1/(i+1)``), in arrival order."""
    rng = random.Random(seed)
    systems = [f"[{nonce}] You are the assistant of tenant {i}. " + _text(rng, system_bytes)
               for i in range(tenants)]
    weights = [1 / (i + 1) for i in range(tenants)]
    out = []
    for s in range(n):
        tenant = rng.choices(range(tenants), weights)[0]
        out.append(Session(f"s{s}", tenant, systems[tenant],
                           tuple(_text(rng, message_bytes) for _ in range(turns))))
    return out


async def replay(url: str, trace: list[Session], *, concurrency: int, max_tokens: int,
                 think_s: float, stagger_s: float, model: str = "fake") -> list[dict[str, Any]]:
    """Run every session's turns through ``url``; per request: session, turn, TTFT (s)."""
    queue = list(trace)
    results: list[dict[str, Any]] = []

    async def worker(i: int) -> None:
        await asyncio.sleep(i * stagger_s)
        conn = await Conn.open(url)
        try:
            while queue:
                session = queue.pop(0)
                history = session.system
                for turn, message in enumerate(session.messages):
                    prompt = f"{history}\nuser: {message}\nassistant:"
                    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "stream": True}
                    t0 = time.perf_counter()
                    status, chunks = await conn.post("/v1/completions", body,
                                                     {"x-session-id": session.id})
                    assert status == 200, (status, chunks[:1])
                    reply, first = _reply(chunks)
                    results.append({"session": session.id, "turn": turn, "ttft": first - t0})
                    history = prompt + reply
                    await asyncio.sleep(think_s)
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results


def _reply(chunks: list[tuple[float, bytes]]) -> tuple[str, float]:
    """The streamed text and the arrival time of its first event (its first token)."""
    text, first = [], None
    for t, chunk in chunks:
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {"):
                if first is None:  # a seeded-weights model's token may decode to no text
                    first = t
                text.append(json.loads(line[6:])["choices"][0]["text"])
    assert first is not None, chunks
    return "".join(text), first
