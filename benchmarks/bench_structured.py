"""Constrained decoding cost: engine output tokens/s with a JSON schema on every request vs none.

The model has a 32k-token vocabulary (mask cost grows with it): a byte-level BPE trained with
``tokenizers`` on tinyshakespeare, and a small Llama with random weights. Each round runs the
same 64 concurrent requests twice: constrained (``guided`` JSON schema), then unconstrained with
each request's ``max_tokens`` set to the constrained run's output length and ``ignore_eos``, so
both runs emit the same tokens per request. Also: the per-step cost of filling and applying the
bitmask for 64 rows with xgrammar and with llguidance (replaying the constrained outputs token by
token), and compile time per schema, cold and cached, for both.

    .venv/bin/python benchmarks/bench_structured.py --quick --json benchmarks/results/structured.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import bar, parse_args, print_bars, print_table, summary, write_json
from servekit.engine.config import EngineConfig
from servekit.engine.engine import LLMEngine
from servekit.engine.sampler import apply_token_bitmask
from servekit.sched.params import GuidedDecoding, SamplingParams
from servekit.structured import GrammarCompiler, grammar_backend

_ROOT = Path(__file__).resolve().parents[1]
# the corpus lives beside the checkout (../shared/data); a git worktree sits one level deeper
CORPUS = next((p for p in (_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                           _ROOT.parent.parent / "shared" / "data" / "tinyshakespeare.txt")
               if p.exists()), _ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
SCHEMA = {
    "type": "object",
    "properties": {
        "speaker": {"type": "string", "maxLength": 12},
        "act": {"type": "integer", "minimum": 1, "maximum": 5},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 16},
                  "minItems": 3, "maxItems": 3},
        "mood": {"enum": ["merry", "grave", "wrathful"]},
    },
    "required": ["speaker", "act", "lines", "mood"],
    "additionalProperties": False,
}


def build_model(path: Path, corpus: Path, vocab_size: int) -> None:
    """Train the tokenizer on ``corpus`` and save it with a random small Llama to ``path``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    # the corpus yields ~21.5k merges; the model's logits are padded to ``vocab_size`` (as real
    # models pad theirs), so the mask and the sampler work on the full width
    config = tf.LlamaConfig(vocab_size=max(vocab_size, len(fast)), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, eos_token_id=0, bos_token_id=0,
                            pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    fast.save_pretrained(path)


def mask_fill_seconds(backend: Any, compiled: Any, outputs: list[list[int]],
                      vocab_size: int) -> float:
    """Mean seconds of one batch fill, replaying ``outputs`` token by token: step ``k`` fills
    the rows of the outputs longer than ``k``, then advances them by their ``k``-th token."""
    matchers = [compiled.new_matcher() for _ in outputs]
    words = (vocab_size + 31) // 32
    total, steps = 0.0, 0
    for k in range(max(map(len, outputs))):
        live = [i for i, out in enumerate(outputs) if k < len(out)]
        bitmask = torch.empty(len(live), words, dtype=torch.int32)
        t0 = time.perf_counter()
        backend.fill_bitmask([matchers[i] for i in live], bitmask)
        total += time.perf_counter() - t0
        steps += 1
        for i in live:
            matchers[i].accept_token(outputs[i][k])
    return total / steps


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
        ) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - t0, results


def main() -> None:
    args = parse_args(__doc__ or "")
    rounds = args.rounds or (2 if args.quick else 4)
    n = 64
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        build_model(path, CORPUS, 32_000)
        print(f"tokenizer + model built in {time.perf_counter() - t0:.1f} s")
        engine = LLMEngine(path, config=EngineConfig(num_blocks=2048, max_num_seqs=n,
                                                     max_num_batched_tokens=4096,
                                                     guided_fallback_after=None))
        print(f"tokenizer vocab {len(engine.tokenizer)}, model vocab {engine.vocab_size}, "
              f"{n} concurrent requests")
        lines = CORPUS.read_text().splitlines()
        prompts = [engine.encode(" ".join(lines[i * 7: i * 7 + 4]) or "ROMEO:")[:48]
                   for i in range(n)]
        guided = GuidedDecoding.json_schema(SCHEMA)

        # compile time, cold then cached
        compiler = GrammarCompiler(engine.grammars.backend)
        t0 = time.perf_counter()
        compiler.compile(guided)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiler.compile(guided)
        cached = time.perf_counter() - t0
        compiler.close()
        engine.grammars.compile(guided)  # the engine's own cache is warm for the timed runs

        rows: list[dict[str, Any]] = []
        ratios = []
        con_tps, unc_tps = [], []
        run(engine, prompts[:8], [SamplingParams(max_tokens=16)] * 8)  # warm-up
        for r in range(rounds):
            gp = [SamplingParams(max_tokens=200, temperature=1.0, seed=r * n + i, guided=guided)
                  for i in range(n)]
            lengths = [len(x.token_ids) for x in run(engine, prompts, gp)[1]]
            up = [SamplingParams(max_tokens=k, temperature=1.0, seed=r * n + i, ignore_eos=True)
                  for i, k in enumerate(lengths)]
            # alternate the order so neither run always goes first (caches, machine noise)
            if r % 2:
                t_unc, res_u = run(engine, prompts, up)
                t_con, res = run(engine, prompts, gp)
            else:
                t_con, res = run(engine, prompts, gp)
                t_unc, res_u = run(engine, prompts, up)
            assert [len(x.token_ids) for x in res] == lengths  # seeded: the same outputs
            assert [len(x.token_ids) for x in res_u] == lengths
            tokens = sum(lengths)
            con_tps.append(tokens / t_con)
            unc_tps.append(tokens / t_unc)
            ratios.append(t_unc / t_con)
            stops = sum(x.finish_reason == "stop" for x in res)
            print(f"round {r}: {tokens} tokens, {stops}/{n} stop, constrained {tokens / t_con:.0f} "
                  f"tok/s, unconstrained {tokens / t_unc:.0f} tok/s")

        # per-step mask cost for 64 rows along the constrained outputs of the last round:
        # fill (each backend's batch fill) + apply (sampler)
        outputs = [x.token_ids for x in res]
        llg = grammar_backend("llguidance", engine.tokenizer, engine.vocab_size,
                              engine.scheduler.eos_token_ids)
        fills: dict[str, float] = {}
        compiles: dict[str, tuple[float, float]] = {"xgrammar": (cold, cached)}
        for name, backend in (("xgrammar", engine.grammars.backend), ("llguidance", llg)):
            if name == "llguidance":
                c = GrammarCompiler(backend)
                t0 = time.perf_counter()
                c.compile(guided)
                llg_cold = time.perf_counter() - t0
                t0 = time.perf_counter()
                compiled = c.compile(guided)
                compiles[name] = (llg_cold, time.perf_counter() - t0)
                c.close()
            else:
                compiled = engine.grammars.compile(guided)
            fills[name] = mask_fill_seconds(backend, compiled, outputs, engine.vocab_size)
            print(f"{name}: mask fill {fills[name] * 1e3:.2f} ms per step of {n} rows")
        words = (engine.vocab_size + 31) // 32
        bitmask = torch.empty(n, words, dtype=torch.int32)
        logits = torch.randn(n, engine.vocab_size)
        reps = 20 if args.quick else 100
        t0 = time.perf_counter()
        for _ in range(reps):
            apply_token_bitmask(logits, bitmask, list(range(n)))
        apply = (time.perf_counter() - t0) / reps

    ratio = summary(ratios)
    rows.append({"case": "unconstrained tok/s", **summary(unc_tps)})
    rows.append({"case": "json schema tok/s", **summary(con_tps)})
    rows.append({"case": "ratio constrained/unconstrained", **ratio})
    def one(case: str, seconds: float) -> dict[str, Any]:
        return {"case": case, "median": seconds * 1e3, "min": seconds * 1e3, "max": seconds * 1e3}

    for name, seconds in fills.items():
        rows.append(one(f"{name} mask fill, 64 rows (ms/step)", seconds))
    rows.append(one("mask apply, 64 rows (ms/step)", apply))
    for name, (cold_s, cached_s) in compiles.items():
        rows.append(one(f"{name} compile cold (ms)", cold_s))
        rows.append(one(f"{name} compile cached (ms)", cached_s))
    print_table(rows, ["case", "median", "min", "max"],
                "structured outputs (throughput with xgrammar; 32k vocab)")
    bars = {"structured outputs: constrained/unconstrained tok/s at 64 concurrent":
            bar(statistics.median(ratios), 0.8)}
    print_bars(bars)
    write_json(args.json, "structured", rows, bars)


if __name__ == "__main__":
    main()
