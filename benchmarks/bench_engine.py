"""Engine throughput on CPU: servekit vs transformers' generate, static batches and generate_batch.

Workload (issue 5): a tiny Llama (hidden 256, intermediate 688, 4 layers, 8 query / 4 KV heads,
vocab 4096, fp32, seeded weights) saved and reloaded from disk; 64 requests with prompts of
U[16, 256] random tokens and outputs of U[16, 128] tokens forced (eos ignored); greedy.

(a) ``generate`` one request at a time; (b) ``generate`` in static batches of 8, left padded
(each batch runs to its longest output; only the requested tokens count); (c) transformers'
continuous batching (the manager ``generate_batch`` drives, fed per-request ``max_new_tokens``);
(d) servekit's LLMEngine. Outputs are forced the way ``min_new_tokens`` forces them (eos masked
until the length is reached; servekit: ``min_tokens = max_tokens``). Output tokens/s for each, ratios, token-identity of (d) with (a),
and where (d)'s step time goes: the scheduler + KV manager share (schedule() and update(), the
manager's calls included) must stay under 2 % of a step.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bar,
    parse_args,
    print_bars,
    print_table,
    summary,
    write_json,
)
from servekit.engine import EngineConfig, LLMEngine, StepTimes
from servekit.sched.params import SamplingParams

VOCAB = 4096


def build_model_dir(root: Path) -> Path:
    """The tiny seeded Llama of the issue, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = root / "tiny-llama"
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def build_tokenizer() -> Any:
    """A byte-level BPE of exactly VOCAB tokens, so (d) pays for real streaming detokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text() if corpus.exists() else "".join(
        chr(random.Random(i).randrange(32, 0x3000)) for i in range(200_000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i : i + 4096] for i in range(0, len(text), 4096)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    outputs = [rng.randint(16, 128) for _ in range(n)]
    return prompts, outputs


def run_one_at_a_time(model: Any, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p, n in zip(prompts, lengths, strict=False):
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def run_static_batches(model: Any, prompts: list[list[int]], lengths: list[int],
                       size: int = 8) -> list[list[int]]:
    out: list[list[int]] = []
    with torch.inference_mode():
        for i in range(0, len(prompts), size):
            ps, ns = prompts[i : i + size], lengths[i : i + size]
            width = max(len(p) for p in ps)
            ids = torch.zeros(len(ps), width, dtype=torch.long)
            mask = torch.zeros(len(ps), width, dtype=torch.long)
            for j, p in enumerate(ps):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=max(ns),
                                 min_new_tokens=max(ns), do_sample=False, pad_token_id=0)
            out.extend(gen[j, width : width + n].tolist() for j, n in enumerate(ns))
    return out


def run_generate_batch(model: Any, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(lengths), eos_token_id=-1,
                              pad_token_id=0)
    # sized like servekit's run (its default sizing reads GPU memory and over-allocates on CPU)
    cb = ContinuousBatchingConfig(num_blocks=2 * len(prompts) + 8, max_batch_tokens=4096,
                                  max_requests_per_batch=64)
    results: dict[str, list[int]] = {}
    with model.continuous_batching_context_manager(
            generation_config=config, continuous_batching_config=cb, block=True,
            timeout=5) as manager:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
               for i, (p, n) in enumerate(zip(prompts, lengths, strict=False))]
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished():
                results[res.request_id] = list(res.generated_tokens)
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop died")
    return [results[f"r{i}"] for i in range(len(prompts))]


def run_servekit(engine: LLMEngine, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    # forced length as generate's min_new_tokens does it: eos is masked until n tokens exist
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for n in lengths]
    return [r.token_ids for r in engine.generate(prompts, params)]


def main() -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads for every contestant (1: the machine is shared)")
        p.add_argument("--requests", type=int, default=None)

    args = parse_args(__doc__ or "", extra)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    n = args.requests or 64  # the bars hold for this workload; --quick runs one round
    rounds = args.rounds or (1 if args.quick else 3)
    prompts, lengths = workload(n)
    total_out = sum(lengths)
    print(f"{n} requests, {sum(map(len, prompts))} prompt tokens, {total_out} output tokens, "
          f"{rounds} round(s), {torch.get_num_threads()} torch thread(s)")

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model_dir(Path(tmp))
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        hf_cb = AutoModelForCausalLM.from_pretrained(path).eval()
        engine = LLMEngine(path, config=EngineConfig(
            block_size=16, num_blocks=2048, max_num_seqs=64, max_num_batched_tokens=4096))

        outputs: dict[str, list[list[int]]] = {}

        contestants = {
            "(a) generate, one at a time": lambda p, n: run_one_at_a_time(hf, p, n),
            "(b) generate, static batches of 8": lambda p, n: run_static_batches(hf, p, n),
            "(c) transformers generate_batch (CB)": lambda p, n: run_generate_batch(hf_cb, p, n),
            "(d) servekit LLMEngine": lambda p, n: run_servekit(engine, p, n),
        }
        for fn in contestants.values():
            fn(prompts[:4], [4] * 4)  # warm-up (not timed): allocations, lazy imports
        engine.times = StepTimes()
        wall: dict[str, list[float]] = {name: [] for name in contestants}
        cpu: dict[str, list[float]] = {name: [] for name in contestants}
        for _ in range(rounds):  # rounds interleave the systems, so load changes hit all alike
            for name, fn in contestants.items():
                c0, w0 = time.process_time(), time.perf_counter()
                outputs[name] = fn(prompts, lengths)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        rows = []
        for name in contestants:
            s = summary(wall[name])
            rows.append({"system": name, "tok/s": total_out / s["median"],
                         "tok/s min": total_out / s["max"], "tok/s max": total_out / s["min"],
                         "seconds": s["median"],
                         "tok/cpu-s": total_out / summary(cpu[name])["median"]})
        times = engine.times

    ref = outputs["(a) generate, one at a time"]
    mine = outputs["(d) servekit LLMEngine"]
    same = sum(a == b for a, b in zip(ref, mine, strict=False))
    best_peer = max(r["tok/s"] for r in rows[:3])
    best_peer_cpu = max(r["tok/cpu-s"] for r in rows[:3])
    for r in rows:
        r["vs best peer"] = r["tok/s"] / best_peer
        r["vs best (cpu)"] = r["tok/cpu-s"] / best_peer_cpu
    print_table(rows, ["system", "tok/s", "tok/s min", "tok/s max", "seconds", "vs best peer",
                       "tok/cpu-s", "vs best (cpu)"],
                title="output tokens/s (median of rounds, min-max)")
    print(f"\n(d) outputs identical to (a): {same}/{n} requests"
          + ("" if same == n else f"; first mismatch at request {next(i for i in range(n) if ref[i] != mine[i])}"))
    for name in ("(b) generate, static batches of 8", "(c) transformers generate_batch (CB)"):
        print(f"(b)/(c) identical to (a): {name[:3]} {sum(a == b for a, b in zip(ref, outputs[name], strict=False))}/{n}")

    steps = max(times.steps, 1)
    glue = times.prepare + times.output
    total = times.schedule + times.prepare + times.forward + times.sample + times.output
    split = [
        {"phase": "forward", "ms/step": 1e3 * times.forward / steps, "share": times.forward / total},
        {"phase": "scheduler + KV manager", "ms/step": 1e3 * times.schedule / steps,
         "share": times.schedule / total},
        {"phase": "sampler", "ms/step": 1e3 * times.sample / steps, "share": times.sample / total},
        {"phase": "glue (pack + outputs)", "ms/step": 1e3 * glue / steps, "share": glue / total},
        {"phase": "total", "ms/step": 1e3 * total / steps, "share": 1.0},
    ]
    print_table(split, ["phase", "ms/step", "share"],
                title=f"(d) time per step ({steps // rounds} steps per run)")

    ratio = rows[3]["tok/s"] / best_peer
    bars = {
        "engine_vs_best_peer": bar(ratio, 2.0),
        "engine_vs_static_batches": bar(rows[3]["tok/s"] / rows[1]["tok/s"], 3.0),
        "engine_vs_generate_batch": bar(rows[3]["tok/s"] / rows[2]["tok/s"], 1.5),
        "engine_greedy_identical": bar(float(same == n), 1.0),
        "engine_vs_best_peer_cpu_time": bar(float(rows[3]["vs best (cpu)"]), 2.0),
        # schedule() + update(), KV manager calls included: under 2 % of the step
        "scheduler_kv_share_of_engine_step": bar(times.schedule / total, 0.02,
                                                  higher_is_better=False),
    }
    print_bars(bars)
    write_json(args.json, "engine", rows, bars, step_split=split, requests=n,
               output_tokens=total_out, threads=torch.get_num_threads(), identical=same)


if __name__ == "__main__":
    main()
