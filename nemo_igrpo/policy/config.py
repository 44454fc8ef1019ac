"""Configuration of the Megatron policy (model, parallelism, precision, optimizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# Enumerated settings (the loader rejects other values, naming the key; see generation/config.py).
Precision = Literal["fp32", "bf16"]
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
Recompute = Literal["selective", "full"]
TransformerImpl = Literal["auto", "transformer_engine", "local"]
TinyArch = Literal["llama", "qwen2", "nemotron_h"]


@dataclass
class TinyModelConfig:
    """Architecture of a small Llama-style model built from scratch (tests, benchmarks).

    Used only when `policy.model.hf_path` is unset.
    """

    arch: TinyArch = "llama"  # the HF architecture make_tiny_hf_model writes
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 128
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory (config.json, safetensors, tokenizer). Converted to
    # megatron-core through megatron-bridge. Unset means: build `tiny` from scratch.
    hf_path: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # "auto": TransformerEngine layer spec when TE imports, else the local spec with torch SDPA.
    transformer_impl: TransformerImpl = "auto"


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-6
    min_lr_ratio: float = 0.1  # paper: cosine decay to 0.1 x lr
    warmup_ratio: float = 0.1  # paper: 10% of steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0


@dataclass
class PolicyConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Data parallel size is derived: world_size / (tp * pp).
    precision: Precision = "fp32"
    fp8: Optional[FP8Recipe] = None  # needs TransformerEngine and FP8 tensor cores
    use_distributed_optimizer: bool = False
    activation_recompute: Optional[Recompute] = None
    # Padding-free micro-batches: sequences are packed up to this many tokens per micro-batch.
    max_tokens_per_microbatch: int = 4096
    # Log-probs and entropies are computed over this many scored tokens at a time, so the fp32
    # vocabulary-sized temporaries stay bounded (chunk x V/TP x 4 B each) whatever the pack size.
    # 0 computes them in one piece.
    logprob_chunk_tokens: int = 1024
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # How long any rank may wait in a collective (NCCL's watchdog, the gloo control group where
    # ranks 1..N wait while rank 0 generates and evaluates). torch's NCCL default is 10 minutes,
    # shorter than one evaluation of MATH-500 x 8 samples x 4k tokens.
    distributed_timeout_minutes: float = 180.0
