"""LLMEngine: the synchronous step loop over scheduler, KV cache, model runner and sampler.

One step is three phases, so that an async front end can run the middle one off its event loop
while it keeps adding and aborting requests:

1. :meth:`LLMEngine.schedule` (cheap): the scheduler picks the batch; the packed inputs and
   the sampling tensors are built from it.
2. :meth:`LLMEngine.execute` (the model): forward pass and sampling. It reads only the plan,
   never the scheduler, so adds and aborts may run concurrently.
3. :meth:`LLMEngine.finish` (cheap): the scheduler appends the tokens and finishes requests;
   tokens are detokenized, stop strings matched, and per-request deltas returned.

:meth:`LLMEngine.step` runs the three in a row; :meth:`LLMEngine.generate` runs a whole batch.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import torch
from attrs import define, field

from servekit.engine.batch import PackedBatch, PackedBatchBuilder
from servekit.engine.config import EngineConfig
from servekit.engine.detokenize import IncrementalDetokenizer
from servekit.engine.outputs import GenerationResult, RequestOutput, TokenLogprob
from servekit.engine.runner import Runner
from servekit.engine.sampler import Sampler, SamplerOutput, SamplingBatch, position_seed
from servekit.engine.stop import StopStringMatcher
from servekit.kv.manager import KVCacheManager
from servekit.metrics.events import EngineStep
from servekit.metrics.hooks import HookSet
from servekit.sched.output import SchedulerOutput, shape_of
from servekit.sched.params import InvalidParameterError, SamplingParams
from servekit.sched.request import FinishReason, Request
from servekit.sched.scheduler import Scheduler
from servekit.structured.backend import CompiledGrammar, GrammarMatcher, bitmask_words
from servekit.structured.compiler import GrammarCompiler

__all__ = ["LLMEngine", "StepPlan", "StepTimes"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@define(slots=True)
class StepTimes:
    """Cumulative seconds per phase since the engine started (for profiling and benchmarks)."""

    steps: int = 0
    schedule: float = 0.0  # scheduler.schedule + scheduler.update
    prepare: float = 0.0  # packing the batch and the sampling tensors
    forward: float = 0.0  # the model
    sample: float = 0.0  # the sampler
    output: float = 0.0  # detokenization, stop strings, building deltas


@define(slots=True)
class StepPlan:
    """One scheduled step: the scheduler's output plus the tensors built from it."""

    out: SchedulerOutput
    batch: PackedBatch | None = None
    sampling: SamplingBatch | None = None
    sampling_requests: list[Request] = field(factory=list)
    matchers: list[GrammarMatcher] = field(factory=list)  # of the rows sampling.mask_rows
    start: float = 0.0


class _Tracked:
    """The engine's per-request streaming state."""

    __slots__ = ("detok", "generator", "history", "matcher", "request", "stop")

    def __init__(self, request: Request, tokenizer: Any, device: torch.device) -> None:
        params = request.params
        self.request = request
        self.detok = (IncrementalDetokenizer(tokenizer, request.token_ids,
                                             skip_special_tokens=params.skip_special_tokens)
                      if tokenizer else None)
        self.stop = StopStringMatcher(params.stop) if params.stop else None
        self.generator = None  # reseeded for each output position (position_seed)
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device)
        self.history = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                        or params.frequency_penalty != 0.0)
        self.matcher: GrammarMatcher | None = None
        if request.num_output_tokens:
            self._replay_outputs()

    def _replay_outputs(self) -> None:
        """Bring the text state of a resumed request where the cut-short run left it: its
        output tokens go through the detokenizer and the stop strings, their text (already
        sent by the run that produced them) is dropped, text held back stays held."""
        request = self.request
        for token in request.output_token_ids:
            text = self.detok.step(token) if self.detok is not None else ""
            if self.stop is not None and self.stop.feed(text)[1]:
                raise InvalidParameterError(
                    "output_token_ids", f"already end with the stop string {self.stop.stopped_on!r}")

    def start_matcher(self, grammar: CompiledGrammar) -> None:
        """The grammar matcher, advanced over a resumed request's output tokens."""
        matcher = grammar.new_matcher()
        for token in self.request.output_token_ids:
            if not matcher.accept_token(token):
                raise InvalidParameterError(
                    "output_token_ids", f"token {token} is not allowed by the grammar")
        self.matcher = matcher


class _AwaitingGrammar:
    """A guided request whose grammar is compiling: outside the scheduler, holding no blocks."""

    __slots__ = ("future", "since", "tracked")

    def __init__(self, tracked: _Tracked, future: Future[CompiledGrammar], since: float) -> None:
        self.tracked = tracked
        self.future = future
        self.since = since


class LLMEngine:
    """A causal LM served with continuous batching on a paged KV cache.

    ``model`` is a local model directory (loaded with ``from_pretrained``), a loaded
    ``PreTrainedModel``, or a :class:`~servekit.engine.runner.Runner` (any model: then pass
    ``tokenizer``, or send token ids). The scheduling and victim policies come from
    ``config`` (a spec resolved through :mod:`servekit.plugins`, or an instance). ``hooks`` receive the scheduler's and the
    engine's metrics events; ``clock`` is their time source.

    >>> engine = LLMEngine("path/to/model", config=EngineConfig(num_blocks=512))  # doctest: +SKIP
    >>> engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | Path | torch.nn.Module | Runner,
        *,
        config: EngineConfig | None = None,
        tokenizer: Any = None,
        hooks: HookSet | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = cfg = config if config is not None else EngineConfig()
        self.hooks = hooks if hooks is not None else HookSet()
        self._clock = clock
        self.runner: Runner = _runner(model, cfg)
        if tokenizer is None and isinstance(model, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.tokenizer = tokenizer
        self.model_name = (os.path.basename(os.path.normpath(model))
                           if isinstance(model, (str, Path)) else type(model).__name__)
        self.max_model_len = cfg.max_model_len or self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        hooks = self.hooks

        def on_kv_event(event: Any) -> None:
            # Looked up per event, not bound once: a hook added after construction (the
            # server adds its Prometheus hook later) must still see KV events.
            if hooks.wants.kv_event:
                hooks.on_kv_event(event)

        self.kv = KVCacheManager(self.runner.num_blocks, cfg.block_size,
                                 enable_prefix_caching=cfg.enable_prefix_caching,
                                 on_event=on_kv_event)
        self.scheduler = Scheduler(
            self.kv, max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, policy=cfg.policy,
            victim_policy=cfg.victim_policy,
            eos_token_ids=_eos_ids(self.runner, tokenizer),
            max_waiting_requests=cfg.max_waiting_requests, hooks=self.hooks, clock=clock,
        )
        device = self.runner.device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(cfg.seed))
        max_blocks = -(-self.max_model_len // cfg.block_size)
        self._builder = PackedBatchBuilder(cfg.block_size, cfg.max_num_seqs, max_blocks)
        self._tracked: dict[str, _Tracked] = {}
        self.times = StepTimes()
        self._grammars: GrammarCompiler | None = None
        self._awaiting: dict[str, _AwaitingGrammar] = {}
        self._early: list[RequestOutput] = []  # finished before scheduling (grammar errors)
        self._arrivals = 0  # requests added since the last step ended (its EngineStep event)

    # ------------------------------------------------------------------ guided decoding

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler of guided requests (the config's ``guided_backend``, built on
        first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidParameterError("guided", "guided decoding needs a tokenizer")
            from servekit.structured import grammar_backend

            cfg = self.config
            self._grammars = GrammarCompiler(grammar_backend(
                cfg.guided_backend, self.tokenizer, self.vocab_size,
                self.scheduler.eos_token_ids, fallback_after=cfg.guided_fallback_after))
        return self._grammars

    @grammars.setter
    def grammars(self, compiler: GrammarCompiler) -> None:
        self._grammars = compiler

    def _admit_compiled(self) -> None:
        """Queue the guided requests whose grammar is ready; fail those whose compile failed."""
        now = time.monotonic()
        limit = self.grammars.timeout
        for rid, waiting in list(self._awaiting.items()):
            future = waiting.future
            if not future.done() and now - waiting.since < limit:
                continue
            del self._awaiting[rid]
            tracked = waiting.tracked
            try:
                if not future.done():
                    raise InvalidParameterError(
                        f"guided.{tracked.request.params.guided.kind}",  # type: ignore[union-attr]
                        f"grammar compilation took longer than {limit:g} s")
                tracked.start_matcher(future.result())
                self.scheduler.add_request(tracked.request)
            except Exception as exc:
                self._tracked.pop(rid, None)
                r = tracked.request
                r.finish_reason = FinishReason.ERROR
                r.error = str(exc)
                self._early.append(self._final(tracked, [], "", None))

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        deadline: float | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> str:
        """Queue a prompt (text or token ids); return its request id.

        ``deadline`` is an absolute time on the engine's ``clock`` after which the request is
        aborted. ``output_token_ids`` resumes a generation cut short elsewhere: the tokens it
        already produced are prefilled after the prompt and count as output (``max_tokens``,
        penalties, stop strings, seeded draws by position); the deltas continue its text
        exactly. Raises InvalidParameterError naming the bad field, or the scheduler's
        QueueFullError.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError("params", f"must be SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidParameterError("prompt", f"token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidParameterError("stop_token_ids", f"token ids must be < {vocab}")
        outputs = [int(t) for t in output_token_ids]
        if any(not 0 <= t < vocab for t in outputs):
            raise InvalidParameterError("output_token_ids", f"token ids must be in [0, {vocab})")
        rid = request_id if request_id is not None else uuid.uuid4().hex
        self._arrivals += 1
        request = Request(rid, ids, params, priority=priority, tenant=tenant,
                          deadline=deadline, cache_salt=cache_salt, output_token_ids=outputs)
        # built before queueing: a failure must not leave an untracked request running
        tracked = _Tracked(request, self.tokenizer, self.runner.device)
        if params.guided is not None:
            future = self.grammars.submit(params.guided)
            if future.done():
                tracked.start_matcher(future.result())  # raises a cached compile error
            else:
                if rid in self._tracked:
                    raise InvalidParameterError("request_id", f"{rid!r} is already in use")
                self._awaiting[rid] = _AwaitingGrammar(tracked, future, time.monotonic())
                self._tracked[rid] = tracked
                return rid
        self.scheduler.add_request(request)
        self._tracked[rid] = tracked
        return rid

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: text goes through the tokenizer, ids are copied."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "text needs a tokenizer; pass token ids")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request and free its blocks; its final output, or None if already finished."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        if self._awaiting.pop(request_id, None) is not None:
            return self._final(tracked, [], "", None)
        # False when the scheduler already finished it in the step in flight (its deadline
        # passed in schedule()): its final output is still owed, and finish() will skip it
        self.scheduler.abort(request_id)
        return self._final(tracked, [], "", None)

    def abort_all(self) -> list[RequestOutput]:
        """Abort every unfinished request; their final outputs."""
        outputs = [self.abort(rid) for rid in list(self._tracked)]
        return [o for o in outputs if o is not None]

    def has_unfinished_requests(self) -> bool:
        """True while any request is waiting or running."""
        return self.scheduler.has_unfinished_requests() or bool(self._awaiting or self._early)

    @property
    def num_unfinished_requests(self) -> int:
        """Requests added and not yet finished."""
        return self.scheduler.num_unfinished + len(self._awaiting)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one step; return the deltas of every request that progressed or finished."""
        plan = self.schedule()
        try:
            sampled = self.execute(plan)
        except Exception as exc:
            self.fail_step(plan, f"step failed: {exc!r}")
            raise
        return self.finish(plan, sampled)

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        """Finish every request of a step whose execution failed with ``error``; their outputs."""
        failed = []
        for r in plan.out.requests:
            tracked = self._tracked.pop(r.request_id, None)
            if tracked is not None and self.scheduler.finish_with_error(r.request_id, message):
                failed.append(self._final(tracked, [], "", None))
        return failed + self.finish(plan, None)

    def schedule(self) -> StepPlan:
        """Phase 1: pick the batch and build its inputs."""
        t0 = time.perf_counter()
        if self._awaiting:
            self._admit_compiled()
        out = self.scheduler.schedule()
        t1 = time.perf_counter()
        plan = StepPlan(out, start=t0)
        if out.requests:
            plan.batch = self._builder.build(
                [r.token_ids for r in out.requests], [r.block_ids for r in out.requests],
                out.num_computed_tokens, out.num_new_tokens, out.samples)
            if out.num_samples:
                reqs = out.sampling_requests
                plan.sampling_requests = reqs
                plan.sampling = self._sampling_batch(reqs, plan.matchers)
        times = self.times
        times.schedule += t1 - t0
        times.prepare += time.perf_counter() - t1
        return plan

    def execute(self, plan: StepPlan) -> SamplerOutput | None:
        """Phase 2: the forward pass and sampling (touches no scheduler state)."""
        if plan.batch is None:
            if self._awaiting:  # nothing runnable: wait (off the event loop) for a grammar
                wait_futures([w.future for w in list(self._awaiting.values())], timeout=0.005,
                             return_when=FIRST_COMPLETED)
            return None
        t0 = time.perf_counter()
        logits = self.runner.execute(plan.batch)
        t1 = time.perf_counter()
        sampled = None
        if plan.sampling is not None:
            if plan.matchers:
                self._fill_bitmask(plan.sampling, plan.matchers)
            with torch.inference_mode():
                sampled = self.sampler(logits, plan.sampling)
            sampled.token_ids.tolist()  # sync so the timing is the sampler's (no-op on CPU)
        times = self.times
        times.forward += t1 - t0
        times.sample += time.perf_counter() - t1
        return sampled

    def finish(self, plan: StepPlan, sampled: SamplerOutput | None) -> list[RequestOutput]:
        """Phase 3: hand the tokens to the scheduler and build the deltas."""
        t0 = time.perf_counter()
        sched = self.scheduler
        # without a sample, every sampling request must have finished (fail_step): the
        # scheduler skips them, whatever the placeholder tokens
        tokens: list[int] = [0] * plan.out.num_samples
        if sampled is not None:
            tokens = sampled.token_ids.tolist()
        outputs: list[RequestOutput] = []
        if self._early:
            outputs, self._early = self._early, []
        if sampled is not None and bool(sampled.bad_rows.any()):
            for row in sampled.bad_rows.nonzero().flatten().tolist():
                rid = plan.sampling_requests[row].request_id
                tracked = self._tracked.pop(rid, None)
                if tracked is not None and sched.finish_with_error(
                        rid, "the model produced NaN logits"):
                    outputs.append(self._final(tracked, [], "", None))
        result = sched.update(plan.out, tokens)
        t1 = time.perf_counter()
        rows = None
        if sampled is not None and sampled.logprobs is not None:
            rows = {r.request_id: i for i, r in enumerate(plan.sampling_requests)}
        finished = {r.request_id for r in result.finished}
        tracked_map = self._tracked
        for request, token in zip(result.requests, result.new_token_ids, strict=True):
            rid = request.request_id
            tracked = tracked_map.get(rid)
            if tracked is None:
                continue
            ends = rid in finished
            if tracked.matcher is not None and not tracked.matcher.accept_token(token) and not ends:
                sched.finish_with_error(rid, f"token {token} is not allowed by the grammar")
                finished.add(rid)
            logprobs = None
            if rows is not None and sampled is not None and request.params.logprobs is not None:
                logprobs = [_token_logprob(sampled, rows[rid], token, request.params.logprobs)]
            ends = rid in finished
            text = ""
            stop_token = ends and request.finish_reason is FinishReason.STOP and (
                token in request.stop_ids)  # eos / stop ids end the request but are not text
            if tracked.detok is not None and not stop_token:
                text = tracked.detok.step(token)
            if tracked.stop is not None:
                text, stopped = tracked.stop.feed(text)
                if stopped and not ends:
                    sched.finish(rid, "stop")
                    ends = True
                elif stopped and request.finish_reason is FinishReason.LENGTH:
                    request.finish_reason = FinishReason.STOP  # the stop string wins, as in vLLM
            if ends:
                finished.discard(rid)
                del tracked_map[rid]
                outputs.append(self._final(tracked, [token], text, logprobs))
            else:
                outputs.append(RequestOutput(
                    rid, [token], text, False, None, request.num_prompt_tokens,
                    len(request.token_ids) - request.num_prompt_tokens,
                    request.num_cached_tokens, logprobs))
        for request in result.finished:  # ended without a new token: abort, error, deadline
            tracked_done = tracked_map.pop(request.request_id, None)
            if tracked_done is not None:
                outputs.append(self._final(tracked_done, [], "", None))
        times = self.times
        times.steps += 1
        times.schedule += t1 - t0
        times.output += time.perf_counter() - t1
        hooks = self.hooks
        if hooks.wants.engine_step:
            now = self._clock()
            shape = shape_of(plan.out)
            arrivals, self._arrivals = self._arrivals, 0
            hooks.on_engine_step(EngineStep(
                len(plan.out.requests), plan.out.total_num_tokens, sched.num_running,
                sched.num_waiting, time.perf_counter() - plan.start, now, shape.prefill_tokens,
                shape.decodes, shape.kv_tokens, shape.attention_pairs, arrivals,
                len(result.requests)))
        return outputs

    # ------------------------------------------------------------------ batch API

    def generate(
        self,
        prompts: Iterable[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (continuous batching); results in prompt order."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            per = [params or SamplingParams()] * len(prompts)
        else:
            per = list(params)
            if len(per) != len(prompts):
                raise InvalidParameterError("params", "needs one SamplingParams per prompt")
        prompt_ids = [self.encode(p) for p in prompts]
        ids = [self.add_request(p, sp) for p, sp in zip(prompt_ids, per, strict=True)]
        acc: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.request_id in acc:
                    acc[out.request_id].append(out)
        return [_collect(rid, p, acc[rid]) for rid, p in zip(ids, prompt_ids, strict=True)]

    # ------------------------------------------------------------------ helpers

    def _sampling_batch(self, reqs: list[Request], matchers: list[GrammarMatcher]) -> SamplingBatch:
        tracked = self._tracked
        params = [r.params for r in reqs]
        generators: dict[int, torch.Generator] = {}
        banned: dict[int, Sequence[int]] = {}
        mask_rows: list[int] = []
        need_history = False
        for i, r in enumerate(reqs):
            t = tracked.get(r.request_id)
            if t is None:
                continue
            if t.matcher is not None:
                mask_rows.append(i)
                matchers.append(t.matcher)
            if t.generator is not None:  # reseeded per position: the draw is f(seed, i)
                generators[i] = t.generator.manual_seed(position_seed(
                    r.params.seed, len(r.token_ids) - r.num_prompt_tokens))  # type: ignore[arg-type]
            if t.history:
                need_history = True
            if r.params.min_tokens and r.stop_ids and len(r.token_ids) < r.min_len:
                banned[i] = list(r.stop_ids)
        prompt_ids = output_ids = None
        if need_history:
            prompt_ids = [r.token_ids[: r.num_prompt_tokens] for r in reqs]
            output_ids = [r.token_ids[r.num_prompt_tokens :] for r in reqs]
        batch = SamplingBatch.build(params, vocab_size=self.vocab_size, device=self.runner.device,
                                    prompt_ids=prompt_ids, output_ids=output_ids,
                                    generators=generators, banned=banned)
        if mask_rows:
            batch.mask_rows = mask_rows
        return batch

    def _fill_bitmask(self, batch: SamplingBatch, matchers: list[GrammarMatcher]) -> None:
        bitmask = torch.empty(len(matchers), bitmask_words(self.vocab_size), dtype=torch.int32)
        self.grammars.backend.fill_bitmask(matchers, bitmask)
        batch.bitmask = bitmask

    def _final(self, tracked: _Tracked, tokens: list[int], text: str,
               logprobs: list[TokenLogprob] | None) -> RequestOutput:
        r = tracked.request
        reason = r.finish_reason.value if r.finish_reason is not None else "abort"
        if tracked.stop is not None:
            text += tracked.stop.flush()
        return RequestOutput(r.request_id, tokens, text, True, reason, r.num_prompt_tokens,
                             len(r.token_ids) - r.num_prompt_tokens, r.num_cached_tokens,
                             logprobs, r.error)


def _token_logprob(sampled: SamplerOutput, row: int, token: int, top_n: int) -> TokenLogprob:
    assert sampled.logprobs is not None
    top: tuple[tuple[int, float], ...] = ()
    if top_n and sampled.top_ids is not None and sampled.top_logprobs is not None:
        top = tuple(zip(sampled.top_ids[row, :top_n].tolist(),
                        sampled.top_logprobs[row, :top_n].tolist(), strict=True))
    return TokenLogprob(token, float(sampled.logprobs[row]), top)


def _collect(rid: str, prompt_ids: list[int], outs: list[RequestOutput]) -> GenerationResult:
    tokens = [t for o in outs for t in o.new_token_ids]
    logprobs = [lp for o in outs for lp in (o.logprobs or ())] if any(o.logprobs for o in outs) else None
    last = outs[-1] if outs else None
    return GenerationResult(
        rid, prompt_ids, tokens, "".join(o.new_text for o in outs),
        last.finish_reason if last else None, last.num_cached_tokens if last else 0,
        logprobs, last.error if last else None)


def _runner(model: str | Path | torch.nn.Module | Runner, cfg: EngineConfig) -> Runner:
    """The runner for ``model``: the ``cfg.runner`` plugin built on a path or a module (the
    transformers runner by default), else ``model`` itself."""
    if isinstance(model, (str, Path, torch.nn.Module)):
        from servekit import plugins

        name, kwargs = plugins.parse_spec(cfg.runner, what="runner")
        built = plugins.create(
            "runner", name, model, block_size=cfg.block_size, num_blocks=cfg.num_blocks,
            kv_cache_bytes=cfg.kv_cache_bytes, device=cfg.device,
            dtype=_DTYPES[cfg.dtype] if cfg.dtype is not None else None, **kwargs)
        model = built
    if not isinstance(model, Runner):
        raise InvalidParameterError(
            "model", "must be a model directory, a transformers model or a servekit Runner "
            f"(device, vocab_size, num_blocks, max_model_len, eos_token_ids, execute), "
            f"got {type(model).__name__}")
    return model


def _eos_ids(runner: Runner, tokenizer: Any) -> set[int]:
    ids = set(runner.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
