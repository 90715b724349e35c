"""``servekit serve --fake-model-cost``: the real engine over the cost-model runner, as a real
process (deterministic text, prefix-cache hits in /metrics), and its errors before start."""

from __future__ import annotations

import re

import httpx
import pytest

from servekit.engine.cost_runner import TEXT
from servekit.server.cli import build_parser, build_plugins
from servekit.server.config import ConfigError, apply_config
from tests.server.cli_server import cli_server


@pytest.mark.parametrize(("spec", "message"), [
    ("{nope", r"--fake-model-cost: not valid JSON"),
    ("[1]", r"--fake-model-cost: must be a JSON object"),
    ('{"speed": 1}', r"--fake-model-cost: .*unexpected keyword argument 'speed'"),
    ('{"decode_row_s": -0.1}', r"--fake-model-cost: decode_row_s: must be a number"),
])
def test_bad_cost_model_is_refused_naming_the_flag(spec: str, message: str) -> None:
    args = apply_config(build_parser().parse_args(["serve", "--fake-model-cost", spec]))
    with pytest.raises(ConfigError, match=message):
        build_plugins(args)


@pytest.mark.slow
def test_serves_the_real_engine_over_the_cost_model() -> None:
    prompt = "you are a helpful assistant. " * 8  # 232 bytes + bos: 14 full blocks
    with cli_server("--fake-model-cost", '{"base_s": 0.001, "num_blocks": 64}') as server:
        texts = []
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions", timeout=30, json={
                "model": "fake", "prompt": prompt, "max_tokens": 6, "temperature": 0.9})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        start = len(prompt) + 1  # the bos: the first output sits at this position
        assert texts == [bytes(TEXT[(start + i) % len(TEXT)] for i in range(6)).decode()] * 2
        metrics = httpx.get(server.url + "/metrics").text
        hits = re.search(r"^servekit_prefix_cache_hits_total\{[^}]*\} (\S+)$", metrics, re.M)
        assert hits is not None and float(hits[1]) == 14 * 16  # the second found 14 blocks
