"""Architecture facts of the paper's models, for checking a parallel layout before a job is queued.

Values come from each checkpoint's config.json on the Hugging Face hub (and, for Nemotron-H,
megatron-bridge's model notes); they are not read at run time because the login node that renders a
Slurm script usually has no copy of the weights. The key is the checkpoint's folder name, i.e. the
last component of `policy.model.hf_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class ModelShape:
    # The checkpoint's config.json `architectures[0]`. The launcher asks the actor's own rule
    # (nemo_igrpo.policy.model.read_architecture) whether it can train this model when the
    # checkpoint itself is not readable from the login node; keyword-only so no shape can omit it.
    architecture: str = field(kw_only=True)
    params_b: float  # total parameters, billions (embeddings included)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    vocab_size: int
    max_position_embeddings: int
    # Mamba-2 mixer (hybrid models only): tensor parallelism splits heads and groups.
    mamba_num_heads: Optional[int] = None
    mamba_num_groups: Optional[int] = None
    tie_word_embeddings: bool = False
    # Hybrid models: one symbol per layer (M Mamba-2, * attention, - MLP), as in the checkpoint's
    # hybrid_override_pattern, and the Mamba-2 sizes the activation memory depends on.
    hybrid_pattern: Optional[str] = None
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_chunk_size: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_counts(self) -> dict[str, int]:
        """Layers per kind: {"M": Mamba, "*": attention, "-": MLP}; a dense model is all "T"
        (a transformer layer: attention + MLP)."""
        if not self.hybrid_pattern:
            return {"T": self.num_layers}
        return {sym: self.hybrid_pattern.count(sym) for sym in sorted(set(self.hybrid_pattern))}


# Qwen2.5-7B family (Qwen2.5-Math-7B / Qwen2.5-7B-Instruct are the bases of the 7B models below).
_QWEN25_7B = ModelShape(7.62, 28, 3584, 18944, 28, 4, 152064, 131072, architecture="Qwen2ForCausalLM")
# Qwen2.5-14B family: 40 query heads, 8 key/value heads.
_QWEN25_14B = ModelShape(14.77, 48, 5120, 13824, 40, 8, 152064, 131072, architecture="Qwen2ForCausalLM")

MODEL_SHAPES: dict[str, ModelShape] = {
    "DeepSeek-R1-Distill-Qwen-7B": _QWEN25_7B,
    "DeepSeek-R1-Distill-Qwen-14B": _QWEN25_14B,
    # Qwen2.5-Math-7B ships a 4K context; OpenMath-Nemotron extends it (its evaluations generate ~30K
    # tokens). 32768 is the bound we rely on, not necessarily the checkpoint's own value.
    "OpenMath-Nemotron-7B": replace(_QWEN25_7B, max_position_embeddings=32768),
    "OpenMath-Nemotron-14B": replace(_QWEN25_14B, max_position_embeddings=32768),
    "OpenReasoning-Nemotron-7B": _QWEN25_7B,
    # 52 layers (24 Mamba-2, 4 attention, 24 MLP), 8K context; pattern and Mamba sizes as in
    # megatron-bridge's NemotronH 8B recipe (recipes/nemotronh/h100/nemotronh.py).
    "Nemotron-H-8B-Base-8K": ModelShape(
        8.10,
        52,
        4096,
        21504,
        32,
        8,
        131072,
        8192,
        mamba_num_heads=128,
        mamba_num_groups=8,
        hybrid_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        mamba_head_dim=64,
        mamba_state_dim=128,
        mamba_chunk_size=128,
        architecture="NemotronHForCausalLM",
    ),
}


def shape_for(hf_path: Optional[str]) -> Optional[ModelShape]:
    if not hf_path:
        return None
    return MODEL_SHAPES.get(hf_path.rstrip("/").rsplit("/", 1)[-1])
