"""MegatronActor: the policy (and optional frozen reference) on megatron-core, with TP/PP/DP.

One object per process; every rank makes the same calls with the same arguments (the trainer's
loop is SPMD). Inside, the actor shards samples over data-parallel ranks, packs each rank's
share into padding-free micro-batches (see packing.py), and runs them through megatron-core's
pipeline schedule (`get_forward_backward_func`: 1F1B with PP > 1, a plain loop otherwise).

Loss normalisation: the loss function returns each micro-batch's *share* of the global loss
(normalised by counts over the whole step, known on every rank because every rank holds the
full sample list). So gradients must be *summed* over micro-batches and DP ranks, never
averaged: the model config gets `calculate_per_token_loss=True` (the schedule then neither
divides by the number of micro-batches nor DDP by the DP size), and its `finalize_model_grads`
is called with `num_tokens=None` (no per-token rescaling: the loss already did it).
"""

from __future__ import annotations

import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.policy import checkpoint, cpu_compat
from nemo_igrpo.batch import SequenceSample, TrainSample
from nemo_igrpo.policy.config import PolicyConfig
from nemo_igrpo.policy.distributed import init_parallel_state
from nemo_igrpo.policy.model import build_model, make_tiny_model_dir, tiny_model_dir
from nemo_igrpo.policy.packing import pack_first_fit, pack_multiple, plan_pack, shard_over_dp
from nemo_igrpo.utils import collectives

LossFn = Callable[[LossInputs, LossNormalizer], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class _MicroBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [T]: the next token at every position (0 where unused)
    packed_seq_params: Any  # megatron PackedSeqParams (THD)
    sample_indices: list[int]  # global sample indices, in row order
    score_rows: torch.Tensor  # [M] rows whose logits score a response token (all samples, concatenated)
    score_counts: list[int]  # response length per sample (M = sum)
    # Training only: which of the M scored tokens are trained, and their per-token inputs.
    train_mask: Optional[torch.Tensor] = None  # [M] bool
    old_logprobs: Optional[torch.Tensor] = None  # [M]
    generation_logprobs: Optional[torch.Tensor] = None  # [M], NaN where a sample has none
    ref_logprobs: Optional[torch.Tensor] = None  # [M]
    advantages: Optional[torch.Tensor] = None  # [M]
    seq_ids: Optional[torch.Tensor] = None  # [M] int64, local sequence index
    outputs: dict = field(default_factory=dict)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Entropy of softmax(logits) over the full vocabulary, with the vocabulary split over TP
    ranks ([..., V/tp] here): three all-reduces of [...]-shaped tensors, no full-vocab gather.
    H = log Z - sum_i p_i z_i, with z = logits - max and Z = sum_i exp(z_i)."""
    with torch.no_grad():
        logits = logits.float()
        m = logits.max(dim=-1).values
        collectives.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        z = logits - m.unsqueeze(-1)
        e = z.exp()
        sum_e = e.sum(dim=-1)
        sum_ez = (e * z).sum(dim=-1)
        collectives.all_reduce(sum_e, group=tp_group)
        collectives.all_reduce(sum_ez, group=tp_group)
        return sum_e.log() - sum_ez / sum_e


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, tp_group) -> torch.Tensor:
    """log p(target) with the vocabulary split over TP ranks (megatron's vocab-parallel cross
    entropy: max / sum-exp / target-logit all-reduced; the full [.., V] is never gathered)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # Note: it subtracts the row max from `logits` in place; callers pass a tensor they own.
    return -vocab_parallel_cross_entropy(logits.float(), targets, tp_group=tp_group)


class MegatronActor:
    def __init__(
        self,
        cfg: PolicyConfig,
        *,
        seed: int,
        total_steps: int,
        kl_beta: float = 0.0,
        cache_dir: str | None = None,
    ):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.utils import get_model_config
        from transformers import AutoTokenizer

        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.seed = seed
        self.kl_beta = kl_beta
        self.layout = init_parallel_state(
            cfg.tensor_parallel_size, cfg.pipeline_parallel_size, seed, timeout_minutes=cfg.distributed_timeout_minutes
        )
        self.dp_rank = self.layout.dp_rank
        self.dp_size = self.layout.dp_size
        self.is_main = self.layout.is_main
        self._tp_group = ps.get_tensor_model_parallel_group()
        self._dp_group = ps.get_data_parallel_group()
        self._mp_group = ps.get_model_parallel_group()
        self._device = _device()
        self._quiet_megatron_logs()

        self.hf_path = self._resolve_hf_path(cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_path)

        built = build_model(cfg, self.hf_path, trainable=True)
        self.bridge = built.bridge
        self.provider = built.provider
        self.model_chunks = built.chunks
        self.transformer_impl = built.transformer_impl
        self.sequence_parallel = built.sequence_parallel
        # Every packed micro-batch is padded to this many tokens (FP8 GEMMs, sequence parallel).
        self.pack_multiple = pack_multiple(cfg.fp8, cfg.tensor_parallel_size, self.sequence_parallel)
        self.ref_chunks = None
        if kl_beta > 0:
            self.ref_chunks = build_model(cfg, self.hf_path, trainable=False).chunks

        model_config = get_model_config(self.model_chunks[0])
        model_config.finalize_model_grads_func = self._finalize_grads
        o = cfg.optimizer
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=cfg.precision == "bf16",
            params_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        with cpu_compat.cuda_to_cpu():
            self.optimizer = get_megatron_optimizer(opt_config, self.model_chunks)
        warmup = min(int(o.warmup_ratio * total_steps), total_steps - 1)
        # init_lr 0 and one scheduler tick *before* each update: update k (0-based) uses the
        # schedule at k+1, so warm-up reaches lr after `warmup` updates and the first update
        # is not wasted at lr=0; cosine decay ends at min_lr on the last step.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            lr_warmup_steps=warmup,
            lr_decay_steps=total_steps,
            lr_decay_style="cosine",
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=total_steps,
            wd_incr_style="constant",
        )

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _quiet_megatron_logs() -> None:
        import logging

        for name in ("megatron.core", "megatron.bridge"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def _resolve_hf_path(self, cache_dir: Optional[str]) -> str:
        if self.cfg.model.hf_path:
            return str(self.cfg.model.hf_path)
        if cache_dir is None:
            raise ValueError("policy.model.hf_path is unset (tiny model) and no cache_dir was given to build it in")
        tiny = self.cfg.model.tiny
        if self.is_main:
            make_tiny_model_dir(tiny, cache_dir, self.seed)
        collectives.barrier()
        return str(tiny_model_dir(tiny, cache_dir, self.seed))

    def _finalize_grads(self, model_chunks, num_tokens=None, **kwargs):
        """megatron's finalize_model_grads (DP all-reduce, tied-embedding and layernorm grad
        sync) without the per-token rescaling: our loss shares are already normalised."""
        from megatron.core.distributed import finalize_model_grads

        return finalize_model_grads(model_chunks, num_tokens=None, **kwargs)

    # ----------------------------------------------------------------------------- batching
    def _micro_batches(self, samples: Sequence[SequenceSample], train: bool) -> list[_MicroBatch]:
        """This DP rank's packed micro-batches (at least one: a rank with no samples gets a
        padding-only dummy that scores nothing, so it still joins the step's collectives), each
        padded to `self.pack_multiple` tokens."""
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = [len(s.token_ids) for s in samples]
        mine = shard_over_dp(lengths, self.dp_size)[self.dp_rank]
        bins = pack_first_fit(mine, lengths, self.cfg.max_tokens_per_microbatch)
        if not bins:
            bins = [[]]
        out = []
        for b in bins:
            plan = plan_pack(b, lengths, self.pack_multiple)
            ids: list[int] = []
            pos: list[int] = []
            labels: list[int] = []
            rows: list[int] = []
            counts: list[int] = []
            for idx, start in zip(plan.sample_indices, plan.starts):
                tok = samples[idx].token_ids
                ids.extend(tok)
                pos.extend(range(len(tok)))
                labels.extend(tok[1:] + [0])
                r0 = samples[idx].response_start
                # The logits at row j predict token j+1: response token t is scored at row t-1.
                rows.extend(range(start + r0 - 1, start + len(tok) - 1))
                counts.append(len(tok) - r0)
            # The padding segment (see packing.py): token 0 at positions 0.., never a score row,
            # so it reaches no log-prob, loss, entropy or metric.
            ids.extend([0] * plan.padding)
            pos.extend(range(plan.padding))
            labels.extend([0] * plan.padding)
            cu = plan.cu_seqlens
            dev = self._device
            cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
            max_len = max(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
            # total_tokens makes megatron derive seq_idx (each token's segment, the padding segment
            # included) from cu_seqlens: Mamba layers restart their state and convolution there.
            packed = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu_t,
                cu_seqlens_kv=cu_t,
                max_seqlen_q=max_len,
                max_seqlen_kv=max_len,
                total_tokens=cu[-1],
            )
            packed.host_bounds = list(cu)  # read by SDPACoreAttention (saves a sync per layer)
            mb = _MicroBatch(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([pos], dtype=torch.long, device=dev),
                labels=torch.tensor(labels, dtype=torch.long, device=dev),
                packed_seq_params=packed,
                sample_indices=plan.sample_indices,
                score_rows=torch.tensor(rows, dtype=torch.long, device=dev),
                score_counts=counts,
            )
            if train:
                self._attach_train_inputs(mb, samples)
            out.append(mb)
        return out

    def _attach_train_inputs(self, mb: _MicroBatch, samples: Sequence[SequenceSample]) -> None:
        masks, olds, gens, refs, advs, seq = [], [], [], [], [], []
        use_ref = self.kl_beta > 0
        for local_id, (idx, n) in enumerate(zip(mb.sample_indices, mb.score_counts)):
            s = samples[idx]
            if not isinstance(s, TrainSample):
                raise TypeError(f"train_step: sample {idx} is a {type(s).__name__}, expected TrainSample")
            mask = torch.ones(n, dtype=torch.bool) if s.loss_mask is None else torch.as_tensor(s.loss_mask) > 0
            if mask.shape != (n,):
                raise ValueError(f"train_step: sample {idx}: loss_mask has shape {tuple(mask.shape)}, expected ({n},)")
            old = s.old_logprobs
            if old is not None and tuple(old.shape) != (n,):
                raise ValueError(
                    f"train_step: sample {idx}: old_logprobs has shape {tuple(old.shape)}, expected ({n},)"
                )
            gen = s.generation_logprobs
            if gen is not None and tuple(gen.shape) != (n,):
                raise ValueError(
                    f"train_step: sample {idx}: generation_logprobs has shape {tuple(gen.shape)}, expected ({n},)"
                )
            if use_ref:
                if s.ref_logprobs is None:
                    raise ValueError(f"train_step: sample {idx} has no ref_logprobs but kl_beta={self.kl_beta} > 0")
                if tuple(s.ref_logprobs.shape) != (n,):
                    raise ValueError(
                        f"train_step: sample {idx}: ref_logprobs has shape {tuple(s.ref_logprobs.shape)}, expected ({n},)"
                    )
                refs.append(s.ref_logprobs.float().cpu())
            masks.append(mask)
            # NaN marks "no behaviour log-prob given": replaced by the current (detached) one.
            olds.append(old.float().cpu() if old is not None else torch.full((n,), float("nan")))
            gens.append(gen.float().cpu() if gen is not None else torch.full((n,), float("nan")))
            advs.append(torch.full((n,), float(s.advantage)))
            seq.append(torch.full((n,), local_id, dtype=torch.long))
        dev = self._device
        cat = lambda xs, dt: torch.cat(xs).to(dev) if xs else torch.zeros(0, dtype=dt, device=dev)  # noqa: E731
        mb.train_mask = cat(masks, torch.bool)
        mb.old_logprobs = cat(olds, torch.float32)
        mb.generation_logprobs = cat(gens, torch.float32)
        mb.advantages = cat(advs, torch.float32)
        mb.seq_ids = cat(seq, torch.long)
        mb.ref_logprobs = cat(refs, torch.float32) if use_ref else None

    # ----------------------------------------------------------------------------- schedule
    def _run_schedule(self, chunks: list, mbs: list[_MicroBatch], loss_func: Callable, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        it = iter(mbs)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params)
            return output, partial(loss_func, mb)

        fb = get_forward_backward_func()
        grad_ctx = torch.no_grad() if forward_only else nullcontext()
        with cpu_compat.cuda_to_cpu(), grad_ctx:
            fb(
                forward_step_func=forward_step,
                data_iterator=it,
                model=chunks,
                num_microbatches=len(mbs),
                seq_length=max(mb.input_ids.shape[1] for mb in mbs),
                micro_batch_size=1,
                forward_only=forward_only,
            )

    def _scored(self, mb: _MicroBatch, output: torch.Tensor, with_entropy: bool):
        """Log-probs (and entropies) of the scored tokens, `policy.logprob_chunk_tokens` rows
        at a time: each chunk's fp32 [chunk, V/tp] temporaries are freed before the next, and
        under autograd each chunk is recomputed in the backward pass instead of kept, so the
        peak stays at one chunk's worth whatever the micro-batch size (the bf16 logits
        themselves are the model's output and exist once)."""
        logits = output[0] if output.dim() == 3 else output  # [T, V/tp] (b=1)
        rows_all = mb.score_rows
        chunk = self.cfg.logprob_chunk_tokens or max(int(rows_all.numel()), 1)
        bounds = list(range(0, int(rows_all.numel()), chunk)) or [0]
        recompute = torch.is_grad_enabled() and logits.requires_grad and len(bounds) > 1
        lps, ents = [], []
        for start in bounds:
            rows = rows_all[start : start + chunk]
            targets = mb.labels.index_select(0, rows)
            if recompute:
                from torch.utils.checkpoint import checkpoint

                lp = checkpoint(self._chunk_logprobs, logits, rows, targets, use_reentrant=False)
            else:
                lp = self._chunk_logprobs(logits, rows, targets)
            lps.append(lp)
            if with_entropy:
                ents.append(vocab_parallel_entropy(logits.detach().index_select(0, rows), self._tp_group))
        logprobs = torch.cat(lps) if len(lps) > 1 else lps[0]
        entropy = (torch.cat(ents) if len(ents) > 1 else ents[0]) if with_entropy else None
        return logprobs, entropy

    def _chunk_logprobs(self, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # index_select copies the rows, so the in-place max subtraction inside megatron's
        # cross entropy never touches the model's logits.
        return vocab_parallel_logprobs(logits.index_select(0, rows), targets, self._tp_group)

    # ----------------------------------------------------------------------------- public API
    def compute_logprobs(self, samples: list[SequenceSample], *, reference: bool = False, with_entropy: bool = False):
        """Per sample: float32 [response_length] log-probs (and entropies), on every rank."""
        self._validate(samples, "compute_logprobs")
        if reference and self.ref_chunks is None:
            raise ValueError(
                "compute_logprobs(reference=True) needs a reference model: construct the actor with kl_beta > 0"
            )
        chunks = self.ref_chunks if reference else self.model_chunks
        mbs = self._micro_batches(samples, train=False)

        def loss_func(mb: _MicroBatch, output: torch.Tensor):
            lp, ent = self._scored(mb, output, with_entropy)
            mb.outputs["logprobs"] = lp.detach().float()
            if ent is not None:
                mb.outputs["entropy"] = ent.detach().float()
            zero = output.new_zeros(())
            return zero, torch.tensor(0, dtype=torch.int), {}

        self._run_schedule(chunks, mbs, loss_func, forward_only=True)
        keys = ["logprobs"] + (["entropy"] if with_entropy else [])
        gathered = {k: self._gather_per_sample(samples, mbs, k) for k in keys}
        if with_entropy:
            return gathered["logprobs"], gathered["entropy"]
        return gathered["logprobs"]

    def _gather_per_sample(self, samples: Sequence[SequenceSample], mbs: list[_MicroBatch], key: str):
        """Scatter this rank's per-token results into a flat buffer over all samples and sum it
        over the world: exactly one rank (TP rank 0 of the last PP stage of the owning DP
        replica) contributes each sample, so the sum is a gather that also works on NCCL."""
        counts = [s.response_length for s in samples]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=self._device)
        contributes = self.layout.is_last_pp_stage and self.layout.tp_rank == 0
        if contributes:
            for mb in mbs:
                vals = mb.outputs[key]
                pos = 0
                for idx, n in zip(mb.sample_indices, mb.score_counts):
                    flat[offsets[idx] : offsets[idx] + n] = vals[pos : pos + n]
                    pos += n
        collectives.all_reduce(flat)
        flat = flat.cpu()
        return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(samples))]

    def train_step(
        self, samples: list[TrainSample], loss_fn: LossFn, max_response_length: Optional[int] = None
    ) -> dict[str, float]:
        """One optimizer step over `samples` (identical on every rank).

        max_response_length: the constant of the seq-mean-token-sum-norm (Dr.GRPO) aggregation;
        the trainer passes generation.max_new_tokens so the step size does not drift with the
        longest response of each batch. None: the longest response in `samples`.
        """
        self._validate(samples, "train_step")
        mbs = self._micro_batches(samples, train=True)
        norm = self._normalizer(samples)
        if max_response_length is not None:
            norm.max_response_length = max(int(max_response_length), norm.max_response_length)

        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        sums: dict[str, float] = {}

        def add(name: str, value: float) -> None:
            sums[name] = sums.get(name, 0.0) + value

        def loss_func(mb: _MicroBatch, output: torch.Tensor):
            lp, ent = self._scored(mb, output, with_entropy=True)
            # Train/inference agreement over every response token the generator scored (loss
            # mask or not); free here, where the trainer's log-probs already exist.
            gen = mb.generation_logprobs
            has_gen = ~torch.isnan(gen)
            if bool(has_gen.any()):
                gap = (lp.detach().float()[has_gen] - gen[has_gen]).abs()
                add("mismatch/exp_abs_gap_sum", float(torch.exp(gap).sum()))
                add("mismatch/tokens", float(has_gen.sum()))
            trained = mb.train_mask
            n_trained = int(trained.sum())
            if n_trained == 0:
                # Nothing to train here (a dummy or fully masked micro-batch): a zero loss that
                # still touches the graph, so backward runs and every rank joins the reductions.
                return output.sum() * 0.0, torch.tensor(0, dtype=torch.int), {}
            cur = lp[trained]
            old = mb.old_logprobs[trained]
            old = torch.where(torch.isnan(old), cur.detach(), old)
            inputs = LossInputs(
                logprobs=cur,
                old_logprobs=old,
                advantages=mb.advantages[trained],
                seq_ids=mb.seq_ids[trained],
                num_seqs=len(mb.sample_indices),
                ref_logprobs=mb.ref_logprobs[trained] if mb.ref_logprobs is not None else None,
                generation_logprobs=mb.generation_logprobs[trained],
            )
            loss_share, metrics = loss_fn(inputs, norm)
            # Record copies: the schedule may rescale the returned tensor in place.
            add("loss", float(loss_share.detach().clone()))
            add("entropy", float(ent[trained].sum()) / max(norm.num_tokens, 1.0))
            for k, v in metrics.items():
                add(k, float(torch.as_tensor(v).detach().clone()))
            return loss_share, torch.tensor(n_trained, dtype=torch.int), {}

        self.model_chunks[0].train()
        self._run_schedule(self.model_chunks, mbs, loss_func, forward_only=False)
        totals = self._sum_metrics(sums)
        loss = totals.get("loss", 0.0)
        gap_sum, gap_tokens = totals.pop("mismatch/exp_abs_gap_sum", 0.0), totals.pop("mismatch/tokens", 0.0)
        if gap_tokens:
            totals["logprob_mismatch"] = gap_sum / gap_tokens
            totals["logprob_mismatch_tokens"] = gap_tokens

        with cpu_compat.cuda_to_cpu():
            found_inf = self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
        skipped = bool(found_inf) or not math.isfinite(loss) or not math.isfinite(grad_norm)
        # The scheduler ticks even on a skipped update: the LR follows the trainer's step count.
        self.scheduler.step(increment=1)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if not skipped:
            with cpu_compat.cuda_to_cpu():
                ok, _, _ = self.optimizer.step()
            skipped = not ok
        if skipped:
            for chunk in self.model_chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()

        result = dict(totals)
        result.update(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            entropy=totals.get("entropy", 0.0),
            num_tokens=float(norm.num_tokens),
            skipped=1.0 if skipped else 0.0,
        )
        return result

    def _normalizer(self, samples: Sequence[TrainSample]) -> LossNormalizer:
        # Computed from the full list, which every rank holds: exact global counts, no collective.
        num_tokens = 0.0
        for s in samples:
            n = s.response_length
            num_tokens += float(n if s.loss_mask is None else int((torch.as_tensor(s.loss_mask) > 0).sum()))
        return LossNormalizer(
            num_tokens=num_tokens,
            num_seqs=float(len(samples)),
            max_response_length=max((s.response_length for s in samples), default=0),
        )

    def _sum_metrics(self, local: dict[str, float]) -> dict[str, float]:
        """Sum metric shares over micro-batches (done) and DP ranks; identical on every rank.
        Only TP rank 0 of the last PP stage contributes (the others computed the same values or
        none). Key sets can differ across ranks (a rank may have no trained tokens)."""
        contributes = self.layout.is_last_pp_stage and self.layout.tp_rank == 0
        mine = local if contributes else {}
        everyone = collectives.all_gather_objects(mine)
        total: dict[str, float] = {}
        for d in everyone:
            for k, v in d.items():
                total[k] = total.get(k, 0.0) + v
        return total

    @staticmethod
    def _validate(samples: Sequence[SequenceSample], where: str) -> None:
        if not samples:
            raise ValueError(f"{where}: empty sample list")
        for i, s in enumerate(samples):
            if not (1 <= s.response_start <= len(s.token_ids)):
                raise ValueError(
                    f"{where}: sample {i}: response_start={s.response_start} must be in [1, {len(s.token_ids)}] "
                    "(at least one prompt token precedes the response)"
                )

    # ----------------------------------------------------------------------------- weights out
    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, streamed through megatron-bridge (collective on all ranks)."""
        gen = self.bridge.export_hf_weights(self.model_chunks, cpu=True, show_progress=False)
        while True:
            # Only the bridge's own work runs in the CPU-compat scope, not the consumer's.
            with cpu_compat.cuda_to_cpu():
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item

    def save_hf(self, out_dir: str) -> None:
        """Write an HF directory (safetensors + config + tokenizer) that transformers and vLLM
        load. Written to a temp sibling and renamed when complete. Collective."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        collectives.barrier()
        with cpu_compat.cuda_to_cpu():
            self.bridge.save_hf_pretrained(self.model_chunks, str(tmp), show_progress=False)
        collectives.barrier()
        if self.is_main:
            self.tokenizer.save_pretrained(str(tmp))
            checkpoint.replace_dir(tmp, out)
        collectives.barrier()

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: str, extra_state: dict) -> None:
        """dist-checkpoint of model, optimizer, LR scheduler, RNG and `extra_state`, never half
        visible (policy/checkpoint.py). Collective."""
        checkpoint.save(self, ckpt_dir, extra_state)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore a save_checkpoint() directory (any TP/PP/DP layout); returns extra_state."""
        return checkpoint.load(self, ckpt_dir)
