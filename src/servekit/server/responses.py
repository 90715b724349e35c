"""OpenAI response bodies: streamed chunks (SSE) and whole responses, for both endpoints.

Streaming is the hot path: a chunk is a precomputed prefix, the choice index, the delta text
quoted by the C JSON string encoder, and a precomputed suffix — no dict, no ``json.dumps`` per
token. Whole responses are built as dicts once per request.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from typing import Any

from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.protocol.sse import DONE
from servekit.server.service import Job
from servekit.server.tools import ToolOutputs
from servekit.structured.tools import ToolCall, ToolCallDelta, ToolParser

__all__ = ["ChatEncoder", "CompletionEncoder", "Encoder", "ToolChatEncoder"]


class _TokenText:
    """Text of single tokens for logprobs, cached per id."""

    __slots__ = ("_cache", "_tokenizer")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = str(self._tokenizer.decode([token_id]))
        return text


class Encoder(ABC):
    """Accumulates one job's output and renders chunks and the final body."""

    object_name = ""
    chunk_object = ""
    #: What surrounds the quoted text in a delta of this response kind.
    _text_open = ""
    _text_close = ""

    def __init__(self, job: Job, tokenizer: Any, *, include_usage: bool = False,
                 logprobs: bool = False, echo: list[str] | None = None) -> None:
        self.job = job
        self.include_usage = include_usage
        self.want_logprobs = logprobs
        self.echo = echo
        self.texts = [""] * len(job.choices)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in job.choices]
        self.token_text = _TokenText(tokenizer)
        head = json.dumps({"id": job.request_id, "object": self.chunk_object,
                           "created": job.created, "model": job.model})[:-1]
        self._prefix = f'data: {head},"choices":[{{"index":'
        self._usage_null = ',"usage":null' if include_usage else ""
        # a plain text delta (most tokens) is head + quoted text + tail, as bytes
        self._text_heads = [f"{self._prefix}{i},{self._text_open}".encode()
                            for i in range(len(job.choices))]
        self._text_tail = (f'{self._text_close},"logprobs":null,"finish_reason":null}}]'
                           f'{self._usage_null}}}\n\n').encode()

    # -- accumulate (whole responses) ------------------------------------------------------

    def add(self, i: int, out: RequestOutput) -> None:
        """Record a delta for the final body."""
        self.texts[i] += out.new_text
        if out.logprobs:
            self.logprobs[i].extend(out.logprobs)

    # -- streaming -------------------------------------------------------------------------

    def start(self) -> bytes:
        """Bytes to send before the first delta (chat: the role; completions: any echo)."""
        return b""

    def chunk(self, i: int, out: RequestOutput) -> bytes:
        """One SSE event for a delta (empty when it carries nothing to send)."""
        text = out.new_text
        if not out.finished and not out.logprobs:
            return self._text_heads[i] + _quote(text).encode() + self._text_tail if text else b""
        finish = "null" if not out.finished else _quote(out.finish_reason or "stop")
        lp = self._chunk_logprobs(out) if self.want_logprobs and out.logprobs else "null"
        return (f'{self._prefix}{i},{self._delta(text)},"logprobs":{lp},'
                f'"finish_reason":{finish}}}]{self._usage_null}}}\n\n').encode()

    def chunks(self, i: int, outs: Sequence[RequestOutput]) -> bytes:
        """The events of several deltas that were ready at once, as one piece (the plain text
        ones from the same template as :meth:`chunk`'s, without a call each)."""
        head, tail = self._text_heads[i], self._text_tail
        parts: list[bytes] = []
        for out in outs:
            if out.finished or out.logprobs:
                parts.append(self.chunk(i, out))
            elif out.new_text:
                parts += (head, _quote(out.new_text).encode(), tail)
        return b"".join(parts)

    @abstractmethod
    def _delta(self, text: str) -> str:
        """The delta part of this response kind."""

    @abstractmethod
    def _chunk_logprobs(self, out: RequestOutput) -> str:
        """The chunk logprobs part of this response kind."""

    def end(self) -> bytes:
        """The usage chunk (when asked for) and ``[DONE]``."""
        if not self.include_usage:
            return DONE
        body = {"id": self.job.request_id, "object": self.chunk_object,
                "created": self.job.created, "model": self.job.model, "choices": [],
                "usage": self.usage()}
        return b"data: " + json.dumps(body).encode() + b"\n\n" + DONE

    # -- whole ----------------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        u = self.job.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}

    def body(self) -> bytes:
        """The whole (non-streamed) response."""
        job = self.job
        return json.dumps({
            "id": job.request_id, "object": self.object_name, "created": job.created,
            "model": job.model, "choices": [self._choice(i) for i in range(len(job.choices))],
            "usage": self.usage(),
        }, ensure_ascii=False).encode()

    @abstractmethod
    def _choice(self, i: int) -> dict[str, Any]:
        """The choice part of this response kind."""


class CompletionEncoder(Encoder):
    """``/v1/completions``: ``text_completion`` objects."""

    object_name = "text_completion"
    chunk_object = "text_completion"

    def start(self) -> bytes:
        if not self.echo:
            return b""
        return b"".join(
            f'{self._prefix}{i},"text":{_quote(self.echo[p])},"logprobs":null,'
            f'"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()
            for i, (p, _) in enumerate(self.job.choices))

    _text_open = '"text":'

    def _delta(self, text: str) -> str:
        return f'{self._text_open}{_quote(text)}'

    def _chunk_logprobs(self, out: RequestOutput) -> str:
        return json.dumps(self._logprobs(out.logprobs or [], 0))

    def _logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for lp in lps:
            tokens.append(self.token_text(lp.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def _choice(self, i: int) -> dict[str, Any]:
        prompt_index = self.job.choices[i][0]
        prefix = self.echo[prompt_index] if self.echo else ""
        return {"index": i, "text": prefix + self.texts[i],
                "logprobs": self._logprobs(self.logprobs[i], 0) if self.want_logprobs else None,
                "finish_reason": self.job.finish_reasons[i]}


class ChatEncoder(Encoder):
    """``/v1/chat/completions``: ``chat.completion`` objects."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def start(self) -> bytes:
        return b"".join(
            f'{self._prefix}{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
            f'"finish_reason":null}}]{self._usage_null}}}\n\n'.encode()
            for i in range(len(self.job.choices)))

    _text_open = '"delta":{"content":'
    _text_close = "}"

    def _delta(self, text: str) -> str:
        return f'{self._text_open}{_quote(text)}{self._text_close}' if text else '"delta":{}'

    def _chunk_logprobs(self, out: RequestOutput) -> str:
        return json.dumps({"content": [self._entry(lp) for lp in out.logprobs or []]})

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        text = self.token_text(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.token_text(tid)), "logprob": v,
                                  "bytes": list(t.encode())} for tid, v in lp.top]}

    def _choice(self, i: int) -> dict[str, Any]:
        lps = ({"content": [self._entry(lp) for lp in self.logprobs[i]]}
               if self.want_logprobs else None)
        return {"index": i,
                "message": {"role": "assistant", "content": self.texts[i], "refusal": None},
                "logprobs": lps, "finish_reason": self.job.finish_reasons[i]}



class ToolChatEncoder(ChatEncoder):
    """``/v1/chat/completions`` with tools: tool calls parsed out of the text.

    Streamed, content is released as soon as the parser knows it is not part of a call; a
    call's first ``delta.tool_calls`` entry carries its index, id, type and name, later ones
    its arguments as the model writes them (OpenAI's shape), so the argument fragments of a
    stream concatenate to exactly the final arguments. With ``parallel=False`` only the first
    call of a message is kept. A message with calls that ended by itself finishes with
    ``tool_calls``; one cut by ``max_tokens`` keeps ``length`` (a call cut before its head was
    complete is content; one cut later keeps its partial arguments, streamed or not). A
    resumed stream (a gateway's failover) first runs the text already sent through the parser,
    so a call cut mid-arguments continues with its remaining fragments.
    """

    def __init__(self, job: Job, tokenizer: Any, *, parser: ToolParser, parallel: bool = True,
                 include_usage: bool = False, logprobs: bool = False) -> None:
        super().__init__(job, tokenizer, include_usage=include_usage, logprobs=logprobs)
        self.tools = ToolOutputs(parser, len(job.choices), parallel)
        if job.resume and tokenizer is not None:  # a gateway continues a cut stream: the
            # parser picks up where the first replica's left off (what it sent is not resent)
            skip = job.choices[0][1].skip_special_tokens
            self.tools.feed(0, tokenizer.decode(job.resume, skip_special_tokens=skip), False)

    def chunks(self, i: int, outs: Sequence[RequestOutput]) -> bytes:
        """Each delta through the tool parser, in order (no plain-text shortcut here)."""
        return b"".join([self.chunk(i, out) for out in outs])

    def chunk(self, i: int, out: RequestOutput) -> bytes:
        content, calls = self.tools.feed(i, out.new_text, out.finished)
        lp = self._chunk_logprobs(out) if self.want_logprobs and out.logprobs else "null"
        events = []
        if content or lp != "null":
            events.append(self._event(i, self._delta(content), lp, "null"))
        for piece in calls:
            delta = {"tool_calls": [_delta_json(piece)]}
            events.append(self._event(i, '"delta":' + json.dumps(delta, ensure_ascii=False),
                                      "null", "null"))
        if out.finished:
            reason = ToolOutputs.finish_reason(out.finish_reason, self.tools.sent(i))
            events.append(self._event(i, '"delta":{}', "null", _quote(reason)))
        return "".join(events).encode()

    def _event(self, i: int, delta: str, logprobs: str, finish: str) -> str:
        return (f'{self._prefix}{i},{delta},"logprobs":{logprobs},"finish_reason":{finish}}}]'
                f'{self._usage_null}}}\n\n')

    def _choice(self, i: int) -> dict[str, Any]:
        choice = super()._choice(i)
        content, calls = self.tools.parse(self.texts[i])
        message = choice["message"]
        message["content"] = ToolOutputs.message_content(content, len(calls))
        if calls:
            message["tool_calls"] = [_call_json(c) for c in calls]
        choice["finish_reason"] = ToolOutputs.finish_reason(self.job.finish_reasons[i], len(calls))
        return choice


def _call_json(call: ToolCall) -> dict[str, Any]:
    """One OpenAI tool call of a message."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _delta_json(piece: ToolCallDelta) -> dict[str, Any]:
    """One ``delta.tool_calls`` entry: the first of a call with id, type and name."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments}}
