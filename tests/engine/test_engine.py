"""LLMEngine on real transformers models: greedy == transformers generate, whatever the batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.engine import EngineConfig, LLMEngine
from servekit.engine.chat import ChatTemplateError, render_chat
from servekit.sched.errors import QueueFullError
from servekit.sched.params import InvalidParameterError, SamplingParams

# forced length exactly as generate's min_new_tokens forces it: eos is masked until the end
GREEDY = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen2", "mistral"])
def family(request: pytest.FixtureRequest) -> Any:
    path = request.getfixturevalue(f"{request.param}_dir")
    return request.param, path


@pytest.fixture(scope="module")
def reference(family: tuple[str, Path], tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    shared = random_prompts(len(tokenizer), [40], seed=9)[0]
    prompts = random_prompts(len(tokenizer), [3, 17, 33, 9, 25, 50], seed=1)
    prompts += [shared + p for p in random_prompts(len(tokenizer), [5, 11, 2], seed=2)]
    return prompts, hf_greedy(family[1], prompts, GREEDY.max_tokens)


@pytest.mark.parametrize("config", [
    EngineConfig(num_blocks=128, block_size=4),
    EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=8, max_num_seqs=4),
    EngineConfig(num_blocks=22, block_size=4, max_num_batched_tokens=32, max_num_seqs=8),
], ids=["plain", "chunked-prefill", "preemption"])
@pytest.mark.slow
def test_greedy_matches_transformers_generate(
    family: tuple[str, Path], reference: tuple[list[list[int]], list[list[int]]],
    config: EngineConfig,
) -> None:
    prompts, expected = reference
    engine = LLMEngine(family[1], config=config)
    results = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert engine.kv.usage == 0 and engine.kv.num_free_blocks == config.num_blocks
    if config.num_blocks == 22:
        assert engine.scheduler.num_preemptions > 0
    # the same prompts again: every full prompt block is a prefix-cache hit
    hits_before = engine.kv.prefix_hits
    again = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in again] == expected
    assert engine.kv.prefix_hits > hits_before and sum(r.num_cached_tokens for r in again) > 0


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> LLMEngine:
    return LLMEngine(llama_dir, config=EngineConfig(num_blocks=256, block_size=4))


def test_seeded_sampling_is_reproducible_across_batches(engine: LLMEngine, tokenizer: Any) -> None:
    prompts = random_prompts(len(tokenizer), [7, 12], seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].token_ids
    noisy = SamplingParams(temperature=1.3, max_tokens=14, ignore_eos=True)
    mixed = engine.generate([prompts[1], prompts[0], prompts[1]], [noisy, seeded, noisy])
    assert mixed[1].token_ids == alone
    other = engine.generate([prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10,
                                                          seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_stop_strings_cut_the_text_and_stop(engine: LLMEngine) -> None:
    free = engine.generate(["ROMEO: "], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert len(free.text) > 8 and stop
    cut = engine.generate(["ROMEO: "], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text and len(cut.token_ids) < 24


def test_stop_token_ids_and_min_tokens(engine: LLMEngine) -> None:
    free = engine.generate(["abc"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    third = free.token_ids[2]
    first_at = free.token_ids.index(third)
    stopped = engine.generate(["abc"], SamplingParams(temperature=0, max_tokens=10,
                                                      stop_token_ids=[third]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first_at + 1]
    late = engine.generate(["abc"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                   stop_token_ids=[third], min_tokens=8))[0]
    assert third not in late.token_ids[:8]


def test_logprobs_are_reported_per_token(engine: LLMEngine) -> None:
    res = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    assert res.logprobs is not None and len(res.logprobs) == len(res.token_ids)
    for lp, tok in zip(res.logprobs, res.token_ids, strict=False):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)


def test_nan_logits_fail_only_that_request(llama_dir: Path, tokenizer: Any) -> None:
    good = random_prompts(len(tokenizer), [6, 9], seed=4)
    expected = hf_greedy(llama_dir, good, 5)
    used = {t for seq in good + expected for t in seq}
    poison = next(t for t in range(1, len(tokenizer)) if t not in used)
    engine = LLMEngine(llama_dir, config=EngineConfig(num_blocks=64, block_size=4))
    embed = engine.runner.model.get_input_embeddings()

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.masked_fill((args[0] == poison)[..., None], float("nan"))

    embed.register_forward_hook(hook)
    params = SamplingParams(temperature=0, max_tokens=5, min_tokens=5)
    res = engine.generate([good[0], [1, 2, poison, 3], good[1]], params)
    assert res[1].finish_reason == "error" and res[1].error and "NaN" in res[1].error
    assert [res[0].token_ids, res[2].token_ids] == expected
    assert engine.kv.usage == 0


def test_abort_frees_blocks_and_reports_abort(engine: LLMEngine) -> None:
    rid = engine.add_request("some prompt text", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.usage > 0
    out = engine.abort(rid)
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.abort(rid) is None and engine.kv.usage == 0


@pytest.mark.parametrize(("prompt", "params", "field"), [
    ([1, 2, 10**6], SamplingParams(), "prompt"),
    ([1] * 600, SamplingParams(), "prompt_token_ids"),
    ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ([], SamplingParams(), "prompt_token_ids"),
])
def test_bad_requests_name_the_field(engine: LLMEngine, prompt: list[int],
                                     params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        engine.add_request(prompt, params)
    assert info.value.param == field


def test_bounded_queue_raises_queue_full(llama_dir: Path) -> None:
    config = EngineConfig(num_blocks=32, max_waiting_requests=1, max_num_seqs=1)
    engine = LLMEngine(llama_dir, config=config)
    engine.add_request([1, 2, 3])  # an empty queue always accepts; it takes the free slot
    engine.add_request([1, 2, 3])  # waits, at the bound
    with pytest.raises(QueueFullError):
        engine.add_request([1, 2, 3])


def test_kv_cache_is_sized_from_a_byte_budget(llama_dir: Path) -> None:
    # 2 layers * 2 (K, V) * 16 tokens * 2 heads * 16 dims * 4 bytes = 8 KiB per block; one of
    # the 101 that fit is the null block
    engine = LLMEngine(llama_dir, config=EngineConfig(kv_cache_bytes=101 * 8192 + 5, block_size=16))
    assert engine.runner.num_blocks == 100 == engine.kv.num_blocks


def test_no_dense_mask_is_built(engine: LLMEngine) -> None:
    from transformers.masking_utils import create_causal_mask

    config = engine.runner.model.config
    embeds = torch.zeros(1, 5, config.hidden_size)
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                              cache=None, position_ids=torch.arange(5)[None]) is None


def test_chat_template_renders_messages(tokenizer: Any) -> None:
    ids = render_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert tokenizer.decode(ids) == "<|user|>hi\n<|assistant|>"
    with pytest.raises(ChatTemplateError, match="messages"):
        render_chat(tokenizer, [])


def test_a_loaded_model_object_is_accepted(tokenizer: Any, llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=32))
    assert model.config._attn_implementation == "servekit_paged"
    expected = hf_greedy(llama_dir, [[5, 6, 7]], 4)
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    assert engine.generate([[5, 6, 7]], params)[0].token_ids == expected[0]
