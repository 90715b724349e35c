"""A real tokenizer with Mistral's and Llama 3's tool tags as special tokens, and a tiny Llama
whose next token is a fixed function of the current one, so it writes a tool call on cue.

The tokenizer is a byte-level BPE built with ``tokenizers`` (no hub download) with
``[TOOL_CALLS]`` and ``<|python_tag|>`` added as special tokens, as on the real Mistral and
Llama 3.1 tokenizers, and each scripted call body added as one ordinary token. The model's
embeddings are one-hot and its layers write nothing to the residual stream, so its logits are
``lm_head``'s column for the current token: ``[/INST]`` (the end of every prompt) is followed by
the family's tag, the tag by the call body, the body by end of sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

EOS = "<eos>"
END_OF_PROMPT = "[/INST]"
TOOL_CALLS = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
SPECIAL = ["[INST]", END_OF_PROMPT, TOOL_CALLS, PYTHON_TAG]

#: The call each family's model writes after its tag.
BODIES = {
    "mistral": '[{"name": "add", "arguments": {"a": 1, "b": 2}}]',
    "llama3": '{"name": "add", "parameters": {"a": 1, "b": 2}}',
}
TAGS = {"mistral": TOOL_CALLS, "llama3": PYTHON_TAG}

_MESSAGES = ("{%- for m in messages %}{%- if m['role'] == 'user' %}[INST]{{ m['content'] }}"
             "[/INST]{%- elif m['role'] == 'assistant' %}{{ m['content'] or '' }}{%- endif %}"
             "{%- endfor %}")
#: Chat templates that name each family's tag (what ``tool_parser_for`` recognises).
TEMPLATES = {
    "mistral": ("{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
                "{%- endif %}" + _MESSAGES + "{#- calls are written as [TOOL_CALLS][...] #}"),
    "llama3": ("{%- if tools %}Tools: {{ tools | tojson }}{%- endif %}" + _MESSAGES
               + "{#- calls are written as <|python_tag|>{...} #}"),
}


def build_tokenizer(family: str) -> Any:
    """The byte-level BPE with the tags as special tokens and ``family``'s chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["add two and three"], trainer)
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens([AddedToken(body, normalized=False) for body in BODIES.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.chat_template = TEMPLATES[family]
    return fast


def build_model_dir(path: Path, family: str) -> Path:
    """Save the tokenizer and the scripted model of ``family`` under ``path``."""
    import transformers as tf

    tok = build_tokenizer(family)
    vocab = len(tok)
    hidden = -(-vocab // 8) * 8  # one-hot embeddings: one dimension per token
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                            tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config)
    ids = tok.convert_tokens_to_ids
    script = {ids(END_OF_PROMPT): ids(TAGS[family]), ids(TAGS[family]): ids(BODIES[family])}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, hidden)
        head[tok.eos_token_id, :vocab] = 1.0  # any other token: end of sequence
        for current, following in script.items():
            head[:, current] = 0.0
            head[following, current] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
