"""gRPC on the real AsyncEngine with a tiny seeded Llama: outputs match, cancels free KV blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from servekit.client.grpc import GrpcClient  # noqa: E402
from servekit.engine import AsyncEngine, EngineConfig, LLMEngine  # noqa: E402
from servekit.sched.params import SamplingParams  # noqa: E402

from .conftest import Served, serve  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _save_tiny_llama(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["ROMEO: But soft, what light through yonder window breaks? "] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=0, bos_token_id=0,
                         pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, LLMEngine]]:
    path = tmp_path_factory.mktemp("tiny-llama")
    _save_tiny_llama(path)
    torch.set_num_threads(1)
    sync = LLMEngine(path, config=EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8,
                                               max_num_batched_tokens=128))
    with serve(AsyncEngine(sync)) as served:
        yield served, sync


def test_unary_and_stream_match_the_engine(real: tuple[Served, LLMEngine]) -> None:
    served, sync = real
    model = served.engine.model_name
    with GrpcClient(served.address) as client:
        whole = client.complete(model, "ROMEO:", max_tokens=8, temperature=0, ignore_eos=True)
        chunks = list(client.stream_complete(model, "ROMEO:", max_tokens=8, temperature=0,
                                             ignore_eos=True))
        chat = client.chat(model, [{"role": "user", "content": "hi"}], max_tokens=4)
    expected = sync.generate(["ROMEO:"], SamplingParams(max_tokens=8, temperature=0,
                                                        ignore_eos=True))[0]
    assert whole.text == "".join(c.text for c in chunks) == expected.text
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    assert chat.usage is not None and chat.usage.completion_tokens <= 4
    served.wait_idle()


def test_session_cancel_frees_kv_blocks(real: tuple[Served, LLMEngine]) -> None:
    served, _ = real
    model = served.engine.model_name
    seen: list[Any] = []
    with GrpcClient(served.address) as client, client.session() as session:
        long = session.complete(model, "ROMEO: But soft", max_tokens=200, ignore_eos=True)
        short = session.complete(model, "ROMEO:", max_tokens=6, ignore_eos=True)
        for chunk in long:
            seen.append(chunk)
            if len(seen) == 3:
                assert served.used_blocks() > 0
                long.cancel()
        done = short.result()
    reasons = [c.choices[0].finish_reason for c in seen if c.choices]
    assert reasons[-1] == "abort" and seen[-1].usage is not None
    assert seen[-1].usage.completion_tokens < 200
    assert done.usage is not None and done.usage.completion_tokens == 6
    served.wait_idle()  # zero used KV blocks, reservations and streams
