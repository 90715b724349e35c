"""Incremental detokenization streams valid UTF-8; stop strings are cut and never emitted."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from servekit.engine.detokenize import IncrementalDetokenizer
from servekit.engine.stop import StopStringMatcher

TEXTS = ["日本語のテキスト 🙂🚀 naïve café", "ça va? — 中文字符 emoji 🚀", "plain ascii text"]


class SlowTokenizer:
    """Only ``decode``: forces the offset-window path."""

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._fast.decode(ids, skip_special_tokens=skip_special_tokens))


def stream(tok: Any, prompt: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.step(i) for i in ids]


def test_multibyte_characters_split_across_tokens_never_emit_replacement(tokenizer: Any) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces = [tokenizer.decode([i]) for i in ids]
        assert any("\ufffd" in p for p in pieces) or text == TEXTS[2]  # the tokenizer splits them
        prompt = tokenizer.encode("ROMEO: ")
        for tok in (tokenizer, SlowTokenizer(tokenizer)):
            deltas = stream(tok, prompt, ids)
            assert all("\ufffd" not in d for d in deltas)
            assert "".join(deltas) == text


@settings(max_examples=30)
@given(st.text(alphabet="ab 日本🙂é\n", max_size=30))
def test_stream_concatenates_to_the_full_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, [], ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_partial_match_held_back() -> None:
    m = StopStringMatcher(["STOP", "xyz"])
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("OP and more") == ("", True)
    assert m.stopped_on == "STOP" and m.flush() == ""


def test_held_text_is_released_when_ruled_out_or_flushed() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("aST") == ("a", False)
    assert m.feed("ar") == ("STar", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


@settings(max_examples=60)
@given(text=st.text(alphabet="abS", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stop=st.sampled_from(["ab", "SSa", "b"]))
def test_streamed_stop_matches_whole_text_search(text: str, cuts: list[int], stop: str) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    m = StopStringMatcher([stop])
    emitted, stopped = "", False
    for a, b in itertools.pairwise(bounds):
        out, stopped = m.feed(text[a:b])
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += m.flush()
    at = text.find(stop)
    assert emitted == (text[:at] if at != -1 else text) and stopped == (at != -1)


def test_special_tokens_are_kept_only_when_asked() -> None:
    """``[TOOL_CALLS]`` is a special token on a real tokenizer: dropped by default, kept with
    ``skip_special_tokens=False`` (what a Mistral tool-call parser needs), on both paths."""
    from tests.structured.scripted_model import BODIES, TOOL_CALLS, build_tokenizer

    tok = build_tokenizer("mistral")
    ids = tok.convert_tokens_to_ids([TOOL_CALLS, BODIES["mistral"]])
    prompt = tok.encode("add [/INST]")
    for impl in (tok, SlowTokenizer(tok)):
        kept = IncrementalDetokenizer(impl, prompt, skip_special_tokens=False)
        assert "".join(kept.step(i) for i in ids) == TOOL_CALLS + BODIES["mistral"]
        skipped = IncrementalDetokenizer(impl, prompt)
        assert "".join(skipped.step(i) for i in ids) == BODIES["mistral"]
