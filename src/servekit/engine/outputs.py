"""What the engine hands back: per-step deltas and finished generations (plain values)."""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define, field, frozen

__all__ = ["FINISH_REASONS", "GenerationResult", "RequestOutput", "TokenLogprob", "merge_outputs"]

#: Every ``finish_reason`` the engine reports.
FINISH_REASONS = ("stop", "length", "abort", "error")


@frozen(slots=True)
class TokenLogprob:
    """Log-probability of one generated token and of the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@define(slots=True)
class RequestOutput:
    """One request's delta since its previous output; ``finished`` on the last one.

    Treat it as a value (nothing mutates one). It is not attrs-frozen only because one is built
    per request per step, on the streaming hot path: a frozen class's ``__init__`` sets each
    field through ``object.__setattr__``, about 3x the cost of this one.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@frozen(slots=True)
class GenerationResult:
    """A whole finished generation, as :meth:`LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = field(default=None)
    error: str | None = None


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """One delta equal to consecutive deltas of one request: texts, token ids and logprobs
    joined in order; counts, finish and error from the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    lps = [lp for out in outputs if out.logprobs for lp in out.logprobs]
    return RequestOutput(
        last.request_id, [t for out in outputs for t in out.new_token_ids],
        "".join(out.new_text for out in outputs), last.finished, last.finish_reason,
        last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens,
        lps if any(out.logprobs is not None for out in outputs) else None, last.error)
