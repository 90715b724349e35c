"""Profiling through the server: the ``step_log`` hook records each engine step's work and
duration, and ``servekit sim profile --step-log`` fits a step-time model to it."""

from __future__ import annotations

import gzip
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from servekit.metrics import HookSet, StepLogHook
from servekit.metrics.logs import STEP_LOG_FIELDS
from servekit.sched.output import StepShape
from servekit.server.cli import main
from servekit.sim import ProfiledModel, SimConfigError
from servekit.sim.profile import profile_step_log, read_step_log

DEMO = str(files("servekit") / "demo_model")


def _engine(hooks: HookSet, max_num_seqs: int, max_num_batched_tokens: int) -> Any:
    pytest.importorskip("torch")
    from servekit.engine import EngineConfig, LLMEngine

    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return LLMEngine(DEMO, config=config, hooks=hooks)


def test_every_engine_step_is_logged_with_the_work_it_did(tmp_path: Path) -> None:
    from servekit.sched.params import SamplingParams

    log = tmp_path / "steps.jsonl"
    hook = StepLogHook(log)
    engine = _engine(HookSet([hook]), max_num_seqs=4, max_num_batched_tokens=32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 700, n).tolist() for n in (5, 40, 70)]  # 70 > budget: chunked
    outputs = 6
    engine.generate(prompts, SamplingParams(max_tokens=outputs, ignore_eos=True))
    hook.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == engine.times.steps
    assert all(set(line) == set(STEP_LOG_FIELDS) for line in lines)
    assert all(line["duration"] > 0 for line in lines)
    shapes, seconds = read_step_log(log)
    # each prompt token is prefilled once; the first output of each request comes from its
    # last prefill chunk, every later one from a decode row
    assert sum(s.prefill_tokens for s in shapes) == sum(map(len, prompts))
    assert sum(s.decodes for s in shapes) == len(prompts) * (outputs - 1)
    assert max(s.tokens for s in shapes) <= 32
    for shape in shapes:  # every step reads at least the KV of the tokens it computes
        assert shape.kv_tokens >= shape.tokens and shape.attention_pairs >= shape.tokens
    assert len(seconds) == len(shapes)
    # what the front end did around the steps: every request arrived once, every output token
    # was emitted by exactly one step
    assert sum(line["arrivals"] for line in lines) == len(prompts)
    assert lines[0]["arrivals"] == len(prompts)
    assert sum(line["output_tokens"] for line in lines) == len(prompts) * outputs


def test_a_profile_fitted_from_a_step_log_predicts_the_logged_steps(tmp_path: Path) -> None:
    truth = ProfiledModel([2e-3, 4e-5, 3e-4, 1e-6, 2e-9])
    rng = np.random.default_rng(1)
    log = tmp_path / "steps.jsonl"
    with log.open("w") as file:
        for i in range(200):
            decodes = int(rng.integers(0, 16))
            prefill = int(rng.integers(0, 256)) if i % 3 else 0
            ctx = int(rng.integers(1, 200))
            shape = StepShape(prefill, decodes, decodes * ctx + prefill,
                              float(decodes * ctx + prefill * (prefill + 1) / 2))
            duration = truth.step_time(shape) if shape.tokens else 0.0
            file.write(json.dumps({"batch_size": 1, "scheduled_tokens": shape.tokens,
                                   "num_running": 1, "num_waiting": 0, "duration": duration,
                                   "time": float(i), "prefill_tokens": prefill,
                                   "num_decodes": decodes, "kv_tokens": shape.kv_tokens,
                                   "attention_pairs": shape.attention_pairs}) + "\n")
    fitted = profile_step_log(log, meta={"num_blocks": 99})
    shapes, _ = read_step_log(log)
    for shape in shapes:
        assert fitted.step_time(shape) == pytest.approx(truth.step_time(shape), rel=1e-6)
    assert fitted.meta["source"] == "step_log" and fitted.meta["num_blocks"] == 99
    assert fitted.meta["r2"] > 0.999999 and fitted.meta["steps"] == len(shapes)
    # kept gzip-compressed (as bench_sim.py --validate keeps them), the same log reads the same
    packed = tmp_path / "steps.jsonl.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    assert read_step_log(packed) == read_step_log(log)
    assert profile_step_log(packed).coefficients == fitted.coefficients


def test_a_bad_or_missing_step_log_is_an_error_naming_the_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SimConfigError, match=r"--step-log.*cannot read"):
        read_step_log(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefill_tokens": 1}\n')
    with pytest.raises(SimConfigError, match=r"bad\.jsonl:1 is not a step record"):
        read_step_log(bad)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"prefill_tokens": 1}\n')
    with pytest.raises(SimConfigError, match=r"--step-log.*cannot read.*plain\.jsonl\.gz"):
        read_step_log(not_gzip)
    assert main(["sim", "profile", "--step-log", str(bad), "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "--step-log" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_a_server_started_with_the_step_log_hook_is_profiled_as_it_serves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.server.cli_server import cli_server

    log = tmp_path / "steps.jsonl"
    spec = "step_log:" + json.dumps({"path": str(log)})
    with (cli_server("--hook", spec, "--max-num-seqs", "8") as server,
          httpx.Client(base_url=server.url, timeout=60) as client):
        for i in range(8):
            body = {"model": "servekit-demo", "prompt": f"ROMEO {i}:", "max_tokens": 8,
                    "ignore_eos": True, "temperature": 0.0}
            resp = client.post("/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
    shapes, _ = read_step_log(log)
    assert sum(s.decodes for s in shapes) == 8 * 7
    out = tmp_path / "profile.json"
    assert main(["sim", "profile", "--step-log", str(log), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = ProfiledModel.load(out)
    # fitted on busy cycles: every step but the first of each request (sent one at a time,
    # each found the engine idle), with the front end's cost
    assert profile.meta["fitted_on"] == "cycles" and profile.meta["steps"] == len(shapes) - 8
    assert profile.frontend is not None
