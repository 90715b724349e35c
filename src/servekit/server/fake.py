"""An instant fake engine that honours the AsyncEngine contract, for tests and benchmarks.

:class:`FakeEngine` needs no model: its tokenizer maps bytes to ids, and it "generates" a fixed
cycle of words, one token per output, optionally ``token_delay`` seconds apart. It keeps the
engine's observable bookkeeping — KV blocks held per live request, a bounded waiting queue
(``QueueFullError``), aborts — so the server's accounting can be tested without a model.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any

import anyio

from servekit.engine.outputs import RequestOutput, TokenLogprob
from servekit.sched.errors import DuplicateRequestError, QueueFullError
from servekit.sched.params import InvalidParameterError, SamplingParams

__all__ = ["FakeEngine", "FakeTokenizer", "make_fake_engine"]

_TEXT = b"the quick brown fox jumps over the lazy dog "
_CHARS = [chr(b) for b in range(256)]


class FakeTokenizer:
    """Byte-level: token id = byte value; ids 256 and 257 are bos and eos."""

    bos_token_id = 256
    eos_token_id = 257
    bos_token = "<s>"
    eos_token = "</s>"
    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Bytes of ``text`` (after a bos when ``add_special_tokens``)."""
        ids = list(text.encode())
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of the byte ids (special ids dropped)."""
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """``role: content`` lines, then ``assistant:`` when asked for a generation prompt."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
        return self.encode(text, add_special_tokens=False) if tokenize else text


class FakeEngine:
    """Streams ``max_tokens`` tokens per request at once (or ``token_delay`` s apart).

    Without a delay, a request yields to the event loop once every ``tokens_per_yield`` tokens
    (default 1: each token costs its consumer one wake-up, as with a stepping engine that makes
    one token per request per step; more models an engine whose consumer finds that many deltas
    waiting at each wake-up, such as multi-token steps). ``max_running`` requests run at a time
    and ``max_waiting`` more may wait for a slot; one more raises
    :class:`~servekit.sched.errors.QueueFullError`. ``num_used_blocks`` counts the KV blocks the
    live requests would hold with ``block_size``-token blocks, so leaks show.
    """

    #: ``generate`` takes ``batched`` (a front end writes the deltas of one pass at once).
    yields_batches = True

    def __init__(self, *, model_name: str = "fake", max_model_len: int = 4096,
                 token_delay: float = 0.0, max_running: int = 1024, max_waiting: int = 1024,
                 block_size: int = 16, tokens_per_yield: int = 1) -> None:
        if tokens_per_yield < 1:
            raise ValueError(f"tokens_per_yield must be at least 1, got {tokens_per_yield}")
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.block_size = block_size
        self.tokens_per_yield = tokens_per_yield
        self._blocks: dict[str, int] = {}
        self._aborted: set[str] = set()
        self._waiting = 0
        self._slots = anyio.Semaphore(max_running)
        self._ids = itertools.count()
        self.num_requests = 0

    @property
    def num_used_blocks(self) -> int:
        """KV blocks held by live requests."""
        return sum(self._blocks.values())

    @property
    def admission_capacity(self) -> int:
        """Requests this engine can hold at once: running slots plus the waiting bound."""
        return self.max_running + self.max_waiting

    @property
    def num_live_requests(self) -> int:
        """Requests waiting or running."""
        return len(self._blocks) + self._waiting

    async def __aenter__(self) -> FakeEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        """Finish ``request_id`` with reason ``abort`` at its next token (no-op when done)."""
        if request_id in self._blocks:
            self._aborted.add(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams, *,
                       request_id: str | None = None, tenant: str | None = None,
                       priority: int = 0, cache_salt: str | None = None,
                       deadline: float | None = None,
                       output_token_ids: Sequence[int] = (),
                       batched: bool = False) -> AsyncIterator[Any]:
        """Yield one delta per token; closing the iterator early frees the request.
        ``output_token_ids`` resumes after them (this fake's tokens depend on position only).
        ``batched``: yield lists instead, the deltas of one pass of the event loop each
        (``tokens_per_yield`` of them; an abort takes effect at the next pass)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rid = request_id if request_id is not None else f"fake-{next(self._ids)}"
        if rid in self._blocks:
            raise DuplicateRequestError(rid)
        try:  # a free running slot is taken at once: only requests without one wait
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            if self._waiting >= self.max_waiting:
                raise QueueFullError("max_waiting_requests",
                                f"{self._waiting} requests already wait", retry_after=1.0) from None
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        self.num_requests += 1
        n_prompt = len(ids)
        self._blocks[rid] = math.ceil(n_prompt / self.block_size)
        try:
            limit = min(params.max_tokens, self.max_model_len - n_prompt)
            resumed = len(output_token_ids)
            if resumed >= limit:
                raise InvalidParameterError("output_token_ids", "leave no room under max_tokens")
            deltas = self._deltas(rid, n_prompt, params, resumed, limit)
            checkpoint = _loop_checkpoint()
            every = 1 if self.token_delay else self.tokens_per_yield
            made = resumed  # tokens generated so far
            while True:
                if self.token_delay:
                    await anyio.sleep(self.token_delay)
                else:
                    await checkpoint()
                if rid in self._aborted:
                    out = RequestOutput(rid, [], "", True, "abort", n_prompt, made, 0)
                    yield [out] if batched else out
                    return
                batch = [next(deltas)] if every == 1 else list(itertools.islice(deltas, every))
                made += len(batch)
                self._blocks[rid] = (n_prompt + made + self.block_size - 1) // self.block_size
                if batched:
                    yield batch
                else:
                    for out in batch:
                        yield out
                if batch[-1].finished:
                    return
        finally:
            del self._blocks[rid]
            self._aborted.discard(rid)
            self._slots.release()

    @staticmethod
    def _deltas(rid: str, n_prompt: int, params: SamplingParams, resumed: int,
                limit: int) -> Iterator[RequestOutput]:
        """The request's deltas after ``resumed`` tokens, one per token, the last finished."""
        top, stops = params.logprobs, params.stop
        # generated text (kept only to match stop strings) and how much of it was emitted,
        # the cut-short run's included when resuming
        text = "".join(_CHARS[_TEXT[i % len(_TEXT)]] for i in range(resumed)) if stops else ""
        sent = len(text) - (_held_back(text, stops) if stops else 0)
        for i in range(resumed + 1, limit + 1):
            token = _TEXT[(i - 1) % len(_TEXT)]
            lps = None if top is None else [_logprob(token, top)]
            done = i == limit
            if not stops:
                yield RequestOutput(rid, [token], _CHARS[token], done,
                                    "length" if done else None, n_prompt, i, 0, lps)
                continue
            text += _CHARS[token]  # like the engine: stop strings are matched, never emitted
            reason, upto = "length", len(text)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                done, reason, upto = True, "stop", cut
            elif not done:
                upto -= _held_back(text, stops)
            yield RequestOutput(rid, [token], text[sent:upto], done, reason if done else None,
                                n_prompt, i, 0, lps)
            sent = max(sent, upto)
            if done:
                return


def _loop_checkpoint() -> Callable[[], Awaitable[None]]:
    """The running loop's own checkpoint: what ``anyio.lowlevel.checkpoint`` resolves to, less
    its per-call backend lookup (a fifth of this fake's per-token cost)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio: trio, anyio's other backend
        import trio

        return trio.lowlevel.checkpoint  # type: ignore[no-any-return]
    return _asyncio_yield


@types.coroutine
def _asyncio_yield() -> Generator[None, None, None]:
    """One pass through the asyncio loop: what ``asyncio.sleep(0)`` does, one frame less."""
    yield


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that may be the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _logprob(token: int, top: int) -> TokenLogprob:
    alternatives = tuple((token + k, -0.5 * (k + 1)) for k in range(top))
    return TokenLogprob(token, -0.5, alternatives)


def make_fake_engine(hooks: Any = None, **kwargs: Any) -> FakeEngine:
    """A :class:`FakeEngine` from keywords, as an engine-core factory (``hooks`` is ignored: the
    fake emits no metrics events)."""
    return FakeEngine(**kwargs)
