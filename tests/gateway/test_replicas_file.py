"""A replica list that changes at run time: the gateway re-reads ``--replicas-file`` and adds
and removes real ``servekit serve --fake`` replicas; a removed replica's stream in flight
finishes; a bad edit keeps the list. The admin endpoint does the same for admin keys only."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from servekit.gateway import create_gateway
from servekit.gateway.fleet import Fleet, SettledText, parse_replicas
from servekit.limit.keys import ApiKey, KeyStore
from tests.asgi_server import serve_asgi
from tests.server.cli_server import cli_servers


def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _routed(gw: str) -> dict[str, float]:
    text = httpx.get(gw + "/metrics").text
    out: dict[str, float] = {}
    for m in re.finditer(r'^servekit_gateway_routing_decisions_total\{[^}]*replica="([^"]+)"'
                         r'[^}]*\} (\S+)$', text, re.M):
        out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


def _send(gw: str, n: int) -> None:
    for _ in range(n):
        r = httpx.post(gw + "/v1/completions", timeout=10,
                       json={"model": "fake", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_edits_to_the_replicas_file_add_and_remove_replicas(tmp_path: Path) -> None:
    path = tmp_path / "replicas.txt"
    with ExitStack() as stack:
        one, two = stack.enter_context(cli_servers(["--fake", "--fake-token-delay", "0.01"],
                                                   ["--fake"]))
        path.write_text(f"# the fleet\n{one.url}\n")
        app = create_gateway([], replicas_file=path, policy="round_robin", probe_interval=0.05)
        fleet = app.state.fleet
        gw = stack.enter_context(serve_asgi(app))
        assert fleet.urls == (one.url,)
        _send(gw, 4)
        assert _routed(gw) == {one.url: 4}

        stream: dict[str, str] = {}

        def long_stream() -> None:  # 100 tokens 10 ms apart, still running when one leaves
            r = httpx.post(gw + "/v1/completions", timeout=30, json={
                "model": "fake", "prompt": "hi", "max_tokens": 100, "stream": True})
            stream["text"] = r.text

        reader = threading.Thread(target=long_stream)
        reader.start()
        time.sleep(0.3)
        path.write_text(f"{two.url}\n")
        _until(lambda: fleet.urls == (two.url,), "replica one never left")
        assert one.url not in fleet.router.replicas
        _send(gw, 4)
        assert _routed(gw) == {one.url: 5, two.url: 4}
        reader.join(30)
        assert stream["text"].count("data: {") == 100  # the removed replica's stream finished
        assert stream["text"].rstrip().endswith("data: [DONE]")

        path.write_text(f"{two.url}\nnot a url\n")  # a bad edit: the list stays
        time.sleep(0.3)
        assert fleet.urls == (two.url,)
        path.unlink()  # gone for a while (a replace in progress): the list stays
        time.sleep(0.3)
        assert fleet.urls == (two.url,)
        path.write_text(f"{two.url}\n{one.url}/\n")
        _until(lambda: fleet.urls == (two.url, one.url), "replica one never came back")
        _until(lambda: httpx.get(gw + "/ready").json()["replicas"].get(one.url) == "up",
               "replica one not probed")
        _send(gw, 4)
        assert _routed(gw) == {one.url: 7, two.url: 6}


def test_an_edit_is_taken_once_two_reads_agree() -> None:
    edits = SettledText()
    assert [edits.settled(t) for t in ("a", "a", "a")] == [False, True, False]
    # "a" rewritten in place as "b": read torn (empty, cut short) in between, never taken
    assert [edits.settled(t) for t in ("", "b", "", "b", "b", "b")] == [
        False, False, False, False, True, False]
    assert edits.applied == "b"
    assert [edits.settled(t) for t in ("b\nc", "b", "b")] == [False, False, False]  # back: no edit


def test_a_file_rewritten_in_place_never_empties_the_fleet(tmp_path: Path) -> None:
    # the race the full suite hit: the watcher read the file between its truncation and its
    # write, and the fleet briefly had no replicas at all
    import anyio

    interval = 0.2
    path = tmp_path / "replicas.txt"
    text = "http://127.0.0.1:9\nhttp://127.0.0.1:19\n"
    path.write_text(text)
    fleet = Fleet([], policy="round_robin", probe_interval=interval, replicas_file=path)
    seen: set[tuple[str, ...]] = set()

    async def scenario() -> None:
        async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
            tg.start_soon(fleet.run, client)

            async def sample() -> None:
                while True:
                    seen.add(fleet.urls)
                    await anyio.sleep(0.005)

            tg.start_soon(sample)
            for _ in range(12):  # each torn for a quarter of an interval: read in it ~1 in 4
                with path.open("w") as f:  # truncated
                    await anyio.sleep(interval / 4)
                    f.write(text)
                await anyio.sleep(interval)
            tg.cancel_scope.cancel()

    anyio.run(scenario)
    assert seen == {("http://127.0.0.1:9", "http://127.0.0.1:19")}


def test_parse_replicas_names_the_bad_line() -> None:
    assert parse_replicas("http://a:1\n\n  # c\nhttps://b:2/ # d\n") == ["http://a:1",
                                                                     "https://b:2/"]
    with pytest.raises(ValueError, match=r"f:2: not a replica base URL: 'ftp://x'"):
        parse_replicas("http://a:1\nftp://x\n", "f")


@pytest.mark.slow
def test_admin_endpoint_replaces_the_replica_list_for_admin_keys_only(tmp_path: Path) -> None:
    keys = KeyStore([ApiKey("sk-root", tenant="ops", admin=True), ApiKey("sk-user")])
    with ExitStack() as stack:
        one, two = stack.enter_context(cli_servers(["--fake"], ["--fake"]))
        app = create_gateway([one.url], keys=keys, policy="round_robin", probe_interval=0.05)
        gw = stack.enter_context(serve_asgi(app))

        def put(body: object, key: str | None = "sk-root") -> httpx.Response:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            return httpx.put(gw + "/admin/replicas", json=body, headers=headers)

        assert put({"replicas": [two.url]}, key=None).status_code == 401
        assert put({"replicas": [two.url]}, key="sk-wrong").status_code == 401
        denied = put({"replicas": [two.url]}, key="sk-user")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "not_admin"
        bad = put({"replicas": [two.url, "two"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "replicas[1]"
        assert put({"replicas": "x"}).json()["error"]["param"] == "replicas"
        assert app.state.fleet.urls == (one.url,)  # nothing above changed the list

        done = put({"replicas": [two.url]})  # the --replica one stays
        assert done.status_code == 200
        assert [r["url"] for r in done.json()["replicas"]] == [one.url, two.url]
        _until(lambda: httpx.get(gw + "/ready").json()["replicas"].get(two.url) == "up",
               "replica two not probed")
        for _ in range(4):
            r = httpx.post(gw + "/v1/completions", headers={"authorization": "Bearer sk-user"},
                           json={"model": "fake", "prompt": "hi", "max_tokens": 2}, timeout=10)
            assert r.status_code == 200
        assert _routed(gw) == {one.url: 2, two.url: 2}
        listed = httpx.get(gw + "/admin/replicas", headers={"authorization": "Bearer sk-root"})
        assert listed.json() == {"replicas": [{"url": one.url, "state": "up"},
                                              {"url": two.url, "state": "up"}]}


def test_admin_endpoints_are_off_without_an_admin_key() -> None:
    app = create_gateway(["http://127.0.0.1:9"], keys=KeyStore([ApiKey("sk-user")]))
    with serve_asgi(app) as gw:
        r = httpx.get(gw + "/admin/replicas", headers={"authorization": "Bearer sk-user"})
        assert r.status_code == 404


def test_a_watch_that_finds_its_replica_gone_ends_without_stopping_the_fleet() -> None:
    # the race the full suite hit: the replica's /ready answered, then (before the watch task
    # resumed, so before its cancellation could land) the replicas file removed it
    import anyio

    from servekit.gateway.fleet import Fleet

    async def ready_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    with serve_asgi(ready_app) as url:
        fleet = Fleet([], policy="round_robin", probe_interval=0.01)
        fleet.set_replicas([url])
        fleet.set_replicas([])  # gone before the watch ever ran

        async def watch_once() -> None:
            async with httpx.AsyncClient() as client:
                with anyio.fail_after(5):
                    await fleet._watch(client, url)  # returns instead of raising

        anyio.run(watch_once)
