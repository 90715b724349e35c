"""The scheduler's optional C core (``servekit.sched._csched``) and the choice of it."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.kv.manager import KVCacheManager
from servekit.sched import Scheduler
from servekit.sched import scheduler as scheduler_module

csched = scheduler_module._csched
needs_c = pytest.mark.skipif(csched is None, reason="servekit.sched._csched is not built")


def make_scheduler(**kwargs: object) -> Scheduler:
    return Scheduler(KVCacheManager(16, 4), max_model_len=32, **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only where CI=true")
def test_ci_builds_and_uses_the_c_core() -> None:
    """CI must never silently measure or test the fallback."""
    assert csched is not None
    assert make_scheduler().speedups


@needs_c
def test_default_uses_the_c_core_unless_the_environment_says_no(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SERVEKIT_NO_SPEEDUPS", raising=False)
    assert make_scheduler().speedups
    assert not make_scheduler(speedups=False).speedups
    monkeypatch.setenv("SERVEKIT_NO_SPEEDUPS", "1")
    assert not make_scheduler().speedups
    assert make_scheduler(speedups=True).speedups


def test_requiring_a_missing_core_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "_csched", None)
    with pytest.raises(ImportError, match=r"servekit\.sched\._csched"):
        make_scheduler(speedups=True)
    assert not make_scheduler().speedups


@needs_c
@given(st.lists(st.tuples(st.lists(st.integers(0, 2**31 - 1), max_size=5),
                          st.integers(0, 2**31 - 1), st.integers(0, 2**40)), max_size=40),
       st.lists(st.integers(0, 2**31 - 1), max_size=5))
def test_advance_decodes_matches_the_python_statements(
    decodes: list[tuple[list[int], int, int]], extra_samples: list[int]
) -> None:
    lists = [list(tokens) for tokens, _, _ in decodes]
    sampled = [t for _, t, _ in decodes] + extra_samples  # prefill samples follow the decodes
    computed = [c for _, _, c in decodes]
    expected_lists = [[*tokens, t] for tokens, t, _ in decodes]
    out = csched.advance_decodes(lists, tuple(sampled), computed)
    assert lists == expected_lists
    assert out == [c + 1 for c in computed]
    assert computed == [c for _, _, c in decodes]  # the input list is not changed


@needs_c
@pytest.mark.parametrize(
    ("lists", "sampled", "computed", "error"),
    [
        ([[1], [2]], [7], [0, 0], ValueError),  # fewer tokens than decodes
        ([[1], [2]], [7, 8], [0], ValueError),  # computed not aligned with the lists
        ([[1], (2,)], [7, 8], [0, 0], TypeError),  # a token list that is not a list
        ([[1], [2]], [7, 8], [0, "x"], TypeError),  # a count that is not an int
        ([[1], [2]], 5, [0, 0], TypeError),  # sampled not a sequence
    ],
)
def test_advance_decodes_rejects_bad_arguments_without_appending(
    lists: list, sampled: object, computed: list, error: type[Exception]
) -> None:
    before = [list(x) for x in lists]
    with pytest.raises(error):
        csched.advance_decodes(lists, sampled, computed)
    assert [list(x) for x in lists] == before
