"""API keys (file, environment, constant-time lookup) and per-key reserve/settle accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from servekit.protocol.errors import TooManyRequestsError
from servekit.server import ApiKey, KeyConfigError, KeyLimits, KeyStore
from servekit.server.ratelimit import Admission


def test_keys_from_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"key": "sk-a", "tenant": "alice", "rpm": 60, "tpm": 1000, "cache_salt": "shared"},
        {"key": "sk-b", "tenant": "bob"}, "sk-c"]}))
    store = KeyStore.from_file(path)
    assert len(store) == 3 and not store.open
    a = store.authenticate("sk-a")
    assert a is not None and (a.tenant, a.rpm, a.tpm, a.salt) == ("alice", 60, 1000, "shared")
    assert store.authenticate("sk-c") == ApiKey("sk-c")
    assert store.authenticate("sk-") is None and store.authenticate("") is None
    assert "sk-a" not in repr(a)  # the secret is not printed
    assert not a.admin and not store.has_admin


def test_admin_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "sk-root", "admin": True}, "sk-c"]}))
    store = KeyStore.from_file(path)
    root, plain = store.authenticate("sk-root"), store.authenticate("sk-c")
    assert root is not None and root.admin and plain is not None and not plain.admin
    assert store.has_admin


def test_keys_from_env() -> None:
    assert KeyStore.from_env(environ={}).open
    plain = KeyStore.from_env(environ={"SERVEKIT_API_KEYS": "k1, k2"})
    assert plain.authenticate("k2") == ApiKey("k2")
    js = KeyStore.from_env(environ={"SERVEKIT_API_KEYS": '[{"key": "k", "tenant": "t"}]'})
    assert js.authenticate("k") == ApiKey("k", tenant="t")


def test_each_key_has_its_own_salt_by_default() -> None:
    assert ApiKey("a").salt != ApiKey("b").salt and ApiKey("a").salt == ApiKey("a").salt


@pytest.mark.parametrize(("data", "field"), [
    ({"keys": [{"key": ""}]}, "keys[0].key"),
    ({"keys": [{"key": "k", "rpm": 0}]}, "keys[0].rpm"),
    ({"keys": [{"key": "k", "tpm": "many"}]}, "keys[0].tpm"),
    ({"keys": [{"key": "k", "tenant": 3}]}, "keys[0].tenant"),
    ({"keys": [{"key": "k", "rmp": 3}]}, "unknown field"),
    ({"keys": [{"key": "k", "admin": "yes"}]}, "keys[0].admin"),
    ({"keys": ["k", "k"]}, "duplicate"),
    ({"nope": []}, "expected"),
])
def test_bad_key_config_names_the_entry(tmp_path: Path, data: object, field: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KeyConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        KeyStore.from_file(path)


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyStore.from_file(tmp_path / "missing.json")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ReserveSettle(RuleBasedStateMachine):
    """Reserve and settle in any order: open reservations are exactly the unsettled ones, and
    the tokens a key has spent never exceed what its bucket allows."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.limits = KeyLimits(clock=self.clock)
        self.key = ApiKey("k", rpm=5, tpm=500)
        self.open: list[tuple[Admission, int]] = []

    @rule(prompt=st.integers(1, 200), max_tokens=st.integers(1, 200))
    def reserve(self, prompt: int, max_tokens: int) -> None:
        try:
            admission = self.limits.reserve(self.key, "m", prompt + max_tokens)
        except TooManyRequestsError as exc:
            assert exc.status == 429 and "retry-after" in exc.headers
            return
        assert admission.reservation is not None
        self.open.append((admission, prompt))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.open) - 1))
        admission, prompt = self.open.pop(i)
        used = prompt + data.draw(st.integers(0, 10))
        self.limits.settle(admission, used)

    @rule(seconds=st.floats(0, 30))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def open_reservations_are_the_unsettled_ones(self) -> None:
        assert self.limits.open_reservations == len(self.open)

    def teardown(self) -> None:
        for admission, prompt in self.open:
            self.limits.settle(admission, prompt)
        assert self.limits.open_reservations == 0


TestReserveSettle = ReserveSettle.TestCase
TestReserveSettle.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_unlimited_keys_reserve_nothing() -> None:
    limits = KeyLimits()
    assert limits.reserve(None, "m", 10**9).reservation is None
    assert limits.reserve(ApiKey("k"), "m", 10**9).reservation is None
    assert limits.open_reservations == 0


def test_auth_is_enforced_behind_a_root_path() -> None:
    """uvicorn joins ``root_path`` into ``path``: /v1/* must still need a key."""
    import httpx

    from servekit.server import FakeEngine, create_app
    from tests.server.conftest import serve

    app = create_app(FakeEngine(), keys=KeyStore([ApiKey("sk-a")]), metrics=False)
    with serve(app, root_path="/api") as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        ok = httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer sk-a"})
        assert ok.status_code == 200


def test_a_store_outage_at_settle_keeps_the_charge_and_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from collections.abc import Sequence

    from servekit.limit.bucket import LimitSet
    from servekit.limit.errors import StoreUnavailableError
    from servekit.limit.store import MemoryStore, TakeResult

    class FlakyStore(MemoryStore):
        down = False

        def adjust(self, key: str, limits: LimitSet, deltas: Sequence[float],
                   now: float) -> TakeResult:
            if self.down:
                raise StoreUnavailableError("redis is down")
            return super().adjust(key, limits, deltas, now)

    store = FlakyStore()
    limits = KeyLimits(store=store, clock=Clock())
    key = ApiKey("k", rpm=5, tpm=500)
    admission = limits.reserve(key, "m", 400)
    store.down = True
    limits.settle(admission, 10)  # would refund 390 tokens; the store is down
    assert limits.open_reservations == 0
    assert "could not settle" in caplog.text
    with pytest.raises(TooManyRequestsError):  # the full 400 stay charged: 200 more do not fit
        limits.reserve(key, "m", 200)
