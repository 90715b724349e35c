"""Tiny seeded models and a byte-level BPE tokenizer with multi-byte pieces, saved to disk once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

# one thread: the test machine is small and shared; threads only contend there
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "héllo wörld, ça va? naïve café — 日本語のテキスト, 中文字符, emoji 🙂🚀 ",
    "ROMEO: But soft, what light through yonder window breaks? ",
]


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE (so multi-byte characters split across tokens), with eos and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(family: str, vocab_size: int, seed: int = 0) -> Any:
    """A tiny randomly initialised causal LM of ``family`` with seeded weights."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        initializer_range=0.2,
    )
    if family == "llama":
        config = tf.LlamaConfig(**common)
    elif family == "qwen3":
        config = tf.Qwen3Config(head_dim=16, **common)
    elif family == "qwen2":
        config = tf.Qwen2Config(**common)
    elif family == "mistral":  # a small sliding window, so the tests cross it
        config = tf.MistralConfig(sliding_window=8, head_dim=16, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save(family: str, tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp(family)
    build_model(family, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save("llama", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save("qwen3", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save("mistral", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save("qwen2", tmp_path_factory, tokenizer)
