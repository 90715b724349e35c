"""Engines for the structured tests (the shipped demo model and a tiny seeded Llama) and a real
server on the demo model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.server.conftest import Running, serve

pytest.importorskip("xgrammar", reason="needs servekit[structured]")

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from servekit.server.cli import DEMO_MODEL

    return DEMO_MODEL


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.engine.conftest import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_model("llama", len(tok), seed=3)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_engine(path: Path, **config: Any) -> Any:
    from servekit.engine.config import EngineConfig
    from servekit.engine.engine import LLMEngine

    return LLMEngine(path, config=EngineConfig(**config))


MODEL = "servekit-demo"


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    """A real server on the demo model (one per test module)."""
    from servekit.engine import AsyncEngine, EngineConfig, LLMEngine
    from servekit.server import create_app
    from servekit.server.app import ServerConfig
    from servekit.server.cli import DEMO_MODEL

    engine = AsyncEngine(LLMEngine(str(DEMO_MODEL), config=EngineConfig(num_blocks=256)))
    app = create_app(engine, config=ServerConfig(model_names=(MODEL,)))
    with serve(app) as running:
        yield running
