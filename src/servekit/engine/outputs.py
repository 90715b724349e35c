"""What the engine hands back: per-step deltas and finished generations (plain values)."""

from __future__ import annotations

from attrs import field, frozen

__all__ = ["FINISH_REASONS", "GenerationResult", "RequestOutput", "TokenLogprob"]

#: Every ``finish_reason`` the engine reports.
FINISH_REASONS = ("stop", "length", "abort", "error")


@frozen(slots=True)
class TokenLogprob:
    """Log-probability of one generated token and of the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@frozen(slots=True)
class RequestOutput:
    """One request's delta since its previous output; ``finished`` on the last one."""

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
