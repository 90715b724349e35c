"""The usage-sink kit: a batch delivered twice is counted once::

    class TestMySink(UsageSinkContract):
        sink_factory = MySink

        def stored(self, sink):
            return sink.read_all()  # the records the sink holds, read back from its storage

Batches are redelivered whole, in part, and out of order (what an outbox does after a worker
died between the sink's commit and its own delete); the sink must hold exactly one record per
``idempotency_key``, equal to the first one written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from hypothesis import given
from hypothesis import strategies as st

from servekit.testing._check import check, check_interface
from servekit.testing._run import kit_settings, run_given
from servekit.usage.sink import UsageRecord, UsageSink

SinkFactory = Callable[[], UsageSink]
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def usage_records(keys: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[UsageRecord]:
    """Usage records with plausible fields; ``keys`` draws the idempotency keys."""
    return st.builds(
        lambda key, seconds, tenant, prompt, cached, completion: UsageRecord(
            request_id=f"req-{key}", idempotency_key=key,
            time=_EPOCH + timedelta(seconds=seconds), key_id=f"kid-{tenant}", tenant=tenant,
            model="kit-model", replicas=("replica-0",), prompt_tokens=prompt,
            cached_tokens=min(cached, prompt), completion_tokens=completion,
            finish_reason="stop", total_time=0.5, final_chunk_sent=True),
        keys if keys is not None else st.uuids().map(str), st.integers(0, 10**6),
        st.sampled_from(["a", "b", None]), st.integers(0, 4096), st.integers(0, 4096),
        st.integers(0, 2048),
    )


class UsageSinkContract:
    """Conformance tests for a usage sink; subclass with ``sink_factory`` and :meth:`stored`.
    Options: ``max_examples``, ``seed``."""

    sink_factory: ClassVar[SinkFactory]
    max_examples: ClassVar[int] = 25
    seed: ClassVar[int | None] = None

    def make_sink(self) -> UsageSink:
        """A fresh, empty sink from ``sink_factory``."""
        factory = getattr(type(self), "sink_factory", None)
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set sink_factory")
        return factory()  # type: ignore[no-any-return]

    def stored(self, sink: UsageSink) -> Iterable[UsageRecord]:
        """Every record ``sink`` holds, read back from its storage (override this)."""
        raise TypeError(f"{type(self).__name__} must override stored(sink)")

    def test_implements_the_interface(self) -> None:
        """The sink implements UsageSink at servekit's version."""
        sink = self.make_sink()
        try:
            check_interface(sink, "usage_sink")
        finally:
            sink.close()

    def test_batch_written_twice_is_counted_once(self) -> None:
        """Redelivered batches (whole, partial, reordered) leave one record per key, the first."""

        @given(batches=st.lists(st.lists(usage_records(st.sampled_from(
                   [f"k{i}" for i in range(30)])), min_size=1, max_size=8),
                   min_size=1, max_size=6),
               redeliver=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 8)), max_size=6))
        def once(batches: list[list[UsageRecord]], redeliver: list[tuple[int, int]]) -> None:
            sink = self.make_sink()
            try:
                first: dict[str, UsageRecord] = {}
                for batch in batches:
                    sink.write(batch)
                    for record in batch:
                        first.setdefault(record.idempotency_key, record)
                for index, start in redeliver:  # an outbox redelivering after a crash
                    batch = batches[index % len(batches)]
                    sink.write(batch[start % len(batch):] + batch[: start % len(batch)])
                got = list(self.stored(sink))
            finally:
                sink.close()
            keys = [r.idempotency_key for r in got]
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            check(not dupes, "a batch written twice is counted once",
                  f"keys stored more than once: {dupes[:5]}")
            check(set(keys) == set(first), "every written record is stored",
                  f"missing {sorted(set(first) - set(keys))[:5]}, "
                  f"unexpected {sorted(set(keys) - set(first))[:5]}")
            for record in got:
                check(record == first[record.idempotency_key], "a rewrite changes nothing",
                      f"{record.idempotency_key}: stored {record}, first written "
                      f"{first[record.idempotency_key]}")

        run_given(once, kit_settings(type(self).max_examples, 1, type(self).seed),
                  type(self).seed)


def usage_sink_contract(sink_factory: SinkFactory, stored: Callable[[Any], Iterable[UsageRecord]],
                        **options: Any) -> type[UsageSinkContract]:
    """A :class:`UsageSinkContract` subclass for ``sink_factory`` read back by
    ``stored(sink)`` (assign it to a ``Test*`` name)."""
    return type("TestUsageSink", (UsageSinkContract,), {
        "sink_factory": staticmethod(sink_factory),
        "stored": lambda self, sink: stored(sink), **options})
