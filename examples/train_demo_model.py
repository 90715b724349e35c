"""Train servekit's demo model: a tiny Llama on Tiny Shakespeare, in a few CPU minutes.

    python examples/train_demo_model.py                # writes src/servekit/demo_model/
    python examples/train_demo_model.py --steps 50 --out /tmp/m   # a quick smoke run

The corpus is split into speeches ("NAME:\\n" + lines, separated by blank lines). Each speech
becomes ``<|bos|> speech <|eos|>``, so the model learns to begin at a speaker's name and to stop
at the end of a speech; the chat template renders each message as one speech. The tokenizer is a
byte-level BPE trained here with ``tokenizers``; the model is ``LlamaForCausalLM`` from a small
``LlamaConfig`` with seeded weights. Everything is saved with ``save_pretrained`` (safetensors),
so ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it back.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = ROOT / "src" / "servekit" / "demo_model"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Each message is one speech: "<|bos|>SPEAKER:\ncontent\n<|eos|>"; the speaker is the message's
# "name" when given, else its role in capitals. The generation prompt opens the next speech.
# With tools, a SYSTEM speech lists them (Hermes style), assistant tool calls are rendered as
# <tool_call> blocks and tool results as <tool_response> blocks: the shipped template is kept.
CHAT_TEMPLATE = (DEFAULT_OUT / "chat_template.jinja").read_text()


def split_speeches(text: str) -> list[str]:
    """The corpus as a list of speeches, each ending with a newline."""
    return [s.strip("\n") + "\n" for s in text.split("\n\n") if s.strip()]


def train_tokenizer(speeches: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with bos/eos/pad, wrapped for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(speeches, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1 << 30,  # the caller sets the model's context after encoding
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_corpus(tokenizer: PreTrainedTokenizerFast, speeches: list[str]) -> torch.Tensor:
    """All speeches as one stream of ``<bos> speech <eos>`` token ids."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(speeches, add_special_tokens=True)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch of windows of ``seq_len + 1`` tokens."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, data: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token cross-entropy over consecutive validation windows."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    windows = torch.stack([data[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    losses = []
    for chunk in windows.split(16):
        losses.append(_loss(model, chunk).item() * len(chunk))
    model.train()
    return sum(losses) / n


def _loss(model: LlamaForCausalLM, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())


def sample(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str,
           max_new_tokens: int, temperature: float, seed: int) -> str:
    """Generate from ``prompt`` (greedy when temperature is 0)."""
    model.eval()
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 0.95}
    out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **kwargs)
    model.train()
    return str(tokenizer.decode(out[0], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=15.0,
                        help="stop early after this much training time; the learning-rate "
                             "schedule follows whichever of steps and time is further along")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.perf_counter()

    speeches = split_speeches(args.data.read_text(encoding="utf-8"))
    n_val = max(1, int(len(speeches) * args.val_fraction))
    train_speeches, val_speeches = speeches[:-n_val], speeches[-n_val:]
    tokenizer = train_tokenizer(train_speeches, args.vocab_size)
    train_ids = encode_corpus(tokenizer, train_speeches)
    val_ids = encode_corpus(tokenizer, val_speeches)
    tokenizer.model_max_length = args.seq_len
    print(f"{len(speeches)} speeches; {len(train_ids):,} train / {len(val_ids):,} val tokens; "
          f"vocab {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers, hidden {args.hidden}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    budget = None if args.max_minutes is None else args.max_minutes * 60
    train_start = time.perf_counter()

    def progress_at(step: int) -> float:
        done = (step - warmup) / max(1, args.steps - warmup)
        if budget is not None:
            done = max(done, (time.perf_counter() - train_start) / budget)
        return min(1.0, done)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_at(step))))

    gen = torch.Generator().manual_seed(args.seed)
    val_loss = float("nan")
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, {})
    steps_done = 0
    for step in bar:
        if step > warmup and progress_at(step) >= 1.0:
            break  # out of time
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = _loss(model, batches(train_ids, args.batch_size, args.seq_len, gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
        steps_done = step + 1
        if (step + 1) % args.eval_every == 0:
            val_loss = evaluate(model, val_ids, args.seq_len, max_windows=64)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
            best = keep_best(best, model, val_loss, step + 1)
    bar.close()
    val_loss = evaluate(model, val_ids, args.seq_len, max_windows=64)
    best = keep_best(best, model, val_loss, steps_done)
    # The corpus is small: past a point the model memorises it and validation loss rises, so
    # ship the checkpoint that generalised best.
    val_loss, best_step, best_state = best
    model.load_state_dict(best_state)

    greedy = sample(model, tokenizer, "ROMEO:", 80, 0.0, args.seed)
    sampled = sample(model, tokenizer, "ROMEO:", 80, 0.8, args.seed)
    minutes = (time.perf_counter() - started) / 60
    print(f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}) at step "
          f"{best_step} of {steps_done}, {minutes:.1f} min")
    print(f"--- greedy from 'ROMEO:' ---\n{greedy}\n--- temperature 0.8 ---\n{sampled}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    report = {"val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
              "steps": steps_done, "best_step": best_step, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "parameters": n_params, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
              "minutes": round(minutes, 1), "seed": args.seed,
              "sample_greedy": greedy, "sample_t0.8": sampled}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {args.out}")


def keep_best(best: tuple[float, int, dict[str, torch.Tensor]], model: torch.nn.Module,
              val_loss: float, step: int) -> tuple[float, int, dict[str, torch.Tensor]]:
    """(loss, step, weights) of the best validation loss so far, updated with this one."""
    if val_loss >= best[0]:
        return best
    return val_loss, step, {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
