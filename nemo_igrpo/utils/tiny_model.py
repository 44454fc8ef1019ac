"""Make small Hugging Face model directories locally (no hub): a character-level tokenizer
with a ChatML chat template, and a randomly initialised Llama, Qwen2 or Nemotron-H model.

Tests, benchmarks and the demo use these, so every component (megatron-bridge import/export,
vLLM, the chat-template-aware draft template) is exercised on a real checkpoint directory.
A character vocabulary keeps the embedding tiny and makes arithmetic tasks learnable by a
model of a few million parameters.
"""

from __future__ import annotations

import json
import math
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
    **hybrid,
) -> Path:
    """Write a randomly initialised HF model (safetensors) plus the char tokenizer.

    head_dim = hidden_size / num_attention_heads; 64 is what vLLM's CPU attention supports.
    arch="nemotron_h": a hybrid Mamba-2 model; `hybrid` takes make_nemotron_h_config's keywords.
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
    elif arch == "nemotron_h":
        config = make_nemotron_h_config(common, num_layers, **hybrid)
    else:
        raise ValueError(f"unknown arch {arch!r}: use 'llama', 'qwen2' or 'nemotron_h'")
    if hybrid and arch != "nemotron_h":
        raise TypeError(f"unexpected arguments for arch {arch!r}: {sorted(hybrid)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if arch == "nemotron_h":
        _randomise_nemotron_h(model, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "nemo_igrpo_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir


def make_nemotron_h_config(
    common: dict,
    num_layers: int,
    *,
    pattern: Optional[str] = None,
    head_dim: int = 64,
    mamba_head_dim: int = 16,
    mamba_num_heads: Optional[int] = None,
    n_groups: int = 2,
    ssm_state_size: int = 16,
    chunk_size: int = 16,
    conv_kernel: int = 4,
):
    """A NemotronHConfig from the common keywords. pattern: one symbol per layer (M Mamba-2,
    * attention, - MLP); default the first `num_layers` symbols of "M*M-" repeated. Attention
    heads have `head_dim` channels whatever the hidden size (64: vLLM's CPU attention). The small
    chunk size makes short test sequences span several scan chunks, so the inter-chunk state
    passing is exercised (Nemotron-H-8B uses 128)."""
    from transformers import NemotronHConfig

    pattern = pattern or ("M*M-" * num_layers)[:num_layers]
    hidden = common["hidden_size"]
    kw = {k: v for k, v in common.items() if k not in ("num_hidden_layers", "rms_norm_eps", "rope_theta")}
    return NemotronHConfig(
        **kw,
        hybrid_override_pattern=pattern,
        head_dim=head_dim,
        mamba_head_dim=mamba_head_dim,
        mamba_num_heads=mamba_num_heads or 2 * hidden // mamba_head_dim,
        n_groups=n_groups,
        ssm_state_size=ssm_state_size,
        chunk_size=chunk_size,
        conv_kernel=conv_kernel,
        mlp_hidden_act="relu2",
        layer_norm_epsilon=1e-5,
        residual_in_fp32=False,
        use_bias=False,
        use_conv_bias=True,
    )


def _randomise_nemotron_h(model, seed: int) -> None:
    """Make every parameter informative for conversion and parity tests: norms, D and the conv
    bias start as constants (ones / zeros), which would hide a swapped or dropped mapping. dt_bias
    is drawn so that softplus(dt_bias) lies in [0.01, 0.1]: random inputs then keep the step size
    dt well above transformers' clamp at time_step_min (1e-3), which megatron and vLLM do not
    apply (they clamp at 0), so both paths compute the same function."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty(p.shape).uniform_(math.log(0.01), math.log(0.1), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
