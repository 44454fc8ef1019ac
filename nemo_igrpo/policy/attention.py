"""Core attention for megatron-core's local (TransformerEngine-free) layer spec, on torch SDPA.

megatron-core's local spec uses `DotProductAttention`, which materialises the full
[batch, heads, s, s] score matrix (and, without an explicit mask, builds one with
device="cuda"). That does not fit RL sequence lengths (on an H100 it OOMs where SDPA runs at
~320 TFLOP/s). `SDPACoreAttention` is a drop-in replacement for the `core_attention` submodule:
same constructor and forward signature, but the product is computed by
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
a fused kernel on CPU), with:

- causal masking through ``is_causal`` (no mask tensor),
- grouped-query attention through ``enable_gqa`` (no repeated K/V copies),
- padding: an explicit megatron-style boolean mask (True = masked out) is combined with causality,
- packed sequences (THD, `PackedSeqParams.qkv_format == "thd"`): each sequence of the pack is
  attended separately, so packed neighbours never see each other and no padding is needed.

`layer_spec(config, impl)` picks the TransformerEngine spec when TE imports (or when asked for),
else the local spec with this attention. The unfused default is never returned.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Inputs are megatron's: query [sq, b, heads/tp, d], key/value [sk, b, groups/tp, d]
    (or [t, heads/tp, d] for THD packing). Output [sq, b, heads/tp * d] ([t, ...] for THD)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the TransformerEngine spec")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                "sliding-window attention is not supported by SDPACoreAttention; use the TransformerEngine spec"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        head_dim = config.kv_channels
        # megatron's query_key_layer_scaling divides the scale by the layer number and multiplies
        # it back inside the fp32 softmax, so the net scale is the plain one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, allowed: Optional[Tensor]) -> Tensor:
        """q [b, hq, sq, d], k/v [b, hk, sk, d]; allowed: bool [b or 1, 1 or hq, sq, sk] or None."""
        dropout_p = self.dropout_p if self.training else 0.0
        if allowed is not None:
            if causal:
                sq, sk = q.shape[-2], k.shape[-2]
                # Bottom-right aligned like megatron's causal mask when sq != sk (decoding).
                allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            # A query row with nothing to attend to (a padding position) would give NaN, and NaN
            # times a zero gradient is still NaN in the weight gradients: let such rows attend
            # everywhere and zero their output instead.
            has_any = allowed.any(dim=-1, keepdim=True)
            allowed = allowed | ~has_any
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout_p,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            return out * has_any.to(out.dtype)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=causal and q.shape[-2] > 1,
            dropout_p=dropout_p,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        # Dropout inside TP regions must draw from the TP-specific RNG stream (as megatron does).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if (self.dropout_p > 0 and self.training) else _null()
        with rng:
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._forward_thd(query, key, value, causal, packed_seq_params)
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            allowed = None
            if attention_mask is not None:
                # megatron masks are True where attention is NOT allowed.
                allowed = ~attention_mask.to(torch.bool)
            out = self._sdpa(q, k, v, causal, allowed)
            # [b, h, sq, d] -> [sq, b, h*d]
            out = out.permute(2, 0, 1, 3)
            return out.reshape(out.shape[0], out.shape[1], -1)

    def _forward_thd(self, query: Tensor, key: Tensor, value: Tensor, causal: bool, params: PackedSeqParams) -> Tensor:
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        # The actor attaches the boundaries as Python lists (`host_bounds`), which saves a
        # device->host sync per layer on GPU; fall back to reading the tensors.
        host = getattr(params, "host_bounds", None)
        bounds_q = host if host is not None else cu_q.tolist()
        bounds_kv = host if host is not None else cu_kv.tolist()
        outs = []
        for i in range(len(bounds_q) - 1):
            # [t_i, h, d] -> [1, h, t_i, d]
            q = query[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1).unsqueeze(0)
            k = key[bounds_kv[i] : bounds_kv[i + 1]].transpose(0, 1).unsqueeze(0)
            v = value[bounds_kv[i] : bounds_kv[i + 1]].transpose(0, 1).unsqueeze(0)
            if q.shape[-2] == 0:
                continue
            outs.append(self._sdpa(q, k, v, causal, None).squeeze(0).transpose(0, 1))
        out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, query.shape[1], query.shape[2])
        # Positions after the last sequence (bucket padding) get zeros.
        if out.shape[0] < query.shape[0]:
            out = torch.cat([out, out.new_zeros(query.shape[0] - out.shape[0], *out.shape[1:])], dim=0)
        return out.reshape(out.shape[0], -1)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def resolve_transformer_impl(impl: str) -> str:
    """'auto' -> 'transformer_engine' when TE's torch extension imports, else 'local'."""
    from nemo_igrpo.policy.cpu_compat import transformer_engine_importable

    from typing import get_args

    from nemo_igrpo.policy.config import TransformerImpl

    if impl not in get_args(TransformerImpl):
        raise ValueError(
            f"policy.model.transformer_impl: {impl!r} is not one of {', '.join(get_args(TransformerImpl))}"
        )
    if impl == "auto":
        return "transformer_engine" if transformer_engine_importable() else "local"
    if impl == "transformer_engine" and not transformer_engine_importable():
        raise RuntimeError(
            "policy.model.transformer_impl=transformer_engine but transformer_engine.pytorch does not import; "
            "install TransformerEngine or use transformer_impl=local"
        )
    return impl


def layer_spec(config: TransformerConfig, impl: str):
    """The TransformerLayer spec for a dense GPT decoder (Llama / Qwen2 style)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    impl = resolve_transformer_impl(impl)
    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=bool(getattr(config, "qk_layernorm", False)))
    spec = get_gpt_layer_local_spec(
        qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
        normalization=getattr(config, "normalization", None),
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
