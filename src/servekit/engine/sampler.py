"""Batched sampling on one step's logits: penalties, temperature, top-k / top-p / min-p, seeds.

One :class:`SamplingBatch` describes the rows of a step (built once per step from the requests'
:class:`~servekit.sched.params.SamplingParams`); :class:`Sampler` turns ``[rows, vocab]`` logits
into one token per row plus the requested log-probabilities. Every operation is batched over the
rows; the only per-row Python is for rows that carry their own seeded ``torch.Generator``.
Features nobody in the batch uses cost nothing (no penalty tensors, no sort, no log-softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from attrs import define, frozen

from servekit.sched.params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "apply_token_bitmask", "position_seed"]

_NEG_INF = float("-inf")
_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded request's draw for output ``position``: a function of
    ``(seed, position)`` only (splitmix64), so the same request resumed on another replica,
    recomputed after preemption or batched differently draws the same noise at each position.
    """
    z = ((seed & _MASK64) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # < 2**63: any torch generator takes it


@define(slots=True)
class SamplingBatch:
    """The sampling parameters of one step's rows, as tensors on the logits' device.

    Build it with :meth:`build`. ``generators[i]`` is row ``i``'s seeded generator (or absent);
    ``banned`` lists, per row, token ids masked to -inf (eos / stop ids before ``min_tokens``).
    """

    num_rows: int
    all_greedy: bool
    greedy: torch.Tensor | None  # bool [rows]; None when all rows are greedy or none is
    temperature: torch.Tensor | None  # float [rows, 1], greedy rows set to 1
    top_k: torch.Tensor | None  # long [rows], vocab size where disabled
    top_p: torch.Tensor | None  # float [rows], 1 where disabled
    min_p: torch.Tensor | None  # float [rows, 1], 0 where disabled
    repetition_penalty: torch.Tensor | None  # float [rows, 1]
    presence_penalty: torch.Tensor | None  # float [rows, 1]
    frequency_penalty: torch.Tensor | None  # float [rows, 1]
    prompt_ids: torch.Tensor | None  # long [rows, P], padded with vocab_size
    output_ids: torch.Tensor | None  # long [rows, O], padded with vocab_size
    generators: dict[int, torch.Generator]
    banned: dict[int, Sequence[int]]
    max_logprobs: int | None  # largest top-n asked for; None when no row wants logprobs
    # guided decoding: int32 [len(mask_rows), ceil(vocab / 32)] allowed-token bits of the rows
    # ``mask_rows`` (filled by the engine each step; see servekit.structured)
    mask_rows: list[int] | None = None
    bitmask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        *,
        vocab_size: int,
        device: torch.device,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        output_ids: Sequence[Sequence[int]] | None = None,
        generators: dict[int, torch.Generator] | None = None,
        banned: dict[int, Sequence[int]] | None = None,
    ) -> SamplingBatch:
        """Tensors for ``params`` (one per row); token histories are needed only for penalties."""
        n = len(params)
        greedy_flags = [p.temperature == 0.0 for p in params]
        all_greedy = all(greedy_flags)
        any_greedy = any(greedy_flags)
        temperature = top_k = top_p = min_p = None
        greedy = None
        if not all_greedy:
            if any_greedy:
                greedy = torch.tensor(greedy_flags, dtype=torch.bool, device=device)
            temps = [1.0 if g else p.temperature for p, g in zip(params, greedy_flags, strict=True)]
            if any(t != 1.0 for t in temps):
                temperature = _column(temps, device)
            if any(0 < p.top_k < vocab_size for p in params):
                top_k = torch.tensor(
                    [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                    dtype=torch.long, device=device,
                )
            if any(p.top_p < 1.0 for p in params):
                top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            if any(p.min_p > 0.0 for p in params):
                min_p = _column([p.min_p for p in params], device)
        rep = pres = freq = None
        p_ids = o_ids = None
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = _column([p.repetition_penalty for p in params], device)
        if any(p.presence_penalty != 0.0 for p in params):
            pres = _column([p.presence_penalty for p in params], device)
        if any(p.frequency_penalty != 0.0 for p in params):
            freq = _column([p.frequency_penalty for p in params], device)
        if rep is not None or pres is not None or freq is not None:
            if output_ids is None or (rep is not None and prompt_ids is None):
                raise ValueError("penalties need the rows' prompt_ids and output_ids")
            o_ids = _pad(output_ids, vocab_size, device)
            if rep is not None and prompt_ids is not None:
                p_ids = _pad(prompt_ids, vocab_size, device)
        lp = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=n, all_greedy=all_greedy, greedy=greedy, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
            presence_penalty=pres, frequency_penalty=freq, prompt_ids=p_ids, output_ids=o_ids,
            generators=dict(generators or {}), banned=dict(banned or {}),
            max_logprobs=max(lp) if lp else None,
        )


@frozen(slots=True)
class SamplerOutput:
    """One step's sampling result, rows in batch order (tensors on the logits' device).

    ``logprobs`` is the sampled token's log-probability under the model's raw distribution
    (before penalties, temperature and filters), ``top_ids`` / ``top_logprobs`` the
    ``max_logprobs`` most likely tokens; all None when no row asked. ``bad_rows`` flags rows
    whose logits held NaN: their token is meaningless and the request must fail.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    bad_rows: torch.Tensor


class Sampler:
    """Picks one token per row of ``[rows, vocab]`` logits (modified in place).

    Rows without a seed draw from ``generator`` (an injected RNG; torch's default when None).
    """

    __slots__ = ("generator",)

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample ``batch``'s rows from ``logits`` (float32 ``[rows, vocab]``)."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        bad_rows = logits.isnan().any(dim=-1)
        raw_logprobs = None
        if batch.max_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if batch.banned:
            rows = [row for row, ids in batch.banned.items() for _ in ids]
            cols = [t for ids in batch.banned.values() for t in ids]
            logits[torch.tensor(rows), torch.tensor(cols)] = _NEG_INF
        if batch.bitmask is not None and batch.mask_rows:
            apply_token_bitmask(logits, batch.bitmask, batch.mask_rows)
        _apply_penalties(logits, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = _sample_random(logits, batch, self.generator)
        logprobs = top_ids = top_lp = None
        if raw_logprobs is not None and batch.max_logprobs is not None:
            logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            if batch.max_logprobs > 0:
                top_lp, top_ids = raw_logprobs.topk(batch.max_logprobs, dim=-1)
        return SamplerOutput(token_ids, logprobs, top_ids, top_lp, bad_rows)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set ``logits[rows[i], t]`` to -inf where bit ``t`` of ``bitmask[i]`` is clear."""
    n, vocab = len(rows), logits.shape[1]
    shifts = _SHIFTS.to(bitmask.device)
    allowed = ((bitmask[:n].unsqueeze(-1) >> shifts) & 1).view(n, -1)[:, :vocab]
    blocked = (allowed == 0).to(logits.device)
    if n == logits.shape[0] and list(rows) == list(range(n)):
        logits.masked_fill_(blocked, _NEG_INF)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(blocked, _NEG_INF)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    rows, vocab = logits.shape
    if batch.output_ids is None:
        return
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, batch.output_ids, torch.ones_like(batch.output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    if batch.repetition_penalty is not None:
        seen = counts > 0
        if batch.prompt_ids is not None:
            in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
            in_prompt.scatter_(1, batch.prompt_ids, True)
            seen |= in_prompt[:, :vocab]
        penalty = batch.repetition_penalty.expand(rows, vocab)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, scaled, logits))
    if batch.frequency_penalty is not None:
        logits -= batch.frequency_penalty * counts
    if batch.presence_penalty is not None:
        logits -= batch.presence_penalty * (counts > 0).to(logits.dtype)


def _sample_random(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    greedy_ids = logits.argmax(dim=-1) if batch.greedy is not None else None
    if batch.temperature is not None:
        logits.div_(batch.temperature)
    if batch.top_k is not None or batch.top_p is not None:
        _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    if batch.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p
        logits.masked_fill_(probs < threshold, _NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    # Gumbel-style race: argmax(p / E) with E ~ Exp(1) draws from p; each seeded row fills its
    # own noise from its own generator, so its draws do not depend on the rest of the batch.
    noise = torch.empty_like(probs)
    if len(batch.generators) < batch.num_rows:
        noise.exponential_(generator=generator)
    for row, gen in batch.generators.items():
        noise[row].exponential_(generator=gen)
    # a zero draw would turn a filtered token (p = 0) into NaN and a kept one into inf
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    token_ids = probs.div_(noise).argmax(dim=-1)
    if greedy_ids is not None and batch.greedy is not None:
        token_ids = torch.where(batch.greedy, greedy_ids, token_ids)
    return token_ids


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> None:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits.masked_fill_(ranks >= top_k.unsqueeze(1), _NEG_INF)
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        before = probs.cumsum(dim=-1) - probs
        sorted_logits.masked_fill_(before >= top_p.unsqueeze(1), _NEG_INF)
    logits.scatter_(1, order, sorted_logits)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)
