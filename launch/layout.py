"""Check that a run config's parallel layout fits its model and its nodes, before anything is queued.

A layout mistake (TP that does not divide the heads, a node count that leaves a partial
data-parallel group) otherwise surfaces minutes into a job, after the queue wait. The checks here
are the divisibility rules megatron-core and vLLM enforce at start-up, plus a memory estimate whose
arithmetic is spelled out in docs/cluster.md.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from model_shapes import ModelShape, shape_for

from nemo_igrpo.config.schema import IGRPOConfig

GIB = 1024**3
# megatron-core pads the vocabulary to a multiple of this times TP (make_vocab_size_divisible_by).
VOCAB_PAD_MULTIPLE = 128
# CUDA context, NCCL buffers, allocator fragmentation: a flat allowance per GPU.
RUNTIME_OVERHEAD_GIB = 6.0
# fp32 vocabulary-sized tensors alive at once while one chunk of scored tokens is turned into
# log-probs and entropy (policy/actor.py): the fp32 copy of the chunk's logits, the softmax the
# vocab-parallel cross entropy keeps for backward (computed in place in that copy, but the
# entropy's own fp32 copy sits beside it), the entropy's exp(z) and exp(z) * z, and the fp32
# gradient of the chunk in the backward pass. Four is the peak of those that overlap.
LOGPROB_FP32_TEMPORARIES = 4
# A colocated vLLM engine asleep still holds memory its sleep cannot release (vLLM 0.32,
# device_allocator/sleep_mode_backend.py + v1/worker/gpu_worker.py): its CUDA context and the
# PyTorch-cached blocks outside the cuMem pool (the sampler's preallocated logits buffers),
# plus NCCL communicators (enable_nccl_comm_suspend is off). docs/cluster.md explains the values.
VLLM_SLEEP_RESIDUAL_GIB = 2.0
# CUDA graph pools stay on the GPU during sleep unless sleep_mode_offload_cudagraph is set, which
# this project does not set (vllm/config/vllm.py: use_cumem_cudagraph_pool); only without
# enforce_eager are there graphs.
VLLM_CUDA_GRAPH_GIB = 2.0
LOOPBACK_HOSTS = ("localhost", "::1", "ip6-localhost")


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
    sequence_parallel: bool = False  # what the actor will do (TE spec and TP > 1)
    # GiB a colocated vLLM engine holds on each training GPU during the update (its whole
    # gpu_memory_utilization share, or only the sleep residual); None without a colocated engine.
    colocated_vllm_gib: Optional[float] = None


@dataclass
class TrainMemory:
    """The memory estimate per training GPU, term by term (GiB); docs/cluster.md spells each out."""

    weights: float  # bf16 parameters of this rank's TP x PP shard
    grads: float  # fp32 main-grad buffer (grad_reduce_in_fp32)
    optimizer: float  # fp32 master weights + Adam m, v, sharded over DP
    fp8_weights: float  # TE's cached FP8 weights and transposes
    layer_inputs: float  # what full recompute keeps per layer (all of the activations otherwise)
    layer_working_set: float  # one layer's activations while it is recomputed
    logits: float  # the output layer's logits and their gradient, whole micro-batch
    logprob_temporaries: float  # fp32 vocabulary-sized temporaries of one log-prob chunk
    runtime: float  # CUDA context, NCCL, fragmentation

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def resident(self) -> float:
        """What the trainer keeps between updates (while a colocated vLLM generates)."""
        return self.weights + self.grads + self.optimizer + self.fp8_weights + self.runtime


def padded_vocab_size(vocab: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return math.ceil(vocab / multiple) * multiple


def uses_sequence_parallel(cfg: IGRPOConfig) -> bool:
    """The actor's rule: sequence parallelism exactly when the TransformerEngine spec is used and
    TP > 1. GPU plans assume TE for `auto` (the container ships it); `local` turns it off."""
    return cfg.policy.tensor_parallel_size > 1 and cfg.policy.model.transformer_impl != "local"


def train_memory_terms(
    shape: ModelShape,
    tp: int,
    pp: int,
    dp: int,
    tokens_per_microbatch: int,
    recompute: Optional[str],
    fp8: bool,
    *,
    sequence_parallel: bool,
    logprob_chunk_tokens: int,
) -> TrainMemory:
    """Peak bytes per training GPU, term by term (an estimate, see docs/cluster.md).

    Mixed precision as the paper configs run it (bf16 weights and logits, fp32 grads and
    optimizer). Activations follow Korthikanti et al. (2022): of a layer's ~34 s h bytes of
    activations (plus 12 s f for the wider SwiGLU MLP), the 10 s h of layer-norm inputs, dropout
    masks and the inputs of the QKV / FC1 projections are split over TP only with sequence
    parallelism; without it every TP rank holds them whole. The same holds for the [s, h] layer
    input full recompute keeps per layer.
    """
    params = shape.params_b * 1e9 / (tp * pp)
    s, h, f = tokens_per_microbatch, shape.hidden_size, shape.ffn_hidden_size
    layers = shape.num_layers / pp
    seq_split = tp if sequence_parallel else 1
    if shape.hybrid_pattern:
        # A hybrid model's layers differ a lot (a Mamba-2 layer keeps ~2x a dense MLP's bytes):
        # each kind has its own working set (hybrid_layer_working_sets), layers spread evenly over PP.
        sets = hybrid_layer_working_sets(shape, s, tp, seq_split)
        counts = shape.layer_counts()
        if recompute == "full":  # the largest layer is the one being recomputed at the peak
            layer_inputs, working = layers * 2 * s * h / seq_split, max(sets[k] for k in counts)
        else:
            layer_inputs, working = sum(n * sets[k] for k, n in counts.items()) / pp, 0.0
    else:
        layer_working_set = s * (10 * h / seq_split + (24 * h + 12 * f) / tp)
        if recompute == "full":
            layer_inputs, working = layers * 2 * s * h / seq_split, layer_working_set
        else:  # selective (attention recomputed) or none: every layer's working set is kept
            layer_inputs, working = layers * layer_working_set, 0.0
    vocab_shard = padded_vocab_size(shape.vocab_size, tp) / tp
    # The output layer's [s, V/TP] bf16 logits and, in backward, their bf16 gradient (index_select
    # scatters the scored rows' gradient into a whole-micro-batch zero tensor).
    logits = 2 * 2 * s * vocab_shard
    # Log-probs and entropy run over chunks of scored tokens; 0 means one piece (the micro-batch).
    chunk = s if logprob_chunk_tokens <= 0 else min(logprob_chunk_tokens, s)
    temporaries = LOGPROB_FP32_TEMPORARIES * 4 * chunk * vocab_shard
    return TrainMemory(
        weights=params * 2 / GIB,
        grads=params * 4 / GIB,
        optimizer=params * 12 / dp / GIB,
        fp8_weights=params * (2 if fp8 else 0) / GIB,
        layer_inputs=layer_inputs / GIB,
        layer_working_set=working / GIB,
        logits=logits / GIB,
        logprob_temporaries=temporaries / GIB,
        runtime=RUNTIME_OVERHEAD_GIB,
    )


def hybrid_layer_working_sets(shape: ModelShape, s: int, tp: int, seq_split: int) -> dict[str, float]:
    """Activation bytes one layer of each kind keeps for its backward pass, at s tokens (bf16
    activations, fp32 where the Mamba kernels keep fp32; docs/cluster.md, hybrid models).

    Every layer is one sub-layer (norm + mixer + residual): its norm input, norm output and the
    residual bookkeeping, 5 s h, split over TP only with sequence parallelism. The rest is split
    over TP (heads, groups, FFN columns):
    - attention: Q, K, V (q + 2 kv channels) and the attention output, 2 bytes each; flash
      attention keeps no s x s scores.
    - MLP (squared ReLU, not gated): FC1 output, its ReLU and square, 3 x 2 s f.
    - Mamba-2 (mamba-ssm's fused training kernel): the in_proj output z|x|B|C|dt (2 s P,
      P = 2 d + 2 G N + H), the conv output x|B|C (2 s (d + 2 G N)), the scan output, its gated form
      and the norm output (3 x 2 s d); fp32 dt and its cumulative sum (8 s H), the chunk states
      (4 s H p N / chunk) and the per-chunk C.B^T scores (4 s G chunk).
    """
    h = shape.hidden_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_query_groups * shape.head_dim
    H, p, G, N = shape.mamba_num_heads or 0, shape.mamba_head_dim, shape.mamba_num_groups or 0, shape.mamba_state_dim
    d, chunk = H * p, shape.mamba_chunk_size
    per_token = {
        "*": 2 * (2 * q + 2 * kv),
        "-": 3 * 2 * shape.ffn_hidden_size,
        "M": 2 * (2 * d + 2 * G * N + H)
        + 2 * (d + 2 * G * N)
        + 3 * 2 * d
        + 8 * H
        + 4 * H * p * N / chunk
        + 4 * G * chunk,
    }
    return {k: s * (5 * h / seq_split + v / tp) for k, v in per_token.items()}


def estimate_train_memory_gib(
    shape: ModelShape,
    tp: int,
    pp: int,
    dp: int,
    tokens_per_microbatch: int,
    recompute: Optional[str],
    fp8: bool,
    *,
    sequence_parallel: bool,
    logprob_chunk_tokens: int,
) -> float:
    """Estimated peak GiB per training GPU: the sum of train_memory_terms (docs/cluster.md).

    `sequence_parallel` and `logprob_chunk_tokens` are required so no caller can silently assume
    what the actor does not do (uses_sequence_parallel gives the actor's rule).
    """
    return train_memory_terms(
        shape,
        tp,
        pp,
        dp,
        tokens_per_microbatch,
        recompute,
        fp8,
        sequence_parallel=sequence_parallel,
        logprob_chunk_tokens=logprob_chunk_tokens,
    ).total


def vllm_sleep_residual_gib(enforce_eager: bool) -> float:
    """GiB a sleeping colocated vLLM engine keeps per GPU (weights and KV cache are released at
    sleep level 1 (offloaded to host) and 2 (discarded) alike)."""
    return VLLM_SLEEP_RESIDUAL_GIB + (0.0 if enforce_eager else VLLM_CUDA_GRAPH_GIB)


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host.lower() in LOOPBACK_HOSTS


def kv_cache_tokens(shape: ModelShape, vllm_tp: int, gpu_memory_gib: float, utilization: float) -> int:
    """Tokens of KV cache one vLLM engine (vllm_tp GPUs) holds after loading bf16 weights."""
    weights_per_gpu = shape.params_b * 1e9 * 2 / vllm_tp
    # 2 GiB per GPU for activations and CUDA graphs.
    budget = vllm_tp * (gpu_memory_gib * GIB * utilization - weights_per_gpu - 2 * GIB)
    attention_layers = shape.layer_counts().get("*", 0) if shape.hybrid_pattern else shape.num_layers
    bytes_per_token = 2 * attention_layers * shape.num_query_groups * shape.head_dim * 2  # K and V, bf16
    return max(0, int(budget // bytes_per_token))


def check_layout(
    cfg: IGRPOConfig, source: str = "config", gpu_memory_gib: float = 80.0, *, fills_nccl_master_address: bool = False
) -> Layout:
    """Raise LayoutError naming the key when the layout cannot work; return the derived layout.

    `fills_nccl_master_address`: the launcher passes the trainer node's address at run time
    (generation.server.nccl_master_address), so the config's value does not have to reach it.
    """

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
        fail(
            "generation.backend",
            f"cluster.generation_nodes={c.generation_nodes} needs a server backend (vllm_server), got '{g.backend}'",
        )
    if c.generation_nodes == 0 and g.backend in ("vllm_server", "trtllm_server") and c.nodes > 1:
        fail(
            "cluster.generation_nodes",
            f"generation.backend={g.backend} on a {c.nodes}-node job: reserve "
            "generation nodes (cluster.generation_nodes) or point generation.server.url at a running server",
        )
    train_nodes = c.nodes - c.generation_nodes
    train_gpus = train_nodes * c.gpus_per_node
    if tp > c.gpus_per_node:
        fail(
            "policy.tensor_parallel_size",
            f"TP={tp} spans nodes (gpus_per_node={c.gpus_per_node}); keep TP inside NVLink",
        )
    if train_gpus % (tp * pp):
        fail("cluster.nodes", f"{train_gpus} training GPUs are not a multiple of TP x PP = {tp} x {pp}")
    dp = train_gpus // (tp * pp)

    shape = shape_for(p.model.hf_path)
    padded = memory = kv_tokens = colocated_gib = None
    sequence_parallel = uses_sequence_parallel(cfg)
    if shape is not None:
        if shape.num_attention_heads % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide {shape.num_attention_heads} attention heads")
        if shape.num_query_groups % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide {shape.num_query_groups} key/value heads")
        if shape.ffn_hidden_size % tp:
            fail("policy.tensor_parallel_size", f"TP={tp} does not divide the FFN size {shape.ffn_hidden_size}")
        if shape.mamba_num_heads and (shape.mamba_num_heads % tp or shape.mamba_num_groups % tp):
            fail(
                "policy.tensor_parallel_size",
                f"TP={tp} does not divide the Mamba heads/groups ({shape.mamba_num_heads}/{shape.mamba_num_groups})",
            )
        if shape.num_layers % pp:
            fail("policy.pipeline_parallel_size", f"PP={pp} does not divide {shape.num_layers} layers")
        padded = padded_vocab_size(shape.vocab_size, tp)
        if padded % tp or padded < shape.vocab_size:
            fail("policy.tensor_parallel_size", f"padded vocabulary {padded} does not split over TP={tp}")
        if p.logprob_chunk_tokens < 0:
            fail("policy.logprob_chunk_tokens", f"{p.logprob_chunk_tokens}: must be >= 0 (0: the whole micro-batch)")
        terms = train_memory_terms(
            shape,
            tp,
            pp,
            dp,
            p.max_tokens_per_microbatch,
            p.activation_recompute,
            p.fp8 is not None,
            sequence_parallel=sequence_parallel,
            logprob_chunk_tokens=p.logprob_chunk_tokens,
        )
        memory = terms.total
        if memory > gpu_memory_gib:
            fail(
                "policy.max_tokens_per_microbatch",
                f"estimated {memory:.1f} GiB per GPU exceeds {gpu_memory_gib:.0f} GiB "
                f"(TP={tp}, PP={pp}, DP={dp}, {p.max_tokens_per_microbatch} tokens per micro-batch, "
                f"sequence parallel {'on' if sequence_parallel else 'off'})",
            )
        if c.generation_nodes == 0 and g.backend == "vllm":
            colocated_gib = _check_colocated_vllm(cfg, terms, gpu_memory_gib, fail)

    # Every data-parallel rank must get the same number of trained sequences per step.
    a = cfg.algorithm
    trained = cfg.data.prompts_per_step * a.num_refinements
    if trained % (dp * a.minibatches_per_step):
        fail(
            "data.prompts_per_step",
            f"{cfg.data.prompts_per_step} prompts x {a.num_refinements} refinements = "
            f"{trained} trained sequences do not split over DP={dp} x {a.minibatches_per_step} mini-batches",
        )

    replicas = 0
    if c.generation_nodes:
        vtp = g.vllm.tensor_parallel_size
        if c.gpus_per_node % vtp:
            fail("generation.vllm.tensor_parallel_size", f"{vtp} does not divide gpus_per_node={c.gpus_per_node}")
        if shape is not None and (shape.num_attention_heads % vtp or shape.num_query_groups % vtp):
            fail(
                "generation.vllm.tensor_parallel_size",
                f"{vtp} does not divide the model's heads ({shape.num_attention_heads}/{shape.num_query_groups})",
            )
        replicas = c.generation_nodes * c.gpus_per_node // vtp
        if shape is not None:
            kv_tokens = kv_cache_tokens(shape, vtp, gpu_memory_gib, g.vllm.gpu_memory_utilization)
            if g.vllm.max_model_len and kv_tokens < g.vllm.max_model_len:
                fail(
                    "generation.vllm.gpu_memory_utilization",
                    f"a vLLM engine holds {kv_tokens} KV tokens, "
                    f"less than one sequence of max_model_len={g.vllm.max_model_len}",
                )
    if g.vllm.max_model_len and p.max_tokens_per_microbatch < g.vllm.max_model_len:
        fail(
            "policy.max_tokens_per_microbatch",
            f"{p.max_tokens_per_microbatch} tokens cannot hold one sequence of "
            f"generation.vllm.max_model_len={g.vllm.max_model_len}",
        )
    if shape is not None and g.vllm.max_model_len and g.vllm.max_model_len > shape.max_position_embeddings:
        fail(
            "generation.vllm.max_model_len",
            f"{g.vllm.max_model_len} exceeds the model's context ({shape.max_position_embeddings})",
        )
    _check_nccl_weight_sync(cfg, fills_nccl_master_address, fail)
    return Layout(
        train_nodes,
        train_gpus,
        tp,
        pp,
        dp,
        padded,
        memory,
        replicas,
        kv_tokens,
        sequence_parallel=sequence_parallel,
        colocated_vllm_gib=colocated_gib,
    )


def _check_colocated_vllm(cfg: IGRPOConfig, terms: TrainMemory, gpu_memory_gib: float, fail) -> float:
    """vLLM colocated with the trainer takes gpu_memory_utilization x the GPU on every GPU it
    shares (vLLM 0.32: request_memory = total x utilization, checked free at start-up).

    Without sleep mode both stay resident: trainer peak + vLLM share must fit. With sleep mode
    the trainer puts vLLM to sleep for the update (only the sleep residual stays) and wakes it
    after, so two phases must fit: update = trainer peak + residual; generation = what the trainer
    keeps between updates (weights, grads, optimizer, runtime) + the whole vLLM share. Returns
    what vLLM holds during the update.
    """
    v = cfg.generation.vllm
    share = v.gpu_memory_utilization * gpu_memory_gib
    peak = terms.total
    if not v.enable_sleep_mode:
        if peak + share > gpu_memory_gib:
            fail(
                "generation.vllm.gpu_memory_utilization",
                f"vLLM colocated with the trainer holds {v.gpu_memory_utilization} x {gpu_memory_gib:.0f} = {share:.1f} GiB "
                f"on every training GPU; with the trainer's estimated {peak:.1f} GiB that is {peak + share:.1f} GiB > "
                f"{gpu_memory_gib:.0f} GiB. Lower it, or set generation.vllm.enable_sleep_mode=true so vLLM releases its "
                "weights and KV cache during the update",
            )
        return share
    residual = vllm_sleep_residual_gib(v.enforce_eager)
    if peak + residual > gpu_memory_gib:
        fail(
            "policy.max_tokens_per_microbatch",
            f"the update needs an estimated {peak:.1f} GiB per GPU plus {residual:.1f} GiB a sleeping colocated vLLM "
            f"keeps (CUDA context, cached buffers{', CUDA graphs' if not v.enforce_eager else ''}): "
            f"{peak + residual:.1f} GiB > {gpu_memory_gib:.0f} GiB",
        )
    if terms.resident + share > gpu_memory_gib:
        fail(
            "generation.vllm.gpu_memory_utilization",
            f"while vLLM generates, the trainer keeps {terms.resident:.1f} GiB per GPU (weights, gradients, optimizer, "
            f"runtime) and vLLM takes {v.gpu_memory_utilization} x {gpu_memory_gib:.0f} = {share:.1f} GiB: "
            f"{terms.resident + share:.1f} GiB > {gpu_memory_gib:.0f} GiB",
        )
    return residual


def _check_nccl_weight_sync(cfg: IGRPOConfig, launcher_fills: bool, fail) -> None:
    """NCCL weight sync: the trainer's rank 0 binds the rendezvous (vLLM's StatelessProcessGroup,
    rank 0 is the TCPStore server) at generation.server.nccl_master_address and the server's
    workers connect to it. A loopback address only works when the server runs on the same host."""
    g, c = cfg.generation, cfg.cluster
    if g.backend != "vllm_server" or g.server.weight_sync != "nccl" or launcher_fills:
        return
    if not is_loopback(g.server.nccl_master_address):
        return
    server_host = urlsplit(g.server.url).hostname or ""
    if c.generation_nodes or not is_loopback(server_host):
        where = "a generation node" if c.generation_nodes else f"the server at {g.server.url}"
        fail(
            "generation.server.nccl_master_address",
            f"{g.server.nccl_master_address} is this host's loopback address, which {where} cannot reach for "
            "generation.server.weight_sync=nccl; set it to an address of the first training node (the launchers "
            "fill it from Slurm when they start the generation node)",
        )


def check_model_supported(cfg: IGRPOConfig, source: str = "config") -> Optional[str]:
    """Refuse, before the queue wait, a model the actor would refuse at start-up.

    The rule is the actor's own (nemo_igrpo.policy.model.read_architecture, which reads a
    checkpoint directory's config.json), not a copy of its lists. The login node that plans a job
    often cannot read the checkpoint; then the architecture comes from launch/model_shapes.py and
    is put in a stand-in config.json for the same function. Returns the architecture, or None when
    neither source knows the model (the actor decides at start-up).
    """
    from nemo_igrpo.policy.model import UnsupportedModelError, read_architecture

    hf_path = cfg.policy.model.hf_path
    if not hf_path:
        return None  # policy.model.tiny: built from scratch as a Llama / Qwen2, always supported
    key = "policy.model.hf_path"
    if (Path(hf_path) / "config.json").is_file():
        try:
            return read_architecture(hf_path)
        except ValueError as e:  # UnsupportedModelError or invalid JSON
            raise LayoutError(f"{source}: '{key}': {e}") from None
        except OSError:
            pass  # present but unreadable from here (permissions, a stale mount): use the table
    shape = shape_for(hf_path)
    if shape is None:
        return None
    with tempfile.TemporaryDirectory(prefix="igrpo-arch-") as tmp:
        stand_in = Path(tmp) / "config.json"
        stand_in.write_text(json.dumps({"architectures": [shape.architecture]}))
        try:
            return read_architecture(tmp)
        except (UnsupportedModelError, ValueError) as e:
            # Name the model and where its architecture came from instead of the temporary file.
            reason = str(e).replace(f"{stand_in}: ", "")
            raise LayoutError(
                f"{source}: '{key}': {hf_path} ({shape.architecture}, from launch/model_shapes.py): {reason}"
            ) from None
