"""The hook kit: your metrics hook (or exporter) on real serving, beside hooks that raise and
hooks that are slow::

    class TestMyHook(HookContract):
        hook_factory = MyHook

Checks: serving is unaffected (every request finishes with the output it has alone, no block
leaked), your hook never raises and returns within ``max_event_seconds``, a raising or slow
hook next to yours breaks nothing and yours still hears every event, and every hook sees each
request's events in order (queued first, finished last and once, first token before the
others). ``hookset_factory`` builds the fan-out (default :class:`~servekit.metrics.HookSet`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from hypothesis import given

from servekit.metrics.hooks import EVENT_METHODS, Hook, HookSet, listener
from servekit.testing._check import check, check_interface
from servekit.testing._run import kit_settings, run_given
from servekit.testing.serve import serve
from servekit.testing.strategies import workloads

HookFactory = Callable[[], Hook]
HookSetFactory = Callable[[Iterable[Hook]], HookSet]

#: per-request events, the order they may come in
_FIRST, _LAST = "on_request_queued", "on_request_finished"
_PER_REQUEST = ("on_request_queued", "on_request_scheduled", "on_request_preempted",
                "on_first_token", "on_new_tokens", "on_request_finished")


class Recorder(Hook):
    """Records every event it hears, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        for name in EVENT_METHODS:
            setattr(self, name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            self.events.append((name, event))
        return record


class Probe(Hook):
    """Calls the hook under test as the hook set would, timing each call and recording what it
    raised (then re-raises, for the hook set to isolate)."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self.calls: dict[str, int] = defaultdict(int)
        self.errors: list[tuple[str, BaseException]] = []
        self.slowest = (0.0, "")
        for name in EVENT_METHODS:
            method = listener(hook, name)
            if method is not None:
                setattr(self, name, self._timed(name, method))

    def _timed(self, name: str, method: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(event: Any) -> None:
            self.calls[name] += 1
            start = time.perf_counter()
            try:
                method(event)
            except Exception as exc:
                self.errors.append((name, exc))
                raise
            finally:
                took = time.perf_counter() - start
                if took > self.slowest[0]:
                    self.slowest = (took, name)
        return call


class _Raising(Hook):
    def __init__(self) -> None:
        for name in EVENT_METHODS:
            setattr(self, name, self._boom)

    def _boom(self, event: Any) -> None:
        raise RuntimeError("a raising hook (servekit.testing)")


class _Slow(Hook):
    def on_request_finished(self, event: Any) -> None:
        time.sleep(0.002)


def check_event_order(events: Iterable[tuple[str, Any]], who: str) -> None:
    """Per request: queued first and once, finished last and once, scheduled before a
    preemption and before the first token, the first token before later tokens."""
    seen: dict[str, list[str]] = defaultdict(list)
    for name, event in events:
        if name in _PER_REQUEST:
            seen[event.request_id].append(name)
    for rid, names in seen.items():
        order = f"{who} saw {rid}: {names}"
        check(names[0] == _FIRST and names.count(_FIRST) == 1, "event order per request", order)
        check(names.count(_LAST) == 1 and names[-1] == _LAST, "event order per request", order)
        if "on_request_preempted" in names:
            check("on_request_scheduled" in names[: names.index("on_request_preempted")],
                  "event order per request", order)
        if "on_first_token" in names:
            first = names.index("on_first_token")
            check(names.count("on_first_token") == 1 and "on_request_scheduled" in names[:first]
                  and "on_new_tokens" not in names[:first], "event order per request", order)


class HookContract:
    """Conformance tests for a metrics hook; subclass with ``hook_factory``.

    Options: ``max_examples``, ``seed``, ``max_event_seconds`` (the slowest call the hook may
    make; the contract says hooks never block), ``hookset_factory``.
    """

    hook_factory: ClassVar[HookFactory]
    hookset_factory: ClassVar[HookSetFactory] = HookSet
    max_examples: ClassVar[int] = 20
    seed: ClassVar[int | None] = None
    max_event_seconds: ClassVar[float] = 0.05

    def make_hook(self) -> Hook:
        """A fresh hook from ``hook_factory``."""
        factory = getattr(type(self), "hook_factory", None)
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set hook_factory")
        return factory()  # type: ignore[no-any-return]

    def _run(self, body: Callable[..., None]) -> None:
        test = given(specs=workloads(max_requests=10))(body)
        run_given(test, kit_settings(type(self).max_examples, 1, type(self).seed),
                  type(self).seed)

    def test_implements_the_interface(self) -> None:
        """The hook is a servekit Hook at servekit's version."""
        check_interface(self.make_hook(), "hook")

    def test_hook_on_real_serving(self) -> None:
        """Serving unaffected; the hook never raises, returns quickly, sees events in order."""
        hookset_factory = type(self).hookset_factory

        def body(specs: Any) -> None:
            probe, before, after = Probe(self.make_hook()), Recorder(), Recorder()
            serve(specs, hookset_factory([before, probe, after]))
            check(not probe.errors, "the hook never raises",
                  f"{type(probe.hook).__name__}.{probe.errors[0][0]} raised "
                  f"{probe.errors[0][1]!r}" if probe.errors else "")
            took, name = probe.slowest
            check(took <= type(self).max_event_seconds, "a hook returns quickly",
                  f"{type(probe.hook).__name__}.{name} took {took * 1e3:.1f} ms "
                  f"(max_event_seconds {type(self).max_event_seconds})")
            check(before.events == after.events, "every hook hears the same events in order",
                  "the hook set delivered different events to two recorders")
            check_event_order(after.events, "a hook")

        self._run(body)

    def test_raising_or_slow_hooks_never_break_serving(self) -> None:
        """Beside hooks that raise on every event and one that is slow, serving is unaffected
        and the hook under test still hears every event it listens to."""
        hookset_factory = type(self).hookset_factory

        def body(specs: Any) -> None:
            probe, recorder = Probe(self.make_hook()), Recorder()
            hooks = hookset_factory([_Raising(), probe, _Slow(), _Raising(), recorder])
            serve(specs, hooks, invariant="a raising or slow hook never breaks serving")
            heard: dict[str, int] = defaultdict(int)
            for name, _ in recorder.events:
                heard[name] += 1
            for name, count in probe.calls.items():
                check(count == heard[name], "every event reaches every hook",
                      f"{type(probe.hook).__name__}.{name} heard {count} of {heard[name]}")
            check_event_order(recorder.events, "a hook after raising ones")

        self._run(body)


def hook_contract(hook_factory: HookFactory, **options: Any) -> type[HookContract]:
    """A :class:`HookContract` subclass for ``hook_factory`` (assign it to a ``Test*`` name)."""
    return type("TestHook", (HookContract,),
                {"hook_factory": staticmethod(hook_factory), **options})
