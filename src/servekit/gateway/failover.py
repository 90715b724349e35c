"""Failover after the first byte: what a relayed stream has sent, and how to resume it.

A servekit replica asked by the trusted gateway (``x-servekit-extensions: token_ids``, with the
shared secret) precedes each streamed event with a comment line carrying the event's choice
index and output token ids (:func:`servekit.server.replica_api.token_ids_comment`). :class:`StreamTracker` reads
the upstream bytes event by event, keeps the ids of the events relayed whole, the stream's
``id`` and ``created``, and whether ``data: [DONE]`` came, and hands back the events without
those comment lines, so a client sees exactly OpenAI's SSE. When the stream breaks before
``[DONE]``, :func:`resume_body` is the request that makes another replica continue it: the same
body plus ``servekit_resume`` (the ids relayed, per choice for a stream of several, with the
finish reason of each choice that had finished; the stream's id and creation time). A stream
a draining replica ends with its ``draining`` error event is resumed the same way. The replica
prefills prompt + those ids, counts them for ``max_tokens``, penalties, stop strings and usage,
and streams only what follows, so the client sees one continuous stream billed once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from servekit.protocol.replica import COMMENT_PREFIX

__all__ = ["StreamTracker", "resumable", "resume_body"]

_USAGE = COMMENT_PREFIX + b'{"usage":'
_DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_SEP = b"\n\n"
_FINISH = b'"finish_reason":"'


class StreamTracker:
    """Feed the raw bytes of one choice's stream; get back what the client may see."""

    __slots__ = ("_buffer", "_by_choice", "_ids", "_parsed", "created", "done", "drained",
                 "finished", "num_tokens", "request_id", "usage")

    def __init__(self, choices: int = 1) -> None:
        self._buffer = b""
        self._ids: list[bytes] = []  # each comment's id list, parsed only when needed
        self._parsed: list[int] = []
        #: With several ``choices``: each choice's comments' id lists (by index).
        self._by_choice: dict[int, list[bytes]] | None = {} if choices > 1 else None
        #: With several choices: the finish reason of each choice that finished.
        self.finished: dict[int, str] = {}
        #: Output tokens relayed so far.
        self.num_tokens = 0
        self.request_id: str | None = None
        self.created: int | None = None
        self.done = False
        #: The replica ended the stream because it shut down (its error event, code
        #: ``draining``, and what follows are held back: the stream is to be resumed).
        self.drained = False
        #: The usage the replica reported before ``[DONE]`` (extension ``usage``): its
        #: ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``finish_reason``.
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The complete events of ``chunk`` (with what came before), less the id comments;
        a trailing partial event waits for the next chunk."""
        data = self._buffer + chunk
        end = data.rfind(_SEP)
        if end < 0:
            self._buffer = data
            return b""
        self._buffer = data[end + 2:]
        out = []
        for event in data[:end].split(_SEP):
            if self.drained:
                continue
            if event.startswith(_USAGE):
                self._learn_usage(event)
                continue
            if event.startswith(COMMENT_PREFIX):
                line, _, event = event.partition(b"\n")
                ids = line[line.index(b"[", len(COMMENT_PREFIX)) + 1:line.rindex(b"]")]
                by_choice = self._by_choice
                if by_choice is None:
                    self._ids.append(ids)
                else:
                    at = line.index(b":", len(COMMENT_PREFIX) + 2) + 1  # {"index":I,...
                    by_choice.setdefault(int(line[at:line.index(b",", at)]), []).append(ids)
                self.num_tokens += ids.count(b",") + 1
                if not event:
                    continue
            if event == _DONE:
                self.done = True
            elif event.startswith(_ERROR) and _drain_error(event):
                self.drained = True
                continue
            elif self.request_id is None and event.startswith(b"data: {"):
                self._learn(event)
            if self._by_choice is not None and _FINISH in event:
                self._learn_finished(event)
            out.append(event)
        return _SEP.join(out) + _SEP if out else b""

    @property
    def token_ids(self) -> list[int]:
        """The output token ids of the events relayed whole, in order."""
        if self._ids:
            self._parsed += [int(t) for ids in self._ids for t in ids.split(b",")]
            self._ids = []
        return list(self._parsed)

    def choice_token_ids(self, index: int) -> list[int]:
        """With several choices: choice ``index``'s output token ids relayed whole."""
        chunks = (self._by_choice or {}).get(index, [])
        return [int(t) for ids in chunks for t in ids.split(b",")]

    def cut(self) -> None:
        """The stream broke: drop the partial event it left (never relayed)."""
        self._buffer = b""
        self.drained = False

    def _learn_usage(self, event: bytes) -> None:
        try:
            usage = json.loads(event[len(COMMENT_PREFIX):].partition(b"\n")[0])["usage"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(usage, dict):
            self.usage = usage

    def _learn_finished(self, event: bytes) -> None:
        try:
            choices = json.loads(event[len(b"data: "):])["choices"]
        except (ValueError, KeyError, TypeError):
            return
        for choice in choices if isinstance(choices, list) else ():
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            if isinstance(reason, str) and isinstance(choice.get("index"), int):
                self.finished[choice["index"]] = reason

    def _learn(self, event: bytes) -> None:
        try:
            doc = json.loads(event[len(b"data: "):])
        except ValueError:
            return
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            self.request_id = doc["id"]
            created = doc.get("created")
            self.created = created if isinstance(created, int) else None


def _drain_error(event: bytes) -> bool:
    try:
        error = json.loads(event[len(b"data: "):])["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and error.get("code") == "draining"


def resumable(path: str, body: Mapping[str, Any]) -> bool:
    """Whether a request can fail over after its first byte: a stream of one prompt (its
    choices, one or several, are each continued from their own token ids)."""
    if not body.get("stream") or body.get("best_of") not in (None, 1):
        return False
    if path.endswith("/chat/completions"):
        return True
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt))


def resume_body(body: Mapping[str, Any], tracker: StreamTracker) -> bytes:
    """The request that continues ``tracker``'s stream on another replica (several choices:
    each with its own ids; one that finished is counted, not continued)."""
    n = body.get("n", 1)
    resume: dict[str, Any]
    if isinstance(n, int) and n > 1:
        resume = {"choices": [
            {"output_token_ids": tracker.choice_token_ids(i),
             "finish_reason": tracker.finished.get(i)} for i in range(n)]}
    else:
        resume = {"output_token_ids": tracker.token_ids}
    if tracker.request_id is not None:
        resume["request_id"] = tracker.request_id
    if tracker.created is not None:
        resume["created"] = tracker.created
    return json.dumps({**body, "servekit_resume": resume}).encode()
