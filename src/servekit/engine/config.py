"""Engine settings, validated at construction with errors naming the field."""

from __future__ import annotations

from attrs import frozen

from servekit.sched.params import InvalidParameterError
from servekit.sched.policy import SchedulingPolicy, VictimPolicy

__all__ = ["GUIDED_BACKENDS", "EngineConfig"]

#: the constrained-decoding backends an engine can use (``servekit.structured``)
GUIDED_BACKENDS = ("xgrammar", "llguidance")


@frozen(slots=True, kw_only=True)
class EngineConfig:
    """How big the engine's batches and KV cache are.

    The KV cache holds ``num_blocks`` blocks of ``block_size`` tokens; without ``num_blocks`` it
    is sized from ``kv_cache_bytes``. ``max_num_batched_tokens`` bounds the tokens of one step
    (a smaller value chunks long prefills); ``max_num_seqs`` the sequences of one step.
    ``max_model_len`` defaults to the model's ``max_position_embeddings``.

    ``policy`` is the scheduling policy: a name (``"fcfs"``, ``"priority"``, ``"fair"`` or a
    plugin's), a spec ``'NAME:{"json": "kwargs"}'``, or a
    :class:`~servekit.sched.policy.SchedulingPolicy` instance (used by one engine only: it
    holds the queue). ``victim_policy`` likewise (None: the policy's own order).

    ``runner`` names the model-runner plugin that loads a model given by path (or module):
    ``"transformers"`` (default, :class:`~servekit.engine.runner.ModelRunner`), a plugin's name
    or ``'NAME:{"json": "kwargs"}'``. A runner plugin is called as ``factory(model, *,
    block_size, num_blocks, kv_cache_bytes, dtype, device, **kwargs)``.

    ``guided_backend`` compiles the constraints of guided requests: ``"xgrammar"`` (default) or
    ``"llguidance"``. With xgrammar, a constraint still compiling after
    ``guided_fallback_after`` seconds is served by llguidance, which needs no compile step
    (None: never fall back).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 256 * 2**20
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting_requests: int | None = None
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str | None = None
    policy: str | SchedulingPolicy = "fcfs"
    victim_policy: str | VictimPolicy | None = None
    runner: str = "transformers"
    seed: int = 0
    guided_backend: str = "xgrammar"
    guided_fallback_after: float | None = 2.0

    def __attrs_post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("num_blocks", "max_model_len", "max_waiting_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidParameterError(name, f"must be None or an integer >= 1, got {value!r}")
        if self.guided_backend not in GUIDED_BACKENDS:
            raise InvalidParameterError(
                "guided_backend", f"must be one of {', '.join(GUIDED_BACKENDS)}, "
                f"got {self.guided_backend!r}")
        after = self.guided_fallback_after
        if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))
                                  or not after > 0):
            raise InvalidParameterError(
                "guided_fallback_after", f"must be None or a number of seconds > 0, got {after!r}")
        if not isinstance(self.runner, str):
            raise InvalidParameterError("runner", f"must be a runner plugin spec, got {self.runner!r}")
        if not isinstance(self.policy, (str, SchedulingPolicy)):
            raise InvalidParameterError(
                "policy", f"must be a policy spec or a SchedulingPolicy, got {self.policy!r}")
