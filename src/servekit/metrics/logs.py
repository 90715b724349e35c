"""Structured logs: one JSON line per finished request through ``logging``, and a JSON-lines
file of engine steps (what ``servekit sim profile --step-log`` fits a step-time model on)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from servekit.metrics.events import EngineStep, RequestFinished
from servekit.metrics.hooks import Hook
from servekit.metrics.stats import time_per_output_token


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def request_record(event: RequestFinished, model_name: str | None = None) -> dict[str, Any]:
    """The plain-data record logged for a finished request (timings in seconds, or None)."""
    arrival = event.arrival_time
    scheduled, first = event.first_scheduled_time, event.first_token_time
    return {
        "event": "request_finished",
        "request_id": event.request_id,
        "tenant": event.tenant,
        "model": model_name,
        "finish_reason": event.reason,
        "prompt_tokens": event.prompt_tokens,
        "output_tokens": event.output_tokens,
        "cached_prompt_tokens": event.cached_prompt_tokens,
        "num_preemptions": event.num_preemptions,
        "queue_time_s": _seconds(None if scheduled is None else scheduled - arrival),
        "ttft_s": _seconds(None if first is None else first - arrival),
        "tpot_s": _seconds(time_per_output_token(event)),
        "e2e_s": _seconds(event.time - arrival),
    }


class RequestLogHook(Hook):
    """Logs :func:`request_record` as one compact JSON line per finished request.

    The record also rides on the log record as ``record.servekit_request`` for handlers that
    format it themselves. Nothing is serialised when the logger is disabled for ``level``.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        model_name: str | None = None,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger("servekit.requests")
        self.level = level
        self.model_name = model_name

    def on_request_finished(self, event: RequestFinished) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        record = request_record(event, self.model_name)
        self.logger.log(
            self.level,
            json.dumps(record, separators=(",", ":")),
            extra={"servekit_request": record},
        )


STEP_LOG_FIELDS = ("batch_size", "scheduled_tokens", "num_running", "num_waiting", "duration",
                   "time", "prefill_tokens", "num_decodes", "kv_tokens", "attention_pairs",
                   "arrivals", "output_tokens")


class StepLogHook(Hook):
    """Appends one JSON line per engine step (the fields of :class:`EngineStep`) to ``path``.

    A server started with ``--hook 'step_log:{"path": "steps.jsonl"}'`` records its steps as it
    serves: this is how the simulator's profiled step-time model is measured through the server.
    The file is line-buffered, so a reader sees every finished step.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()  # steps may be reported from the engine's worker thread

    def on_engine_step(self, event: EngineStep) -> None:
        line = json.dumps({name: getattr(event, name) for name in STEP_LOG_FIELDS},
                          separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()
