"""Token-budget continuous batching over the KV cache manager: one running list (sorted by the
policy's rank) and the policy's waiting queue.

Each :meth:`Scheduler.schedule` gives one token to each decoding request, then a chunk to each
request still prefilling, then chunks to newly admitted ones, asking the KV manager for the blocks
each needs; out of blocks, the running request of highest rank is preempted by recompute and the
step admits nobody new. :meth:`Scheduler.update` appends the sampled tokens, commits the KV
written and finishes requests (eos, stop tokens, ``max_tokens``, ``max_model_len``).
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from operator import attrgetter

from servekit._validators import int_at_least
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
    QueueFullError,
    SchedulerStateError,
    UnknownRequestError,
)
from servekit.sched.output import SchedulerOutput, UpdateResult
from servekit.sched.params import InvalidParameterError
from servekit.sched.policy import SchedulingPolicy, VictimPolicy, make_policy, make_victim_policy
from servekit.sched.request import FINISHED, PREEMPTED, RUNNING, WAITING, FinishReason, Request

_rank = attrgetter("rank")
_AT_LEAST_ONE = int_at_least(1, error=InvalidParameterError)


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
            :class:`~servekit.sched.errors.QueueFullError` carrying ``retry_after``.
        remember_finished: how many finished request ids :meth:`abort` still recognises.
        hooks: metrics hooks (events are built only when a hook listens).
        clock: monotonic clock in seconds for arrival times, deadlines and events.
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
        hooks: HookSet | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.max_model_len = _AT_LEAST_ONE.check("max_model_len", max_model_len)
        if max_num_seqs is None:
            max_num_seqs = min(256, max_num_batched_tokens or 256)
        self.max_num_seqs = _AT_LEAST_ONE.check("max_num_seqs", max_num_seqs)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, self.max_num_seqs)
        self.max_num_batched_tokens = _AT_LEAST_ONE.check("max_num_batched_tokens", max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"must be >= max_num_seqs ({max_num_seqs}) so every decode fits a step, "
                f"got {max_num_batched_tokens}",
            )
        if max_prefill_chunk is None:
            max_prefill_chunk = self.max_num_batched_tokens
        self.max_prefill_chunk = _AT_LEAST_ONE.check("max_prefill_chunk", max_prefill_chunk)
        self.policy = make_policy(policy)
        self.victim_policy: VictimPolicy = (
            self.policy if victim_policy is None else make_victim_policy(victim_policy))
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_waiting_requests = (None if max_waiting_requests is None
                                     else _AT_LEAST_ONE.check("max_waiting_requests", max_waiting_requests))
        self.max_waiting_tokens = (None if max_waiting_tokens is None
                                   else _AT_LEAST_ONE.check("max_waiting_tokens", max_waiting_tokens))
        self.retry_after = retry_after
        self._remember = remember_finished
        self.hooks = hooks if hooks is not None else HookSet()
        self._clock = clock

        self._requests: dict[str, Request] = {}  # every unfinished request
        self._running: list[Request] = []  # holding blocks, sorted by rank
        self._recent: dict[str, None] = {}  # recently finished ids, oldest first
        self._deadlines: list[tuple[float, int, Request]] = []  # a heap; finished ones linger
        self._serial = count()
        self._admissions = count()
        self._waiting_tokens = 0
        self._in_flight: SchedulerOutput | None = None
        self._finished_in_schedule: list[Request] = []  # reported by the next update()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new and preempted)."""
        return len(self.policy)

    @property
    def num_running(self) -> int:
        """Requests holding KV blocks."""
        return len(self._running)

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
        """The running requests, in rank order (the last is the next preemption victim)."""
        return list(self._running)

    def get_request(self, request_id: str) -> Request:
        """The unfinished request with this id (UnknownRequestError otherwise)."""
        if (r := self._requests.get(request_id)) is None:
            raise UnknownRequestError(request_id)
        return r

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        """Queue a request.

        Raises InvalidParameterError (the prompt leaves no room for output under
        ``max_model_len``, or the request can never fit the KV cache), DuplicateRequestError,
        or QueueFullError when the waiting queue is over a bound (an empty queue always accepts;
        waiting requests that free running slots will take do not count against
        ``max_waiting_requests``).
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
        known = len(request.token_ids)  # the prompt, plus any resumed output tokens
        if known >= stop_len:
            raise InvalidParameterError(
                "output_token_ids",
                f"{known - prompt_len} resumed output tokens leave no room under max_tokens "
                f"{params.max_tokens} / max_model_len {max_len}",
            )
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
            # requests that the next step starts in a free running slot do not queue behind others
            queued = num_waiting - max(0, self.max_num_seqs - len(self._running))
            if self.max_waiting_requests is not None and queued >= self.max_waiting_requests:
                raise QueueFullError("max_waiting_requests",
                                f"{num_waiting} requests are waiting", self.retry_after)
            if (self.max_waiting_tokens is not None
                    and self._waiting_tokens + known > self.max_waiting_tokens):
                raise QueueFullError("max_waiting_tokens",
                                f"{self._waiting_tokens} prompt tokens are waiting", self.retry_after)
        now = self._clock()
        if request.arrival_time < 0:
            request.arrival_time = now
        request.stop_len = stop_len
        request.min_len = prompt_len + params.min_tokens
        stop_ids = frozenset(params.stop_token_ids)
        request.stop_ids = stop_ids if params.ignore_eos else stop_ids | self.eos_token_ids
        self._recent.pop(rid, None)
        self._requests[rid] = request
        self.policy.push(request)
        self._waiting_tokens += known
        if request.deadline is not None:
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(self._requests) + 64:  # drop finished requests' entries
                deadlines[:] = [e for e in deadlines if e[2].status is not FINISHED]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (request.deadline, next(self._serial), request))
        hooks = self.hooks
        if hooks.wants.request_queued:
            hooks.on_request_queued(RequestQueued(rid, request.tenant, prompt_len, now))

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch (see :class:`~servekit.sched.output.SchedulerOutput`)."""
        if self._in_flight is not None:
            raise SchedulerStateError("schedule() called again before update() of the last step")
        out = self._in_flight = SchedulerOutput()
        now = self._clock()
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire(now, out)
        policy = self.policy
        if policy.preempts_for_waiting and len(policy) and self._running:
            self._preempt_for_waiting(out)
        preempted_to_admit = len(out.preempted)

        # 1. one token for each decoding request (the budget always has room for them); only
        #    a request whose last block is full needs the KV manager
        decodes: list[Request] = []
        prefilling: list[Request] = []
        bs = self.block_size
        for r in self._running[:]:
            if r.prefilling:
                prefilling.append(r)
            elif r.status is RUNNING and (len(r.token_ids) <= len(r.block_ids) * bs
                                          or self._allocate(r, len(r.token_ids), out, decodes)):
                decodes.append(r)

        # 2. the next chunk of each request still prefilling
        prefills: list[Request] = []
        pf_new: list[int] = []
        total, chunk = self.max_num_batched_tokens, self.max_prefill_chunk
        used = 0
        for r in prefilling:
            budget = total - len(decodes) - used
            if budget <= 0:
                break
            if r.status is not RUNNING:  # preempted above
                continue
            c = r._num_computed
            n = min(len(r.token_ids) - c, chunk, budget)
            if not self._allocate(r, c + n, out, decodes):
                break
            prefills.append(r)
            pf_new.append(n)
            used += n

        # 3. admit waiting requests, unless this step preempted for lack of blocks
        budget = total - len(decodes) - used
        if budget > 0 and len(out.preempted) == preempted_to_admit and len(policy):
            self._admit(budget, prefills, pf_new, out, now)

        out.set_batch(decodes, prefills, pf_new)
        if policy.charges_tokens and out.requests:
            policy.charge(out.requests, out.num_new_tokens)
        return out

    def _allocate(self, r: Request, num_tokens: int, out: SchedulerOutput,
                  decodes: list[Request]) -> bool:
        """Blocks for ``r``'s first ``num_tokens`` tokens, preempting the highest-ranked running
        requests until they fit; False when ``r`` itself had to be preempted."""
        while not self.kv.allocate(r, num_tokens):
            victim = self._preempt_last(out)
            if decodes and victim is decodes[-1]:
                decodes.pop()  # scheduled earlier in this step: unschedule it
            if victim is r:
                return False
        return True

    def _admit(self, budget: int, prefills: list[Request], pf_new: list[int],
               out: SchedulerOutput, now: float) -> None:
        """Admit waiting requests in policy order while budget, slots and blocks allow."""
        kv, policy, hooks = self.kv, self.policy, self.hooks
        while budget > 0 and len(self._running) < self.max_num_seqs:
            r = policy.peek()
            if r is None or r in out.preempted:
                break  # never readmit a request in the step that preempted it
            known = len(r.token_ids)
            cached = kv.get_num_cached_tokens(r)
            n = min(known - cached, self.max_prefill_chunk, budget)
            if not kv.allocate(r, cached + n, cached):
                break
            policy.pop()
            self._waiting_tokens -= known
            r.status = RUNNING
            r._num_computed = cached
            r.prefilling = True
            r.rank = self.victim_policy.running_rank(r, next(self._admissions))
            insort(self._running, r, key=_rank)
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
                r.num_cached_tokens = cached
                if hooks.wants.request_scheduled:
                    hooks.on_request_scheduled(
                        RequestScheduled(r.request_id, r.tenant, r.arrival_time, cached, now))
            prefills.append(r)
            pf_new.append(n)
            budget -= n

    def _preempt_last(self, out: SchedulerOutput) -> Request:
        """Preempt the running request of highest rank: free its blocks (full ones stay cached)
        and queue it for recompute. Returns it."""
        victim = self._running.pop()
        self.kv.commit(victim, victim.num_computed_tokens)
        self.kv.free(victim)
        victim.status = PREEMPTED
        victim._num_computed = 0
        victim.prefilling = True
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.push_preempted(victim)
        self._waiting_tokens += len(victim.token_ids)
        out.preempted.append(victim)
        if self.hooks.wants.request_preempted:
            self.hooks.on_request_preempted(
                RequestPreempted(victim.request_id, victim.tenant, self._clock()))
        return victim

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        """Preempt lower-ranked running requests that keep the head of the queue out."""
        policy, bs = self.policy, self.block_size
        while self._running:
            head = policy.peek()
            if head is None:
                return
            if not policy.outranks(head, self._running[-1]):
                return
            first_chunk = min(len(head.token_ids), self.max_prefill_chunk,
                              self.max_num_batched_tokens)
            blocks_needed = (first_chunk + bs - 1) // bs
            if (len(self._running) < self.max_num_seqs
                    and self.kv.num_free_blocks >= blocks_needed):
                return
            self._preempt_last(out)

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
        kv, hooks = self.kv, self.hooks
        wants = hooks.wants
        want_first, want_new = wants.first_token, wants.new_tokens
        finished, self._finished_in_schedule = self._finished_in_schedule, []
        nd = output.num_decodes
        # the KV of every scheduled prefill chunk is written now: full blocks become hittable
        # (blocks filled while decoding are committed in one call when the request finishes
        # or is preempted)
        for r, n in zip(output.requests[nd:], output.num_new_tokens[nd:], strict=True):
            if r.status is RUNNING:  # not finished (aborted, failed) since schedule()
                r._num_computed += n
                kv.commit(r, r._num_computed)
        # each sampling request gets its token: decodes first, then prefills that reached the
        # end of their known tokens (and decode from now on)
        requests: list[Request] = []
        new_tokens: list[int] = []
        for r, t in zip(output.sampling_requests, sampled_token_ids, strict=True):
            if r.status is not RUNNING:
                continue
            token_ids = r.token_ids
            token_ids.append(t)
            r.prefilling = False
            requests.append(r)
            new_tokens.append(t)
            if r.first_token_time is None:
                r.first_token_time = r.last_token_time = now
                if want_first:
                    hooks.on_first_token(FirstToken(r.request_id, r.tenant, r.arrival_time, now))
            elif want_new:
                hooks.on_new_tokens(NewTokens(r.request_id, r.tenant, 1, r.last_token_time, now))
                r.last_token_time = now
            num = len(token_ids)
            stop = t in r.stop_ids and num >= r.min_len
            if stop or num >= r.stop_len:
                self._finish(r, FinishReason.STOP if stop else FinishReason.LENGTH, now)
                finished.append(r)
        if wants.cache_stats:
            hooks.on_cache_stats(CacheStats(kv.usage, kv.prefix_queries, kv.prefix_hits, now))
        return UpdateResult(requests, new_tokens, finished)

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
        if error is not None:
            r.error = error
        self._finish(r, FinishReason(reason), self._clock())
        return True

    def _finish(self, r: Request, reason: FinishReason, now: float) -> None:
        status = r.status
        if status is RUNNING:
            self.kv.commit(r, r.num_computed_tokens)
            self.kv.free(r)
            running = self._running
            i = bisect_left(running, r.rank, key=_rank)  # ranks may tie: find r itself
            while running[i] is not r:
                i += 1
            del running[i]
        elif status is WAITING or status is PREEMPTED:
            self.policy.remove(r)
            self._waiting_tokens -= len(r.token_ids)
        else:
            raise SchedulerStateError(f"request {r.request_id!r} already finished")
        r.status = FINISHED
        r.finish_reason = reason
        rid = r.request_id
        del self._requests[rid]
        self._recent[rid] = None
        if len(self._recent) > self._remember:
            del self._recent[next(iter(self._recent))]
        if self.hooks.wants.request_finished:
            self.hooks.on_request_finished(RequestFinished(
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
                self._finished_in_schedule.append(r)
