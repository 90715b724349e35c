"""What one scheduler step hands the engine, and what the engine's results give back."""

from __future__ import annotations

from attrs import frozen

from servekit.sched.request import Request

__all__ = ["SchedulerOutput", "StepShape", "UpdateResult", "shape_of"]


class SchedulerOutput:
    """One step's batch, as plain parallel lists in batch order.

    Entry ``i`` runs ``num_new_tokens[i]`` tokens of ``requests[i]``: the tokens
    ``requests[i].token_ids[num_computed_tokens[i] : num_computed_tokens[i] + num_new_tokens[i]]``
    at those positions, over a context whose first ``num_computed_tokens[i]`` tokens are already
    in the KV cache. ``requests[i].block_ids`` is its block table (covering every position of the
    step). When ``samples[i]`` is true the step reaches the end of the known tokens and the engine
    samples one token from the logits of the entry's last position; a partial prefill chunk
    samples nothing.

    The first ``num_decodes`` entries are decodes (one token, sampling); the rest are prefill
    chunks, continuing ones before newly admitted ones. ``preempted`` lists the requests that lost
    their blocks this step (they will be recomputed), ``finished`` those that ended inside
    :meth:`~servekit.sched.scheduler.Scheduler.schedule` (their deadline passed). Treat the lists
    as read-only (``requests`` and ``decodes`` may be the same list).
    """

    __slots__ = (
        "decodes",
        "finished",
        "num_computed_tokens",
        "num_decodes",
        "num_new_tokens",
        "num_samples",
        "preempted",
        "requests",
        "samples",
        "total_num_tokens",
    )

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.num_new_tokens: list[int] = []
        self.num_computed_tokens: list[int] = []
        self.samples: list[bool] = []
        self.num_decodes = 0
        self.num_samples = 0
        self.total_num_tokens = 0
        self.decodes: list[Request] = []  # requests[:num_decodes]
        self.preempted: list[Request] = []
        self.finished: list[Request] = []

    def set_batch(self, decodes: list[Request], prefills: list[Request],
                  prefill_tokens: list[int]) -> None:
        """Lay out the step: ``decodes`` (one token each), then ``prefills`` with
        ``prefill_tokens[i]`` new tokens each, from their current computed tokens."""
        nd = len(decodes)
        pf_computed = [r.num_computed_tokens for r in prefills]
        pf_samples = [c + n == len(r.token_ids)
                      for r, c, n in zip(prefills, pf_computed, prefill_tokens, strict=True)]
        self.decodes = decodes
        self.num_decodes = nd
        self.requests = decodes + prefills
        self.num_new_tokens = [1] * nd + prefill_tokens
        self.num_computed_tokens = [len(r.token_ids) - 1 for r in decodes] + pf_computed
        self.samples = [True] * nd + pf_samples
        self.num_samples = nd + sum(pf_samples)
        self.total_num_tokens = nd + sum(prefill_tokens)

    @property
    def sampling_requests(self) -> list[Request]:
        """The requests that sample this step, in batch order (aligned with update's tokens)."""
        nd = self.num_decodes  # decodes always sample
        tail = zip(self.requests[nd:], self.samples[nd:], strict=True)
        return self.requests[:nd] + [r for r, s in tail if s]

    def __len__(self) -> int:
        return len(self.requests)

    def __repr__(self) -> str:
        return (
            f"SchedulerOutput({len(self.requests)} requests, {self.num_decodes} decodes, "
            f"{self.total_num_tokens} tokens, {len(self.preempted)} preempted)"
        )


class UpdateResult:
    """What one :meth:`~servekit.sched.scheduler.Scheduler.update` produced.

    ``requests[i]`` received the token ``new_token_ids[i]`` (including a final eos or stop token;
    stop strings are the engine's to match). ``finished`` lists every request that ended during
    this step (in update, or in the schedule() that preceded it): status ``FINISHED``, with
    ``finish_reason`` set and its blocks freed.
    """

    __slots__ = ("finished", "new_token_ids", "requests")

    def __init__(self, requests: list[Request], new_token_ids: list[int],
                 finished: list[Request]) -> None:
        self.requests = requests
        self.new_token_ids = new_token_ids
        self.finished = finished

    def __repr__(self) -> str:
        return f"UpdateResult({len(self.requests)} new tokens, {len(self.finished)} finished)"


@frozen(slots=True)
class StepShape:
    """One step's work: ``prefill_tokens`` (new tokens of prefill chunks), ``decodes`` (rows
    generating one token), ``kv_tokens`` (context tokens whose KV the step reads, new ones
    included) and ``attention_pairs`` (query-key pairs computed: sum over entries of
    ``n * (c + (n + 1) / 2)`` for ``n`` new tokens over ``c`` cached ones)."""

    prefill_tokens: int
    decodes: int
    kv_tokens: int
    attention_pairs: float

    @property
    def tokens(self) -> int:
        """Tokens the step computes."""
        return self.prefill_tokens + self.decodes


def shape_of(out: SchedulerOutput) -> StepShape:
    """The shape of a scheduler step."""
    nd = out.num_decodes
    computed = out.num_computed_tokens
    dec_ctx = sum(computed[:nd]) + nd
    pairs = float(dec_ctx)
    pf_tokens = out.total_num_tokens - nd
    kv = dec_ctx
    if pf_tokens:
        for c, n in zip(computed[nd:], out.num_new_tokens[nd:], strict=True):
            kv += c + n
            pairs += n * (c + (n + 1) / 2)
    return StepShape(pf_tokens, nd, kv, pairs)
