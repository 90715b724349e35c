"""A fake deterministic model and an engine loop for driving the real scheduler.

The fake model keeps a simulated paged KV cache (one token id per slot). For every scheduled
entry it writes the new tokens into the slots the block table gives, then reads the whole
context back through the block table and checks it equals the request's tokens: a wrong block
table, a wrong prefix-cache hit or a block reused while still in use fails right there. The
next token is a function of the context alone, so a request's output never depends on batching,
chunking, preemption, prefix caching or the scheduling policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from servekit.kv.manager import KVCacheManager
from servekit.sched import Request, SamplingParams, Scheduler, SchedulerOutput, UpdateResult
from servekit.testing._check import InvariantViolationError, check

VOCAB = 23
EOS = 0


def next_token(context: Sequence[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    h = len(context) * 2654435761
    for t in context[-4:]:
        h = (h * 31 + t) & 0xFFFFFFFF
    return h % VOCAB


def reference_output(prompt: Sequence[int], params: SamplingParams, max_model_len: int,
                     eos: int | None = EOS) -> list[int]:
    """What a request generates alone: the fake model run to its stopping rule."""
    tokens = list(prompt)
    stops = set(params.stop_token_ids)
    if eos is not None and not params.ignore_eos:
        stops.add(eos)
    limit = min(len(prompt) + params.max_tokens, max_model_len)
    while True:
        t = next_token(tokens)
        tokens.append(t)
        n_out = len(tokens) - len(prompt)
        if (t in stops and n_out >= params.min_tokens) or len(tokens) >= limit:
            return tokens[len(prompt):]


class FakeModel:
    """Runs scheduler outputs against a simulated paged KV cache."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.block_size = kv.block_size
        self.slots: list[int | None] = [None] * (kv.num_blocks * kv.block_size)

    def _slot(self, r: Request, pos: int) -> int:
        bs = self.block_size
        return r.block_ids[pos // bs] * bs + pos % bs

    def run(self, out: SchedulerOutput) -> list[int]:
        """Write and read back every scheduled token; one sampled token per sampling entry."""
        sampled = []
        for r, n, c, sample in zip(out.requests, out.num_new_tokens, out.num_computed_tokens,
                                   out.samples, strict=True):
            rid = r.request_id
            check(n >= 1, "every scheduled entry has tokens", f"{rid} scheduled with {n}")
            check(c + n <= len(r.token_ids), "never schedule tokens a request does not have",
                  f"{rid}: computed {c} + new {n} > {len(r.token_ids)} tokens")
            check(len(r.block_ids) * self.block_size >= c + n, "block table covers the batch",
                  f"{rid}: {len(r.block_ids)} blocks for {c + n} tokens")
            for pos in range(c, c + n):
                self.slots[self._slot(r, pos)] = r.token_ids[pos]
            context = [self.slots[self._slot(r, pos)] for pos in range(c + n)]
            check(context == r.token_ids[: c + n], "KV read back through the block table",
                  f"the KV of {rid} is wrong (a block shared or reused while in use)")
            check(sample == (c + n == len(r.token_ids)), "sample exactly at the last token",
                  f"{rid}: sample={sample} at {c + n} of {len(r.token_ids)} tokens")
            if sample:
                sampled.append(next_token(r.token_ids[: c + n]))
        check(len(sampled) == out.num_samples, "num_samples matches the batch",
              f"{len(sampled)} != {out.num_samples}")
        return sampled


def step(scheduler: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, UpdateResult]:
    """One engine step, checking the batch stays within the scheduler's budgets."""
    out = scheduler.schedule()
    check(out.num_computed_tokens == [r.num_computed_tokens for r in out.requests],
          "batch records each request's computed tokens")
    check(out.total_num_tokens == sum(out.num_new_tokens), "batch total is the sum of entries")
    check(out.total_num_tokens <= scheduler.max_num_batched_tokens, "token budget respected",
          f"{out.total_num_tokens} tokens > max_num_batched_tokens "
          f"{scheduler.max_num_batched_tokens}")
    check(len(out.requests) <= scheduler.max_num_seqs, "sequence budget respected",
          f"{len(out.requests)} requests > max_num_seqs {scheduler.max_num_seqs}")
    check(len({id(r) for r in out.requests}) == len(out.requests),
          "nothing duplicated", "a request appears twice in one batch")
    check(all(n == 1 for n in out.num_new_tokens[: out.num_decodes]), "decodes take one token")
    check(all(n <= scheduler.max_prefill_chunk for n in out.num_new_tokens),
          "prefill chunk respected", f"an entry exceeds max_prefill_chunk "
          f"{scheduler.max_prefill_chunk}: {out.num_new_tokens}")
    result = scheduler.update(out, model.run(out))
    return out, result


def drain(scheduler: Scheduler, model: FakeModel, max_steps: int = 10_000) -> int:
    """Step until every request finished; returns the number of steps."""
    for i in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return i
        step(scheduler, model)
    raise InvariantViolationError("every request finishes or is aborted",
                             f"requests still unfinished after {max_steps} steps")
