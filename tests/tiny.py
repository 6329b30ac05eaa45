"""Tiny, randomly initialised models and a byte-level ChatML tokenizer, built in code (no download).

Importable from any test (pytest's ``pythonpath`` includes tests/): ``from tiny import tiny_llama``.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|pad|>"]


def tiny_llama(vocab_size: int = 64, seed: int = 0, tie: bool = False,
               hidden_size: int = 32) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (no merges), plus ChatML's special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   chat_template=CHATML)


def end_turn_after(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                   token_ids: list[int]) -> LlamaForCausalLM:
    """Make ``model`` end its turn (``<|im_end|>``) right after writing any of ``token_ids``, and never
    otherwise: dimension 0 of the embeddings marks those tokens (+1, the rest -1) and only the end-of-turn
    row of the head reads it, strongly. Rows of a batch then end at different steps. In place; returns it."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = -1.0
        model.model.embed_tokens.weight[token_ids, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[end, 0] = 30.0
    return model
