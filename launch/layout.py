"""Check that a run config's parallel layout fits its model and its nodes, before anything is queued.

A layout mistake (TP that does not divide the heads, a node count that leaves a partial
data-parallel group) otherwise surfaces minutes into a job, after the queue wait. The checks here
are the divisibility rules megatron-core and vLLM enforce at start-up, plus a memory estimate whose
arithmetic is spelled out in docs/cluster.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from model_shapes import ModelShape, shape_for

from nemo_igrpo.config.schema import IGRPOConfig

GIB = 1024**3
# megatron-core pads the vocabulary to a multiple of this times TP (make_vocab_size_divisible_by).
VOCAB_PAD_MULTIPLE = 128
# CUDA context, NCCL buffers, allocator fragmentation: a flat allowance per GPU.
RUNTIME_OVERHEAD_GIB = 6.0


class LayoutError(ValueError):
    """A layout that cannot run; the message names the config file and key."""


@dataclass
class Layout:
    train_nodes: int
    train_gpus: int
    tp: int
    pp: int
    dp: int
    padded_vocab: Optional[int]
    train_memory_gib: Optional[float]  # estimated peak per training GPU
    generation_replicas: int  # vLLM engines on the generation nodes (0: colocated / none)
    kv_cache_tokens_per_replica: Optional[int]


def padded_vocab_size(vocab: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return math.ceil(vocab / multiple) * multiple


def estimate_train_memory_gib(shape: ModelShape, tp: int, pp: int, dp: int, tokens_per_microbatch: int,
                              recompute: Optional[str], fp8: bool) -> float:
    """Peak bytes per training GPU (an estimate, see docs/cluster.md for each term).

    bf16 weights (2 B/param) and fp32 gradient buffers (4 B/param) live on every rank of a TP x PP
    shard; fp32 master weights + Adam moments (12 B/param) are sharded over DP by the distributed
    optimizer. FP8 adds cached FP8 weight copies (~2 B/param incl. transposes). Activations:
    with full recompute only each layer's input is kept (2 B x s x h / TP with sequence parallel),
    plus one layer's working set during its recomputation; fp32 logits and their gradient
    (2 x 4 B x s x V / TP) are the largest single tensors at this vocabulary size.
    """
    params = shape.params_b * 1e9 / (tp * pp)
    static = params * (2 + 4 + (2 if fp8 else 0)) + params * 12 / dp
    s, h, f = tokens_per_microbatch, shape.hidden_size, shape.ffn_hidden_size
    layers = shape.num_layers / pp
    layer_working_set = s * (34 * h + 12 * f) / tp
    if recompute == "full":
        activations = layers * 2 * s * h / tp + layer_working_set
    else:  # selective (attention recomputed) or none: every layer's working set is kept
        activations = layers * layer_working_set
    logits = 2 * 4 * s * padded_vocab_size(shape.vocab_size, tp) / tp
    return (static + activations + logits) / GIB + RUNTIME_OVERHEAD_GIB


def kv_cache_tokens(shape: ModelShape, vllm_tp: int, gpu_memory_gib: float, utilization: float) -> int:
    """Tokens of KV cache one vLLM engine (vllm_tp GPUs) holds after loading bf16 weights."""
    weights_per_gpu = shape.params_b * 1e9 * 2 / vllm_tp
    # 2 GiB per GPU for activations and CUDA graphs.
    budget = vllm_tp * (gpu_memory_gib * GIB * utilization - weights_per_gpu - 2 * GIB)
    attention_layers = 4 if shape.mamba_num_heads else shape.num_layers  # Nemotron-H-8B: 4 of 52
    bytes_per_token = 2 * attention_layers * shape.num_query_groups * shape.head_dim * 2  # K and V, bf16
    return max(0, int(budget // bytes_per_token))


def check_layout(cfg: IGRPOConfig, source: str = "config", gpu_memory_gib: float = 80.0) -> Layout:
    """Raise LayoutError naming the key when the layout cannot work; return the derived layout."""

    def fail(key: str, msg: str) -> None:
        raise LayoutError(f"{source}: '{key}': {msg}")

    c, p, g = cfg.cluster, cfg.policy, cfg.generation
    tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    if c.nodes < 1:
        fail("cluster.nodes", "must be >= 1")
    if c.gpus_per_node < 1:
        fail("cluster.gpus_per_node", "a cluster job needs GPUs (set cluster.gpus_per_node, e.g. 8)")
    if not 0 <= c.generation_nodes < c.nodes:
        fail("cluster.generation_nodes", f"{c.generation_nodes} leaves no training node out of cluster.nodes={c.nodes}")
    if c.generation_nodes > 0 and g.backend not in ("vllm_server", "trtllm_server"):
        fail("generation.backend", f"cluster.generation_nodes={c.generation_nodes} needs a server backend "
             f"(vllm_server), got '{g.backend}'")
    if c.generation_nodes == 0 and g.backend in ("vllm_server", "trtllm_server") and c.nodes > 1:
        fail("cluster.generation_nodes", f"generation.backend={g.backend} on a {c.nodes}-node job: reserve "
             "generation nodes (cluster.generation_nodes) or point generation.server.url at a running server")
    train_nodes = c.nodes - c.generation_nodes
    train_gpus = train_nodes * c.gpus_per_node
    if tp > c.gpus_per_node:
        fail("policy.tensor_parallel_size", f"TP={tp} spans nodes (gpus_per_node={c.gpus_per_node}); keep TP inside NVLink")
    if train_gpus % (tp * pp):
        fail("cluster.nodes", f"{train_gpus} training GPUs are not a multiple of TP x PP = {tp} x {pp}")
    dp = train_gpus // (tp * pp)

    shape = shape_for(p.model.hf_path)
    padded = memory = kv_tokens = None
    if shape is not None:
        if shape.num_attention_heads % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide {shape.num_attention_heads} attention heads")
        if shape.num_query_groups % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide {shape.num_query_groups} key/value heads")
        if shape.ffn_hidden_size % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide the FFN size {shape.ffn_hidden_size}")
        if shape.mamba_num_heads and (shape.mamba_num_heads % tp or shape.mamba_num_groups % tp):
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide the Mamba heads/groups "
                 f"({shape.mamba_num_heads}/{shape.mamba_num_groups})")
        if shape.num_layers % pp:
            fail("policy.pipeline_parallel_size", f"PP={pp} does not divide {shape.num_layers} layers")
        padded = padded_vocab_size(shape.vocab_size, tp)
        if padded % tp or padded < shape.vocab_size:
            fail("policy.tensor_parallel_size", f"padded vocabulary {padded} does not split over TP={tp}")
        memory = estimate_train_memory_gib(shape, tp, pp, dp, p.max_tokens_per_microbatch,
                                           p.activation_recompute, p.fp8 is not None)
        if memory > gpu_memory_gib:
            fail("policy.max_tokens_per_microbatch", f"estimated {memory:.1f} GiB per GPU exceeds {gpu_memory_gib:.0f} GiB "
                 f"(TP={tp}, PP={pp}, DP={dp}, {p.max_tokens_per_microbatch} tokens per micro-batch)")

    # Every data-parallel rank must get the same number of trained sequences per step.
    a = cfg.algorithm
    trained = cfg.data.prompts_per_step * a.num_refinements
    if trained % (dp * a.minibatches_per_step):
        fail("data.prompts_per_step", f"{cfg.data.prompts_per_step} prompts x {a.num_refinements} refinements = "
             f"{trained} trained sequences do not split over DP={dp} x {a.minibatches_per_step} mini-batches")

    replicas = 0
    if c.generation_nodes:
        vtp = g.vllm.tensor_parallel_size
        if c.gpus_per_node % vtp:
            fail("generation.vllm.tensor_parallel_size", f"{vtp} does not divide gpus_per_node={c.gpus_per_node}")
        if shape is not None and (shape.num_attention_heads % vtp or shape.num_query_groups % vtp):
            fail("generation.vllm.tensor_parallel_size", f"{vtp} does not divide the model's heads "
                 f"({shape.num_attention_heads}/{shape.num_query_groups})")
        replicas = c.generation_nodes * c.gpus_per_node // vtp
        if shape is not None:
            kv_tokens = kv_cache_tokens(shape, vtp, gpu_memory_gib, g.vllm.gpu_memory_utilization)
            if g.vllm.max_model_len and kv_tokens < g.vllm.max_model_len:
                fail("generation.vllm.gpu_memory_utilization", f"a vLLM engine holds {kv_tokens} KV tokens, "
                     f"less than one sequence of max_model_len={g.vllm.max_model_len}")
    if g.vllm.max_model_len and p.max_tokens_per_microbatch < g.vllm.max_model_len:
        fail("policy.max_tokens_per_microbatch", f"{p.max_tokens_per_microbatch} tokens cannot hold one sequence of "
             f"generation.vllm.max_model_len={g.vllm.max_model_len}")
    if shape is not None and g.vllm.max_model_len and g.vllm.max_model_len > shape.max_position_embeddings:
        fail("generation.vllm.max_model_len", f"{g.vllm.max_model_len} exceeds the model's context "
             f"({shape.max_position_embeddings})")
    return Layout(train_nodes, train_gpus, tp, pp, dp, padded, memory, replicas, kv_tokens)
