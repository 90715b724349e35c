"""Token-budget continuous batching over the KV cache manager.

Each step, :meth:`Scheduler.schedule` gives every running request a number of tokens within
``max_num_batched_tokens`` and ``max_num_seqs``: first one token to each decoding request, then a
chunk to each request still prefilling, then chunks to newly admitted requests (prefix-cache
hits skip their computed blocks). When KV blocks run out, the running request of highest rank
(see :mod:`servekit.sched.policy`) is preempted by recompute: its blocks are freed (full ones stay
in the prefix cache), it goes back to the waiting queue keeping its block hashes, and the step
admits nobody new. :meth:`Scheduler.update` appends the sampled tokens, finishes requests on
eos, stop tokens, ``max_tokens`` and ``max_model_len``, and frees their blocks.

The per-request work of a decode step is a few attribute reads and writes: the manager is
called only when a block fills (``commit`` then ``allocate``), never per token.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from operator import attrgetter

from servekit._speedups import resolve_speedups
from servekit.kv.manager import KVCacheManager
from servekit.metrics.events import (
    CacheStats,
    FirstToken,
    NewTokens,
    RequestFinished,
    RequestPreempted,
    RequestQueued,
    RequestScheduled,
)
from servekit.metrics.hooks import HookSet
from servekit.sched.errors import (
    DuplicateRequestError,
    QueueFull,
    SchedulerStateError,
    UnknownRequestError,
)
from servekit.sched.output import SchedulerOutput, UpdateResult
from servekit.sched.params import InvalidParameterError
from servekit.sched.policy import (
    SchedulingPolicy,
    VictimPolicy,
    make_policy,
    make_victim_policy,
)
from servekit.sched.request import (
    FINISHED,
    PREEMPTED,
    RUNNING,
    WAITING,
    FinishReason,
    Request,
)

try:
    from servekit.sched import _csched
except ImportError:  # not built (no compiler at install time): the pure-Python statements only
    _csched = None  # type: ignore[assignment]  # only used where Scheduler.speedups is True

_rank = attrgetter("rank")
_consume = deque[object](maxlen=0).extend  # runs an iterator to its end, in C


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
    return value


class Scheduler:
    """Continuous-batching scheduler with chunked prefill, preemption and pluggable policies.

    Drive it with one :meth:`schedule` then one :meth:`update` per engine step::

        out = scheduler.schedule()
        sampled = run_model(out)  # one token per entry with out.samples[i], in batch order
        result = scheduler.update(out, sampled)

    Args:
        kv: the KV cache manager that owns the blocks.
        max_model_len: a request's prompt plus output never exceeds this many tokens.
        max_num_seqs: at most this many requests run (hold blocks and are scheduled) at once
            (default 256, or the token budget when smaller).
        max_num_batched_tokens: token budget of one step, >= ``max_num_seqs`` (default
            ``max(2048, max_num_seqs)``).
        max_prefill_chunk: at most this many tokens of one request's prefill per step
            (default: the whole budget), so a long prompt never monopolises a step.
        policy: ``"fcfs"`` (default), ``"priority"``, ``"fair"``, a plugin spec
            (``'NAME:{"json": "kwargs"}'``) or a :class:`~servekit.sched.policy.SchedulingPolicy`.
        victim_policy: who is preempted first when blocks run out: a
            :class:`~servekit.sched.policy.VictimPolicy` or its spec (default: the scheduling
            policy's own ``running_rank``).
        eos_token_ids: tokens that end a request unless its ``ignore_eos`` is set.
        max_waiting_requests, max_waiting_tokens: bounds of the waiting queue (requests, and
            their prompt tokens); over either, :meth:`add_request` raises
            :class:`~servekit.sched.errors.QueueFull` carrying ``retry_after``.
        remember_finished: how many finished request ids :meth:`abort` still recognises.
        decode_lookahead_blocks: when a decoding request fills its last block, give it up to
            this many more blocks beyond the one it needs (default 15): as many as the pool
            can spare, ``num_free_blocks // (running + waiting requests) - 1``, and never more
            than it can still use, so the manager is called about once per ``lookahead + 1``
            blocks while blocks are plentiful, and once per block under pressure. A prompt
            admitted whole takes its lookahead at admission, leaving the other waiting prompts
            their blocks. 0 disables.
        hooks: metrics hooks (events are built only when a hook listens).
        clock: monotonic clock in seconds for arrival times, deadlines and events.
        speedups: run the per-request work of a decode step in the optional C core
            ``servekit.sched._csched``: None (default) when it is built and the environment
            variable ``SERVEKIT_NO_SPEEDUPS`` is unset, True to require it, False for pure
            Python. :attr:`speedups` says which is in use.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_model_len: int,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_prefill_chunk: int | None = None,
        policy: str | SchedulingPolicy | None = None,
        victim_policy: str | VictimPolicy | None = None,
        eos_token_ids: Iterable[int] = (),
        max_waiting_requests: int | None = None,
        max_waiting_tokens: int | None = None,
        retry_after: float = 1.0,
        remember_finished: int = 10_000,
        decode_lookahead_blocks: int = 15,
        hooks: HookSet | None = None,
        clock: Callable[[], float] = time.monotonic,
        speedups: bool | None = None,
    ) -> None:
        self.speedups = resolve_speedups(speedups, _csched, "servekit.sched._csched")
        self.kv = kv
        self.block_size = kv.block_size
        self.max_model_len = _positive("max_model_len", max_model_len)
        if max_num_seqs is None:
            max_num_seqs = min(256, max_num_batched_tokens or 256)
        self.max_num_seqs = _positive("max_num_seqs", max_num_seqs)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, self.max_num_seqs)
        self.max_num_batched_tokens = _positive("max_num_batched_tokens", max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"must be >= max_num_seqs ({max_num_seqs}) so every decode fits a step, "
                f"got {max_num_batched_tokens}",
            )
        if max_prefill_chunk is None:
            max_prefill_chunk = self.max_num_batched_tokens
        self.max_prefill_chunk = _positive("max_prefill_chunk", max_prefill_chunk)
        self.policy = make_policy(policy)
        self.victim_policy: VictimPolicy = (
            self.policy if victim_policy is None else make_victim_policy(victim_policy))
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_waiting_requests = (
            None if max_waiting_requests is None
            else _positive("max_waiting_requests", max_waiting_requests)
        )
        self.max_waiting_tokens = (
            None if max_waiting_tokens is None
            else _positive("max_waiting_tokens", max_waiting_tokens)
        )
        self.retry_after = retry_after
        self._remember = remember_finished
        if not isinstance(decode_lookahead_blocks, int) or decode_lookahead_blocks < 0:
            raise InvalidParameterError("decode_lookahead_blocks",
                                        f"must be an integer >= 0, got {decode_lookahead_blocks!r}")
        self._lookahead = decode_lookahead_blocks
        self.hooks = hooks if hooks is not None else HookSet()
        self._clock = clock

        self._requests: dict[str, Request] = {}  # every unfinished request
        self._decoding: list[Request] = []  # running, sampled since admission; sorted by rank
        # len(token_ids) - 1 of each request of _decoding (aligned): its computed tokens. Every
        # decoding request gains one token per step, so update() advances the whole list at once
        # and schedule() copies it, with no pass over the requests.
        self._decoding_comp: list[int] = []
        self._decoding_tokens: list[list[int]] = []  # token_ids of each of _decoding (aligned)
        self._prefilling: list[Request] = []  # running, still prefilling; sorted by rank
        self._recent: dict[str, None] = {}  # recently finished ids, oldest first
        self._deadlines: list[tuple[float, int, Request]] = []
        self._dead_deadlines = 0
        self._serial = count()
        self._admissions = count()
        self._waiting_tokens = 0
        self._in_flight: SchedulerOutput | None = None
        self._dirty = False  # a scheduled request finished between schedule() and update()
        self._pending_finished: list[Request] = []  # finished in schedule(), reported by update()
        self._kv_preempted = False
        self._step = 0  # schedule() calls so far
        # Decoding requests advance one token per step, so the step at which each needs a new
        # block, and the step at which it reaches its length limit, are known in advance.
        self._block_due: dict[int, list[Request]] = {}
        self._length_due: dict[int, list[Request]] = {}
        self._stop_token_union: set[int] = set(self.eos_token_ids)  # superset of all stop_ids
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new and preempted)."""
        return len(self.policy)

    @property
    def num_running(self) -> int:
        """Requests holding KV blocks."""
        return len(self._decoding) + len(self._prefilling)

    @property
    def num_unfinished(self) -> int:
        """Requests added and not finished."""
        return len(self._requests)

    @property
    def waiting_tokens(self) -> int:
        """Tokens of the requests in the waiting queue."""
        return self._waiting_tokens

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self._requests)

    def running(self) -> list[Request]:
        """The running requests: decoding ones, then prefilling ones, each in rank order."""
        return self._decoding + self._prefilling

    def get_request(self, request_id: str) -> Request:
        """The unfinished request with this id (UnknownRequestError otherwise)."""
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequestError(request_id) from None

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        """Queue a request.

        Raises InvalidParameterError (the prompt leaves no room for output under
        ``max_model_len``, or the request can never fit the KV cache), DuplicateRequestError,
        or QueueFull when the waiting queue is over a bound (an empty queue always accepts).
        """
        if not isinstance(request, Request):
            raise TypeError(f"request must be a servekit Request, got {type(request).__name__}")
        rid = request.request_id
        if rid in self._requests:
            raise DuplicateRequestError(rid)
        if request.status is not WAITING or request.block_ids or request.num_computed_tokens:
            raise InvalidParameterError("request", f"{rid!r} was already scheduled once")
        prompt_len = request.num_prompt_tokens
        max_len = self.max_model_len
        if prompt_len >= max_len:
            raise InvalidParameterError(
                "prompt_token_ids",
                f"has {prompt_len} tokens; max_model_len {max_len} allows at most {max_len - 1}",
            )
        params = request.params
        stop_len = min(prompt_len + params.max_tokens, max_len)
        bs = self.block_size
        if (stop_len - 1 + bs - 1) // bs > self.kv.num_blocks:
            field = "prompt_token_ids" if prompt_len > self.kv.num_blocks * bs else "max_tokens"
            raise InvalidParameterError(
                field,
                f"prompt {prompt_len} + max_tokens {params.max_tokens} needs more KV blocks than "
                f"the cache has ({self.kv.num_blocks} of {bs} tokens)",
            )
        num_waiting = len(self.policy)
        if num_waiting:
            if self.max_waiting_requests is not None and num_waiting >= self.max_waiting_requests:
                raise QueueFull("max_waiting_requests",
                                f"{num_waiting} requests are waiting", self.retry_after)
            if (self.max_waiting_tokens is not None
                    and self._waiting_tokens + prompt_len > self.max_waiting_tokens):
                raise QueueFull("max_waiting_tokens",
                                f"{self._waiting_tokens} prompt tokens are waiting", self.retry_after)
        now = self._clock()
        if request.arrival_time < 0:
            request.arrival_time = now
        request.stop_len = stop_len
        request.min_len = prompt_len + params.min_tokens
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        request.stop_ids = stop_ids
        self._stop_token_union |= stop_ids
        self._recent.pop(rid, None)
        self._requests[rid] = request
        self.policy.push(request)
        self._waiting_tokens += prompt_len
        if request.deadline is not None:
            if self._dead_deadlines > 64 and self._dead_deadlines * 2 > len(self._deadlines):
                self._deadlines = [e for e in self._deadlines if e[2].status is not FINISHED]
                heapq.heapify(self._deadlines)
                self._dead_deadlines = 0
            heapq.heappush(self._deadlines, (request.deadline, next(self._serial), request))
        hooks = self.hooks
        if hooks.wants.request_queued:
            hooks.on_request_queued(RequestQueued(rid, request.tenant, prompt_len, now))

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch (see :class:`~servekit.sched.output.SchedulerOutput`)."""
        if self._in_flight is not None:
            raise SchedulerStateError("schedule() called again before update() of the last step")
        out = SchedulerOutput()
        self._in_flight = out
        self._dirty = False
        self._kv_preempted = False
        step = self._step
        self._step = step + 1
        now = self._clock()
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now:
            self._expire(now, out)
        policy = self.policy
        if policy.preempts_for_waiting and len(policy) and self.num_running:
            self._preempt_for_waiting(out, now)

        # 1. one token for each decoding request; only those whose last block is full (known
        #    in advance: decoding requests advance one token per step) touch the KV manager
        due = self._block_due.pop(step, None)
        if due is not None:
            self._grow_decodes(due, step, out)
        decodes = self._decoding[:]
        comp = self._decoding_comp[:]
        budget = self.max_num_batched_tokens - len(decodes)

        # 2. the next chunk of each request still prefilling; 3. admit waiting requests
        pf_reqs: list[Request] = []
        pf_new: list[int] = []
        pf_comp: list[int] = []
        pf_samples: list[bool] = []
        if self._prefilling and budget > 0:
            budget = self._schedule_prefills(decodes, comp, pf_reqs, pf_new, pf_comp,
                                             pf_samples, out)
        if budget > 0 and not self._kv_preempted and len(policy):
            self._admit(budget, pf_reqs, pf_new, pf_comp, pf_samples, out, now)

        nd = len(decodes)
        out.decodes = decodes
        out.num_decodes = nd
        if pf_reqs:
            out.requests = decodes + pf_reqs
            out.num_new_tokens = [1] * nd + pf_new
            comp += pf_comp
            out.samples = [True] * nd + pf_samples
            out.num_samples = nd + sum(pf_samples)
            out.total_num_tokens = nd + sum(pf_new)
        else:
            out.requests = decodes
            out.num_new_tokens = [1] * nd
            out.samples = [True] * nd
            out.num_samples = nd
            out.total_num_tokens = nd
        out.num_computed_tokens = comp
        if policy.charges_tokens and out.requests:
            policy.charge(out.requests, out.num_new_tokens)
        return out

    def _grow_decodes(self, due: list[Request], step: int, out: SchedulerOutput) -> None:
        """Give one more block to each decoding request whose blocks are full at ``step``.

        Entries left by a preempted or finished request are skipped. When the pool is out of
        blocks the highest-ranked running request is preempted, possibly the requester itself.
        """
        kv = self.kv
        bs = self.block_size
        block_due = self._block_due
        # With blocks to spare, take several at once: fewer manager calls, never past what
        # the request can still use. Under pressure, exactly one.
        ahead = self._spare_lookahead()
        for i, r in enumerate(due):
            if r.status is not RUNNING or r.prefilling:
                continue
            c = len(r.token_ids) - 1
            if c < r.capacity:
                continue  # a stale entry: its current one is elsewhere
            want = c + 1 + ahead * bs
            if want > r.stop_len - 1:
                want = r.stop_len - 1
            if not kv.allocate(r, want) and not kv.allocate(r, c + 1):
                self._grow_under_pressure(sorted(due[i:], key=_rank), step, out)
                return
            r.capacity = len(r.block_ids) * bs
            _due_at(block_due, r.capacity - c + step, r)

    def _spare_lookahead(self) -> int:
        """Blocks a request may take beyond its need: up to ``decode_lookahead_blocks``, as many
        as the pool can spare for every running or waiting request."""
        ahead = self._lookahead
        if ahead:
            spare = self.kv.num_free_blocks // (self.num_running + len(self.policy) or 1) - 1
            if spare < ahead:
                ahead = spare if spare > 0 else 0
        return ahead

    def _grow_under_pressure(self, due: list[Request], step: int, out: SchedulerOutput) -> None:
        kv = self.kv
        bs = self.block_size
        for r in due:
            if r.status is not RUNNING or r.prefilling:
                continue
            c = len(r.token_ids) - 1
            if c < r.capacity:
                continue
            while not kv.allocate(r, c + 1):
                victim = self._victim()
                self._preempt(victim, out)
                if victim is r:
                    break
            else:
                r.capacity = len(r.block_ids) * bs
                _due_at(self._block_due, r.capacity - c + step, r)

    def _schedule_prefills(self, decodes: list[Request], comp: list[int],
                           pf_reqs: list[Request], pf_new: list[int], pf_comp: list[int],
                           pf_samples: list[bool], out: SchedulerOutput) -> int:
        """Schedule the next chunk of every running prefill; return the budget left."""
        kv = self.kv
        bs = self.block_size
        chunk = self.max_prefill_chunk
        total = self.max_num_batched_tokens
        used = len(decodes)
        prefilling = self._prefilling
        for r in prefilling:  # victims are popped from the end, so iteration stays valid
            budget = total - used
            if budget <= 0:
                break
            c = r._num_computed
            known = len(r.token_ids)
            n = min(known - c, chunk, budget)
            end = c + n
            if end > r.capacity:
                preempted_self = False
                while not kv.allocate(r, end):
                    victim = self._victim()
                    if decodes and victim is decodes[-1]:
                        decodes.pop()  # scheduled in pass 1: unschedule it
                        comp.pop()
                        used -= 1
                    self._preempt(victim, out)
                    if victim is r:
                        preempted_self = True
                        break
                if preempted_self:
                    break
                r.capacity = len(r.block_ids) * bs
            pf_reqs.append(r)
            pf_new.append(n)
            pf_comp.append(c)
            pf_samples.append(end == known)
            used += n
        return total - used

    def _admit(self, budget: int, pf_reqs: list[Request], pf_new: list[int],
               pf_comp: list[int], pf_samples: list[bool], out: SchedulerOutput,
               now: float) -> None:
        """Admit waiting requests in policy order while budget, slots and blocks allow."""
        kv = self.kv
        bs = self.block_size
        policy = self.policy
        chunk = self.max_prefill_chunk
        hooks = self.hooks
        prefilling = self._prefilling
        num_running = len(self._decoding) + len(prefilling)
        while budget > 0 and num_running < self.max_num_seqs:
            r = policy.peek()
            if r is None or (out.preempted and r in out.preempted):
                break  # never readmit a request in the step that preempted it
            known = len(r.token_ids)
            cached = kv.get_num_cached_tokens(r)
            n = min(known - cached, chunk, budget)
            end = cached + n
            want = self._admission_lookahead(r, end) if end == known else end
            if not kv.allocate(r, want, cached) and (
                    want == end or not kv.allocate(r, end, cached)):
                break
            policy.pop()
            self._waiting_tokens -= known
            r.status = RUNNING
            r._num_computed = cached
            r.capacity = len(r.block_ids) * bs
            r.prefilling = True
            r.rank = self.victim_policy.running_rank(r, next(self._admissions))
            _insert(prefilling, r)
            num_running += 1
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
                r.num_cached_tokens = cached
                if hooks.wants.request_scheduled:
                    hooks.on_request_scheduled(
                        RequestScheduled(r.request_id, r.tenant, r.arrival_time, cached, now))
            pf_reqs.append(r)
            pf_new.append(n)
            pf_comp.append(cached)
            pf_samples.append(cached + n == known)
            budget -= n

    def _admission_lookahead(self, r: Request, known: int) -> int:
        """Tokens to allocate for ``r``, whose whole prompt (``known`` tokens) is admitted now:
        with its decode lookahead when blocks are spare, so it needs one manager call instead
        of two (it decodes up to position ``stop_len - 2``). The blocks every other waiting
        prompt needs stay free (rounded up, assuming no prefix hits)."""
        ahead = self._spare_lookahead()
        others = len(self.policy) - 1
        if ahead and others:
            bs = self.block_size
            others += (self._waiting_tokens - known) // bs
            ahead = min(ahead, self.kv.num_free_blocks - known // bs - 1 - others)
        if ahead <= 0:
            return known
        return max(known, min(known + 1 + ahead * self.block_size, r.stop_len - 1))

    def _victim(self) -> Request:
        """The running request of highest rank (the next preemption victim)."""
        decoding = self._decoding
        prefilling = self._prefilling
        if not prefilling:
            return decoding[-1]
        if not decoding:
            return prefilling[-1]
        d, p = decoding[-1], prefilling[-1]
        return d if p.rank < d.rank else p

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        """Free the victim's blocks (full ones stay cached) and queue it for recompute."""
        kv = self.kv
        kv.commit(victim, victim.num_computed_tokens)
        kv.free(victim)
        if victim.prefilling:
            self._prefilling.remove(victim)
        else:
            self._remove_decoding(victim)
        victim.status = PREEMPTED
        victim._num_computed = 0
        victim.capacity = 0
        victim.prefilling = True
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.push_preempted(victim)
        self._waiting_tokens += len(victim.token_ids)
        self._kv_preempted = True
        out.preempted.append(victim)
        hooks = self.hooks
        if hooks.wants.request_preempted:
            hooks.on_request_preempted(
                RequestPreempted(victim.request_id, victim.tenant, self._clock()))

    def _preempt_for_waiting(self, out: SchedulerOutput, now: float) -> None:
        """Preempt lower-ranked running requests that keep the head of the queue out."""
        policy = self.policy
        bs = self.block_size
        while self.num_running:
            head = policy.peek()
            if head is None:
                return
            victim = self._victim()
            if not policy.outranks(head, victim):
                return
            first_chunk = min(len(head.token_ids), self.max_prefill_chunk,
                              self.max_num_batched_tokens)
            blocks_needed = (first_chunk + bs - 1) // bs
            if self.num_running < self.max_num_seqs and self.kv.num_free_blocks >= blocks_needed:
                return
            self._preempt(victim, out)
            self._kv_preempted = False  # this preemption is made precisely to admit `head`

    # ------------------------------------------------------------------ update

    def update(self, output: SchedulerOutput, sampled_token_ids: Sequence[int]) -> UpdateResult:
        """Apply one step's results.

        ``sampled_token_ids`` holds one token per entry of ``output`` whose ``samples[i]`` is
        true, in batch order (``output.num_samples`` tokens; the decodes' come first). Entries
        whose request was aborted or failed since :meth:`schedule` are skipped.
        """
        if output is not self._in_flight:
            raise SchedulerStateError("update() must get the output of the last schedule()")
        if len(sampled_token_ids) != output.num_samples:
            raise ValueError(
                f"sampled_token_ids: expected {output.num_samples} tokens (one per sampling "
                f"entry), got {len(sampled_token_ids)}")
        self._in_flight = None
        now = self._clock()
        if self._dirty:
            output, sampled_token_ids = _without_finished(output, sampled_token_ids)
        to_check: list[Request] = []
        check = to_check.append

        stops = self._stop_token_union
        decodes = output.decodes
        # decodes is _decoding (a finish in flight left both, see _without_finished), and the
        # decodes' tokens come first: append each (one pass in C either way), then each decode
        # has one more computed token for the next step
        if self.speedups:
            self._decoding_comp = _csched.advance_decodes(
                self._decoding_tokens, sampled_token_ids, self._decoding_comp)
        else:
            _consume(map(list.append, self._decoding_tokens, sampled_token_ids))
            self._decoding_comp = [c + 1 for c in self._decoding_comp]
        if stops and not stops.isdisjoint(sampled_token_ids):  # one C pass; exact check below
            for r, t in zip(decodes, sampled_token_ids, strict=False):
                if t in stops:
                    check(r)
        # requests reaching their length limit now were filed under this step in advance
        due = self._length_due.pop(self._step - 1, None)
        if due is not None:
            for r in due:
                if r.status is RUNNING and not r.prefilling and len(r.token_ids) >= r.stop_len:
                    check(r)

        hooks = self.hooks
        if len(output.requests) > output.num_decodes:
            new_reqs = decodes[:]
            self._update_prefills(output, sampled_token_ids, new_reqs, check, now)
        else:
            new_reqs = decodes
        new_tokens = list(sampled_token_ids)
        if hooks.wants.new_tokens:
            self._emit_new_tokens(new_reqs, now)

        finished = self._pending_finished
        self._pending_finished = []
        for r in to_check:
            if r.status is RUNNING:
                reason = _stop_reason(r)
                if reason is not None:
                    self._finish(r, reason, now)
                    finished.append(r)

        if hooks.wants.cache_stats:
            kv = self.kv
            hooks.on_cache_stats(CacheStats(kv.usage, kv.prefix_queries, kv.prefix_hits, now))
        return UpdateResult(new_reqs, new_tokens, finished)

    def _update_prefills(self, output: SchedulerOutput, sampled: Sequence[int],
                         new_reqs: list[Request], check: Callable[[Request], None],
                         now: float) -> None:
        kv = self.kv
        bs = self.block_size
        hooks = self.hooks
        reqs = output.requests
        num_new = output.num_new_tokens
        num_comp = output.num_computed_tokens
        samples = output.samples
        si = output.num_decodes
        step = self._step  # the next schedule()
        for j in range(output.num_decodes, len(reqs)):
            r = reqs[j]
            c0 = num_comp[j]
            c = c0 + num_new[j]
            r._num_computed = c
            if c // bs > c0 // bs:
                kv.commit(r, c)
            if not samples[j]:
                continue
            t = sampled[si]
            si += 1
            ti = r.token_ids
            ti.append(t)
            new_reqs.append(r)
            if r.first_token_time is None:
                r.first_token_time = r.last_token_time = now
                if hooks.wants.first_token:
                    hooks.on_first_token(FirstToken(r.request_id, r.tenant, r.arrival_time, now))
            n = len(ti)
            if n >= r.stop_len or t in r.stop_ids:
                check(r)
            # r decodes from now on: one token per step, so its next full block and its
            # length limit fall on known steps
            self._prefilling.remove(r)
            r.prefilling = False
            i = _insert(self._decoding, r)
            self._decoding_comp.insert(i, n - 1)
            self._decoding_tokens.insert(i, ti)
            _due_at(self._block_due, step + r.capacity - c, r)
            if n < r.stop_len:
                _due_at(self._length_due, step + r.stop_len - n - 1, r)

    def _remove_decoding(self, r: Request) -> None:
        i = self._decoding.index(r)
        del self._decoding[i]
        del self._decoding_comp[i]
        del self._decoding_tokens[i]

    def _emit_new_tokens(self, requests: list[Request], now: float) -> None:
        hooks = self.hooks
        for r in requests:
            if r.first_token_time == now and len(r.token_ids) - r.num_prompt_tokens == 1:
                continue  # the first token is reported by FirstToken
            hooks.on_new_tokens(NewTokens(r.request_id, r.tenant, 1, r.last_token_time, now))
            r.last_token_time = now

    # ------------------------------------------------------------------ finishing

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is; idempotent.

        Returns True when it aborted the request, False when the request had already finished
        (among the last ``remember_finished``). UnknownRequestError for an id never added.
        """
        return self.finish(request_id, FinishReason.ABORT)

    def finish_with_error(self, request_id: str, message: str) -> bool:
        """Finish a request with reason ``error`` (e.g. NaN logits); like :meth:`abort`."""
        return self.finish(request_id, FinishReason.ERROR, error=message)

    def finish(self, request_id: str, reason: FinishReason | str,
               error: str | None = None) -> bool:
        """Finish a request with ``reason`` (e.g. ``"stop"`` when the engine matched a stop
        string); returns False when it had already finished. See :meth:`abort`."""
        r = self._requests.get(request_id)
        if r is None:
            if request_id in self._recent:
                return False
            raise UnknownRequestError(request_id)
        if self._in_flight is not None and r.status is RUNNING:
            self._dirty = True
        if error is not None:
            r.error = error
        self._finish(r, FinishReason(reason), self._clock())
        return True

    def _finish(self, r: Request, reason: FinishReason, now: float) -> None:
        status = r.status
        if status is RUNNING:
            kv = self.kv
            kv.commit(r, r.num_computed_tokens)
            kv.free(r)
            if r.prefilling:
                self._prefilling.remove(r)
            else:
                self._remove_decoding(r)
        elif status is WAITING or status is PREEMPTED:
            self.policy.remove(r)
            self._waiting_tokens -= len(r.token_ids)
        else:
            raise SchedulerStateError(f"request {r.request_id!r} already finished")
        r.status = FINISHED
        r.finish_reason = reason
        rid = r.request_id
        del self._requests[rid]
        recent = self._recent
        recent[rid] = None
        if len(recent) > self._remember:
            del recent[next(iter(recent))]
        if r.deadline is not None:
            self._dead_deadlines += 1  # its heap entry is now dead weight
        hooks = self.hooks
        if hooks.wants.request_finished:
            hooks.on_request_finished(RequestFinished(
                rid, r.tenant, reason.value, r.num_prompt_tokens,
                len(r.token_ids) - r.num_prompt_tokens, r.num_cached_tokens, r.num_preemptions,
                r.arrival_time, r.first_scheduled_time, r.first_token_time, now))

    def _expire(self, now: float, out: SchedulerOutput) -> None:
        """Abort every request whose deadline has passed."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            r = heapq.heappop(deadlines)[2]
            if r.status is not FINISHED:
                r.error = "deadline exceeded"
                self._finish(r, FinishReason.ABORT, now)
                out.finished.append(r)
                self._pending_finished.append(r)
            self._dead_deadlines = max(0, self._dead_deadlines - 1)


def _insert(requests: list[Request], r: Request) -> int:
    """Insert r into a list sorted by rank (it usually belongs at or near the end); its index."""
    rank = r.rank
    i = len(requests)
    stop = max(0, i - 8)
    while i > stop and requests[i - 1].rank > rank:
        i -= 1
    if i == stop and stop and requests[i - 1].rank > rank:
        i = bisect_right(requests, rank, hi=stop, key=_rank)
    requests.insert(i, r)
    return i


def _due_at(table: dict[int, list[Request]], step: int, r: Request) -> None:
    entries = table.get(step)
    if entries is None:
        table[step] = [r]
    else:
        entries.append(r)


def _stop_reason(r: Request) -> FinishReason | None:
    """Why r must stop after its last token, or None (a stop token before min_tokens)."""
    n = len(r.token_ids)
    if r.token_ids[-1] in r.stop_ids and n >= r.min_len:
        return FinishReason.STOP
    if n >= r.stop_len:
        return FinishReason.LENGTH
    return None


def _without_finished(output: SchedulerOutput,
                      sampled: Sequence[int]) -> tuple[SchedulerOutput, list[int]]:
    """A copy of output (and its tokens) without the requests that finished in flight."""
    kept = SchedulerOutput()
    tokens: list[int] = []
    si = 0
    for j, r in enumerate(output.requests):
        sample = output.samples[j]
        if r.status is RUNNING:
            kept.requests.append(r)
            kept.num_new_tokens.append(output.num_new_tokens[j])
            kept.num_computed_tokens.append(output.num_computed_tokens[j])
            kept.samples.append(sample)
            if sample:
                tokens.append(sampled[si])
            if j < output.num_decodes:
                kept.num_decodes += 1
        if sample:
            si += 1
    kept.decodes = kept.requests[: kept.num_decodes]
    kept.num_samples = len(tokens)
    kept.total_num_tokens = sum(kept.num_new_tokens)
    return kept, tokens
