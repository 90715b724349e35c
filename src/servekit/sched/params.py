"""Sampling parameters of one request: validated at construction, with errors naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import field, frozen

from servekit.errors import ServekitError


class InvalidParameterError(ServekitError, ValueError):
    """A request parameter is out of range; ``param`` names it (front ends report it as 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _check(param: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameterError(param, message)


def _tuple_of_str(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)  # type: ignore[arg-type]


def _tuple_of_int(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value)  # type: ignore[attr-defined]


#: The constraint kinds :class:`GuidedDecoding` accepts.
GUIDED_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice", "structural_tag")


@frozen(slots=True)
class GuidedDecoding:
    """A constraint on a request's output, enforced token by token (``servekit[structured]``).

    ``kind`` is one of :data:`GUIDED_KINDS`; ``value`` is its text: the JSON schema as canonical
    JSON, the regex, the EBNF grammar (root rule ``root``), or the choices as a JSON list. Build
    it with the class methods; equal constraints compare equal, so compiled grammars are cached
    by value. Invalid values raise :class:`InvalidParameterError` naming ``guided.<kind>``.
    """

    kind: str
    value: str = ""

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> GuidedDecoding:
        """Output is JSON valid against ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidParameterError("guided.json_schema", f"is not JSON: {exc}") from exc
        try:
            # key order kept: properties are generated in the schema's order
            text = json.dumps(schema, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError("guided.json_schema", f"is not JSON: {exc}") from exc
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> GuidedDecoding:
        """Output is any JSON object."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> GuidedDecoding:
        """Output matches ``pattern`` in full."""
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> GuidedDecoding:
        """Output is a sentence of the EBNF grammar ``ebnf`` (start rule ``root``)."""
        return cls("grammar", ebnf)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GuidedDecoding:
        """Output is exactly one of ``choices``."""
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise InvalidParameterError("guided.choice", "must be a list of strings")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def structural_tag(cls, tags: Sequence[Mapping[str, Any]], triggers: Sequence[str], *,
                       at_least_one: bool = False, stop_after_first: bool = False
                       ) -> GuidedDecoding:
        """Free text in which tagged regions are constrained: once the output contains one of
        ``triggers``, it must go on with a tag whose ``begin`` starts with that trigger, then
        JSON valid against the tag's ``schema``, then its ``end``; after that, free text again.

        ``tags``: ``[{"begin": "<tool=add>", "schema": {...}, "end": "</tool>"}, ...]``;
        ``at_least_one``: the output starts with a tag (no text before the first);
        ``stop_after_first``: the output ends right after the first tag. The same constraint as
        xgrammar's ``triggered_tags`` structural tag and llguidance's ``StructTag``.
        """
        if isinstance(triggers, str) or isinstance(tags, (str, Mapping)):
            raise InvalidParameterError("guided.structural_tag",
                                        "tags and triggers must be lists")
        try:
            structures = [{"begin": t["begin"], "schema": t["schema"], "end": t["end"]}
                          for t in tags]
        except (KeyError, TypeError) as exc:
            raise InvalidParameterError("guided.structural_tag",
                                        f"each tag needs begin, schema and end: {exc}") from exc
        try:
            text = json.dumps({"structures": structures, "triggers": list(triggers),
                               "at_least_one": at_least_one,
                               "stop_after_first": stop_after_first},
                              separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidParameterError("guided.structural_tag", f"is not JSON: {exc}") from exc
        return cls("structural_tag", text)

    def tag_spec(self) -> dict[str, Any]:
        """A ``structural_tag`` constraint's parsed value: ``structures`` (each ``begin``,
        ``schema``, ``end`` and its ``trigger``), ``triggers``, ``at_least_one``,
        ``stop_after_first``."""
        value: dict[str, Any] = json.loads(self.value)
        for tag in value["structures"]:
            tag["trigger"] = max((t for t in value["triggers"] if tag["begin"].startswith(t)),
                                 key=len)
        return value

    def __attrs_post_init__(self) -> None:
        _check("guided", self.kind in GUIDED_KINDS,
               f"kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}")
        param = f"guided.{self.kind}"
        _check(param, isinstance(self.value, str), "must be a string")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                raise InvalidParameterError(param, f"is not JSON: {exc}") from exc
            _check(param, isinstance(schema, (dict, bool)), "must be a JSON object (or boolean)")
        elif self.kind == "choice":
            try:
                choices = json.loads(self.value)
            except ValueError as exc:
                raise InvalidParameterError(param, f"is not a JSON list: {exc}") from exc
            _check(param, isinstance(choices, list) and len(choices) > 0
                   and all(isinstance(c, str) and c for c in choices),
                   "must be a non-empty list of non-empty strings")
        elif self.kind in ("regex", "grammar"):
            _check(param, bool(self.value), "must not be empty")
        elif self.kind == "structural_tag":
            _check_structural_tag(self.value)


def _check_structural_tag(text: str) -> None:
    param = "guided.structural_tag"
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidParameterError(param, f"is not JSON: {exc}") from exc
    _check(param, isinstance(value, dict), "must be a JSON object")
    triggers, structures = value.get("triggers"), value.get("structures")
    _check(f"{param}.triggers", isinstance(triggers, list) and len(triggers) > 0
           and all(isinstance(t, str) and t for t in triggers),
           "must be a non-empty list of non-empty strings")
    _check(f"{param}.tags", isinstance(structures, list) and len(structures) > 0,
           "must be a non-empty list")
    for i, tag in enumerate(structures):
        at = f"{param}.tags[{i}]"
        _check(at, isinstance(tag, dict), "must be an object with begin, schema and end")
        for key in ("begin", "end"):
            _check(f"{at}.{key}", isinstance(tag.get(key), str), "must be a string")
        _check(f"{at}.schema", isinstance(tag.get("schema"), (dict, bool)),
               "must be a JSON schema (an object or boolean)")
        _check(f"{at}.begin", any(tag["begin"].startswith(t) for t in triggers),
               "must start with one of the triggers")
    for key in ("at_least_one", "stop_after_first"):
        _check(f"{param}.{key}", isinstance(value.get(key, False), bool), "must be a boolean")


#: Floor of the float parameters the sampler divides by or compares in float32 (vLLM's
#: ``_SAMPLING_EPS``): a temperature below it is greedy (0); a ``top_p`` or
#: ``repetition_penalty`` below it is raised to it (float32 would round them to 0).
SAMPLING_EPS = 1e-5


@frozen(slots=True)
class SamplingParams:
    """How to sample one request's tokens and when to stop.

    ``temperature == 0`` is greedy (so is any temperature below :data:`SAMPLING_EPS`). ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``seed`` makes sampling reproducible per request. ``logprobs`` asks for the
    sampled token's log-probability plus that many top alternatives (0 = sampled token only).
    Stop strings are matched on the detokenized text and not emitted. ``guided`` constrains the
    output to a JSON schema, regex, grammar or choice (see :class:`GuidedDecoding`).
    ``skip_special_tokens=False`` keeps special tokens (``[TOOL_CALLS]``, ``<|python_tag|>``)
    in the output text; ends of sequence and stop tokens are never part of it.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop: tuple[str, ...] = field(default=(), converter=_tuple_of_str)
    stop_token_ids: tuple[int, ...] = field(default=(), converter=_tuple_of_int)
    ignore_eos: bool = False
    min_tokens: int = 0
    guided: GuidedDecoding | None = None
    skip_special_tokens: bool = True

    def __attrs_post_init__(self) -> None:
        _check("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"must be an integer >= 1, got {self.max_tokens!r}")
        _check("temperature", _finite(self.temperature) and self.temperature >= 0,
               f"must be >= 0, got {self.temperature!r}")
        _check("top_k", isinstance(self.top_k, int), f"must be an integer, got {self.top_k!r}")
        _check("top_p", _finite(self.top_p) and 0 < self.top_p <= 1,
               f"must be in (0, 1], got {self.top_p!r}")
        _check("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1,
               f"must be in [0, 1], got {self.min_p!r}")
        _check("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"must be > 0, got {self.repetition_penalty!r}")
        _check("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               f"must be in [-2, 2], got {self.presence_penalty!r}")
        _check("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               f"must be in [-2, 2], got {self.frequency_penalty!r}")
        _check("seed", self.seed is None or (isinstance(self.seed, int)
                                              and -(2**63) <= self.seed < 2**64),
               f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        _check("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"must be an integer in [0, 20], got {self.logprobs!r}")
        _check("stop", all(isinstance(s, str) and s for s in self.stop),
               "must be non-empty strings")
        _check("stop_token_ids", all(t >= 0 for t in self.stop_token_ids),
               "must be non-negative token ids")
        _check("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        _check("skip_special_tokens", isinstance(self.skip_special_tokens, bool),
               f"must be a boolean, got {self.skip_special_tokens!r}")
        _check("guided", self.guided is None or isinstance(self.guided, GuidedDecoding),
               f"must be a GuidedDecoding, got {type(self.guided).__name__}")
        if self.guided is not None:
            # the grammar allows end-of-sequence exactly when the output is complete: a request
            # that may not stop there would have no allowed token left
            _check("ignore_eos", not self.ignore_eos, "cannot be combined with guided decoding")
            _check("min_tokens", self.min_tokens == 0, "cannot be combined with guided decoding")
        # valid but meaningless in float32 (1e-39 underflows): clamp to the documented floor
        if self.temperature < SAMPLING_EPS:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_p < SAMPLING_EPS:
            object.__setattr__(self, "top_p", SAMPLING_EPS)
        if self.repetition_penalty < SAMPLING_EPS:
            object.__setattr__(self, "repetition_penalty", SAMPLING_EPS)

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0.0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
