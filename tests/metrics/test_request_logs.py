"""RequestLogHook: one JSON line per finished request through logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest

from servekit.metrics import HookSet, RequestFinished, RequestLogHook
from servekit.metrics.logs import request_record

Lifecycle = Callable[..., None]


def test_one_json_line_per_finished_request(
    caplog: pytest.LogCaptureFixture, lifecycle: Lifecycle
) -> None:
    hook = RequestLogHook(model_name="tiny-llama")
    with caplog.at_level(logging.INFO, logger="servekit.requests"):
        lifecycle(HookSet([hook]), "r1", "acme")
        lifecycle(HookSet([hook]), "r2", None)
    records = [r for r in caplog.records if r.name == "servekit.requests"]
    assert len(records) == 2
    line = records[0].getMessage()
    assert "\n" not in line
    data = json.loads(line)
    assert data == {
        "event": "request_finished",
        "request_id": "r1",
        "tenant": "acme",
        "model": "tiny-llama",
        "finish_reason": "stop",
        "prompt_tokens": 12,
        "output_tokens": 4,
        "cached_prompt_tokens": 4,
        "num_preemptions": 1,
        "queue_time_s": 0.5,
        "ttft_s": 1.0,
        "tpot_s": round(0.5 / 3, 6),
        "e2e_s": 1.5,
    }
    assert records[0].servekit_request == data  # type: ignore[attr-defined]
    assert json.loads(records[1].getMessage())["tenant"] is None


def test_unknown_timings_are_null_and_custom_logger_level() -> None:
    logger = logging.getLogger("test.servekit.requests")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        hook = RequestLogHook(logger, level=logging.DEBUG)
        event = RequestFinished("r", None, "abort", 7, 0, 0, 0, 1.0, None, None, 2.0)
        hook.on_request_finished(event)
        logger.setLevel(logging.INFO)  # now below the hook's level: nothing is logged
        hook.on_request_finished(event)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].levelno == logging.DEBUG
    data = json.loads(seen[0].getMessage())
    assert data["queue_time_s"] is None and data["ttft_s"] is None and data["tpot_s"] is None
    assert data == request_record(event)
