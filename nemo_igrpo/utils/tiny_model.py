"""Make small Hugging Face model directories locally (no hub): a character-level tokenizer
with a ChatML chat template, and a randomly initialised Llama or Qwen2 model.

Tests, benchmarks and the demo use these, so every component (megatron-bridge import/export,
vLLM, the chat-template-aware draft template) is exercised on a real checkpoint directory.
A character vocabulary keeps the embedding tiny and makes arithmetic tasks learnable by a
model of a few million parameters.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Optional

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_vocabulary() -> list[str]:
    # Printable ASCII without the vertical tab / form feed, plus newline.
    chars = [c for c in string.printable if c not in "\x0b\x0c\r\t"]
    return SPECIAL_TOKENS + chars


def make_char_tokenizer(out_dir: str | Path, model_max_length: int = 2048):
    """Save and return a `PreTrainedTokenizerFast` with one token per character."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(char_vocabulary())}
    # A BPE model without merges splits any text into single characters; Fuse joins them back.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_hf_model(
    out_dir: str | Path,
    arch: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    vocab_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer: Optional[str | Path] = None,
) -> Path:
    """Write a randomly initialised HF model (safetensors) plus the char tokenizer.

    head_dim = hidden_size / num_attention_heads; 64 is what vLLM's CPU attention supports.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        tok.save_pretrained(out_dir)
    else:
        tok = make_char_tokenizer(out_dir, model_max_length=max_position_embeddings)
    if len(tok) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        dtype=dtype,
    )
    if arch == "llama":
        config = LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    else:
        raise ValueError(f"unknown arch {arch!r}: use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "nemo_igrpo_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir
