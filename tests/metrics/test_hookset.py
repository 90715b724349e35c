"""HookSet: dispatch only to overriding hooks, isolation of raising hooks, add/remove."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from servekit.metrics import Hook, HookSet
from servekit.metrics.events import FirstToken, NewTokens, RequestQueued
from servekit.metrics.hooks import EVENT_METHODS

EVENT = NewTokens("r", None, 1, 0.0, 0.1)


def recording_hook(methods: frozenset[str]) -> Hook:
    """A hook whose class overrides exactly ``methods``, recording (method, event) calls."""

    def make(name: str) -> Any:
        def method(self: Any, event: Any) -> None:
            self.calls.append((name, event))

        return method

    cls = type("Rec", (Hook,), {name: make(name) for name in methods})
    hook = cls()
    hook.calls = []  # type: ignore[attr-defined]
    return hook


def test_empty_set_wants_nothing_and_ignores_events() -> None:
    hooks = HookSet()
    for name in EVENT_METHODS:
        assert getattr(hooks.wants, name[3:]) is False
        getattr(hooks, name)(EVENT)  # a no-op, never raises


def test_dispatches_only_to_hooks_that_override() -> None:
    tokens = recording_hook(frozenset({"on_new_tokens"}))
    first = recording_hook(frozenset({"on_first_token"}))
    hooks = HookSet([tokens, first])
    assert hooks.wants.new_tokens and hooks.wants.first_token
    assert not hooks.wants.request_queued
    hooks.on_new_tokens(EVENT)
    ft = FirstToken("r", None, 0.0, 1.0)
    hooks.on_first_token(ft)
    hooks.on_request_queued(RequestQueued("r", None, 3, 0.0))
    assert tokens.calls == [("on_new_tokens", EVENT)]  # type: ignore[attr-defined]
    assert first.calls == [("on_first_token", ft)]  # type: ignore[attr-defined]


def test_a_raising_hook_does_not_affect_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Boom(Hook):
        def on_new_tokens(self, event: NewTokens) -> None:
            raise RuntimeError("boom")

    before, after = (
        recording_hook(frozenset(EVENT_METHODS)),
        recording_hook(frozenset(EVENT_METHODS)),
    )
    hooks = HookSet([before, Boom(), after])
    with caplog.at_level(logging.DEBUG, logger="servekit.metrics"):
        for _ in range(3):
            hooks.on_new_tokens(EVENT)
    assert len(before.calls) == len(after.calls) == 3  # type: ignore[attr-defined]
    assert hooks.errors == {
        "test_a_raising_hook_does_not_affect_the_others.<locals>.Boom.on_new_tokens": 3
    }
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # logged once with traceback
    assert "Boom.on_new_tokens" in errors[0].getMessage()


def test_single_raising_hook_is_isolated() -> None:
    class Boom(Hook):
        def on_first_token(self, event: FirstToken) -> None:
            raise ValueError("bad")

    hooks = HookSet([Boom()])
    hooks.on_first_token(FirstToken("r", None, 0.0, 1.0))
    assert sum(hooks.errors.values()) == 1


def test_add_remove_update_wants_in_place() -> None:
    hooks = HookSet()
    wants = hooks.wants
    hook = recording_hook(frozenset({"on_route"}))
    hooks.add(hook)
    assert wants.route and hooks.wants is wants
    hooks.remove(hook)
    assert not wants.route
    with pytest.raises(ValueError):
        hooks.remove(hook)


def test_rejects_non_hooks_and_itself() -> None:
    hooks = HookSet()
    with pytest.raises(TypeError, match=r"servekit\.metrics\.Hook"):
        hooks.add(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="itself"):
        hooks.add(hooks)


def test_nested_hook_set_and_instance_attribute_listener() -> None:
    inner_hook = recording_hook(frozenset({"on_new_tokens"}))
    inner = HookSet([inner_hook])
    seen: list[Any] = []
    plain = Hook()
    plain.on_cache_stats = seen.append  # type: ignore[method-assign]
    outer = HookSet([inner, plain, HookSet()])
    assert outer.wants.new_tokens and outer.wants.cache_stats and not outer.wants.route
    outer.on_new_tokens(EVENT)
    outer.on_cache_stats("stats")  # type: ignore[arg-type]
    assert inner_hook.calls == [("on_new_tokens", EVENT)]  # type: ignore[attr-defined]
    assert seen == ["stats"]


@settings(max_examples=40)
@given(st.lists(st.frozensets(st.sampled_from(EVENT_METHODS)), max_size=5), st.data())
def test_each_hook_gets_exactly_the_events_it_overrides(
    overrides: list[frozenset[str]], data: st.DataObject
) -> None:
    hooks_ = [recording_hook(o) for o in overrides]
    hooks = HookSet(hooks_)
    sent = data.draw(st.lists(st.sampled_from(EVENT_METHODS), max_size=20))
    for i, name in enumerate(sent):
        getattr(hooks, name)(i)
    for name in EVENT_METHODS:
        assert getattr(hooks.wants, name[3:]) == any(name in o for o in overrides)
    for hook, o in zip(hooks_, overrides, strict=True):
        expected = [(name, i) for i, name in enumerate(sent) if name in o]
        assert hook.calls == expected  # type: ignore[attr-defined]


class HookSetMachine(RuleBasedStateMachine):
    """Random add / remove / emit sequences against a model of who should hear what."""

    hooks = Bundle("hooks")

    def __init__(self) -> None:
        super().__init__()
        self.set = HookSet()
        self.registered: list[Hook] = []
        self.expected: dict[int, list[tuple[str, int]]] = {}
        self.n = 0

    @rule(target=hooks, methods=st.frozensets(st.sampled_from(EVENT_METHODS), min_size=1))
    def create(self, methods: frozenset[str]) -> Hook:
        hook = recording_hook(methods)
        hook.methods = methods  # type: ignore[attr-defined]
        self.expected[id(hook)] = []
        return hook

    @rule(hook=hooks)
    def add(self, hook: Hook) -> None:
        self.set.add(hook)
        self.registered.append(hook)

    @rule(hook=hooks)
    def remove(self, hook: Hook) -> None:
        if hook in self.registered:
            self.set.remove(hook)
            self.registered.remove(hook)
        else:
            with pytest.raises(ValueError):
                self.set.remove(hook)

    @rule(name=st.sampled_from(EVENT_METHODS))
    def emit(self, name: str) -> None:
        self.n += 1
        getattr(self.set, name)(self.n)
        for hook in self.registered:  # a hook added twice hears twice
            if name in hook.methods:  # type: ignore[attr-defined]
                self.expected[id(hook)].append((name, self.n))

    @invariant()
    def delivered_as_modelled(self) -> None:
        assert self.set.hooks == tuple(self.registered)
        for hook in self.registered:
            assert hook.calls == self.expected[id(hook)]  # type: ignore[attr-defined]


HookSetMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20)
TestHookSetMachine = HookSetMachine.TestCase
