"""``ToolOutputs`` (shared by the HTTP and gRPC encoders): streamed equals whole, any split."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from servekit.server.tools import ToolOutputs
from servekit.structured.tools import HermesToolParser, collect_calls

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
OTHER = '<tool_call>\n{"name": "city", "arguments": {"c": "Rome"}}\n</tool_call>'
CUT = '<tool_call>\n{"name": "add", "arguments": {"a": "}{\\"'  # head out, arguments open
PIECES = ["Sure. ", "\n", " \n ", CALL, " then ", OTHER, "<tool_", "<tool_call>{bad}</tool_call>", "done", CUT,
          '<tool_call>{"arguments": {}, "name": "x"}</tool_call>']


@given(parts=st.lists(st.sampled_from(PIECES), max_size=6), cuts=st.lists(st.integers(0, 400)),
       parallel=st.booleans())
def test_streamed_content_and_calls_equal_the_whole_parse(
        parts: list[str], cuts: list[int], parallel: bool) -> None:
    text = "".join(parts)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]
    outputs = ToolOutputs(HermesToolParser(), 1, parallel)
    content, calls = "", []
    for k, delta in enumerate(deltas):
        got, new = outputs.feed(0, delta, finished=k == len(deltas) - 1)
        content += got
        calls += new
    whole_content, whole_calls = ToolOutputs(HermesToolParser(), 1, parallel).parse(text)
    # trailing whitespace is held, and dropped from a message of calls and whitespace
    # (whose content is None)
    assert content == (ToolOutputs.message_content(whole_content, len(whole_calls)) or "")
    joined = collect_calls(calls)
    assert [(c.name, c.arguments) for c in joined] == [(c.name, c.arguments)
                                                       for c in whole_calls]
    heads = [d.index for d in calls if d.id is not None]
    assert heads == list(range(len(joined)))  # indices number the calls, each head first
    seen: set[int] = set()
    for d in calls:  # a call's fragments follow its head
        assert d.index in seen or d.id is not None
        seen.add(d.index)
    assert outputs.sent(0) == len(joined) and (parallel or len(joined) <= 1)
    reason = ToolOutputs.finish_reason("stop", len(joined))
    assert reason == ("tool_calls" if joined else "stop")
    assert ToolOutputs.finish_reason("length", len(joined)) == "length"
