"""What the server does with a valid OpenAI request body: reject what it cannot honour, build
the :class:`~servekit.sched.params.SamplingParams` of each choice.

Fields servekit accepts syntactically but cannot honour (``suffix``, ``logit_bias``,
``best_of`` != ``n``) are rejected with a 400 naming them rather than silently dropped.
"""

from __future__ import annotations

from servekit.protocol.errors import InvalidRequestError
from servekit.protocol.schema import ChatCompletionRequest, CompletionRequest, check_text
from servekit.sched.params import GuidedDecoding, InvalidParameterError, SamplingParams
from servekit.structured.openai import guided_from_response_format

__all__ = ["build_sampling_params", "check_unsupported"]


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Reject fields servekit accepts syntactically but cannot honour (lone surrogates too)."""
    check_text(req)
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of must equal n (or be omitted)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported", param="echo")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")


def build_sampling_params(req: CompletionRequest | ChatCompletionRequest, *, max_tokens: int,
                          logprobs: int | None, seed: int | None,
                          guided: GuidedDecoding | None = None,
                          keep_special_tokens: bool = False) -> SamplingParams:
    """The request's SamplingParams; an out-of-range value is a 400 naming the field.

    ``guided``: a constraint from elsewhere (a forced tool call), else ``response_format``'s.
    ``keep_special_tokens``: the default of ``skip_special_tokens`` is False (the tool-call
    format's tags are special tokens); the request's own value wins.
    """
    try:
        if guided is None:
            guided = guided_from_response_format(req.response_format)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed,
            logprobs=logprobs,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
            guided=guided,
            skip_special_tokens=(not keep_special_tokens if req.skip_special_tokens is None
                                 else req.skip_special_tokens),
        )
    except InvalidParameterError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from exc
