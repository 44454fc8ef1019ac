"""Policy losses and loss aggregation.

The actor calls the loss once per micro-batch (see nemo_igrpo/batch.py): it passes only the trained
response tokens, flattened, with `seq_ids` saying which sequence of the micro-batch each token
belongs to, plus a `LossNormalizer` of counts over the whole optimizer step. Every value this
module returns (the loss and each metric) is a *share*: summing the shares of all micro-batches
on all data-parallel ranks gives the value for the whole batch, however it was split. That is
what makes gradient accumulation and data parallelism leave the loss unchanged.

Extending: a policy loss is one registered function that turns the inputs into per-token
losses and clip masks; aggregation, KL and metrics are shared:

    @register_policy_loss("my_loss")
    def my_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput: ...

or, without registering, `algorithm.policy_loss=my_pkg.losses:my_loss` (an import path, resolved by
utils/registry.py); `algorithm.loss_aggregation` takes import paths the same way.

Formulas (docs/algorithm.md has the full derivation and the paper's statement):
    clipped:  L_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high)),  rho_t = pi/pi_old
              dual clip (c > 1): for A < 0, L_t = min(L_t, -A c)
    gspo:     the same objective with the sequence ratio s_i = exp(mean_t log(pi/pi_old)),
              in per-token form exp(sg[log s_i] + log pi_t - sg[log pi_t])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, kl_penalty
from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.utils.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class PolicyLossOutput:
    per_token_loss: torch.Tensor  # [N], differentiable
    ratio: torch.Tensor  # [N], detached: the importance ratio the objective used
    clipped_low: torch.Tensor  # [N] bool: A < 0 and rho < 1 - eps_low (no gradient from this token)
    clipped_high: torch.Tensor  # [N] bool: A > 0 and rho > 1 + eps_high (no gradient from this token)
    dual_clipped: torch.Tensor  # [N] bool: A < 0 and rho > c (dual clip active)


PolicyLossFn = Callable[[LossInputs, AlgorithmConfig], PolicyLossOutput]
POLICY_LOSSES = Registry(
    "policy loss",
    "algorithm.policy_loss",
    arity=2,
    signature="fn(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput",
)
register_policy_loss = POLICY_LOSSES.register  # @register_policy_loss("name")
get_policy_loss: Callable[[str], PolicyLossFn] = POLICY_LOSSES.lookup


# --- per-sequence helpers (a sequence is never split across micro-batches) -------------------


def segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[num_seqs]: sum of `values` over the tokens of each sequence (differentiable)."""
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_ids, values)


def segment_lengths(seq_ids: torch.Tensor, num_seqs: int, dtype: torch.dtype) -> torch.Tensor:
    """[num_seqs]: trained tokens per sequence."""
    return torch.bincount(seq_ids, minlength=num_seqs).to(dtype)


# --- policy losses ------------------------------------------------------------------------


def clipped_objective(log_ratio: torch.Tensor, advantages: torch.Tensor, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """The PPO clipped surrogate with asymmetric eps (DAPO clip-higher) and optional dual clip,
    given per-token log importance ratios (already clamped)."""
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    low, high = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(low, high)
    # The pessimistic (larger) loss: once the ratio has moved past the clip range in the
    # direction the advantage pushes it, the token stops contributing gradient.
    loss = torch.maximum(unclipped, clipped)
    ratio_d = ratio.detach()
    clipped_high = (adv > 0) & (ratio_d > high)
    clipped_low = (adv < 0) & (ratio_d < low)
    if cfg.dual_clip_c is not None:
        # For negative advantages the loss -A rho grows without bound in rho; dual clip caps it
        # at -A c (Ye et al. 2020), so one stale, very likely token cannot dominate the batch.
        cap = -adv * cfg.dual_clip_c
        negative = adv < 0
        dual_clipped = negative & (ratio_d > cfg.dual_clip_c)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    else:
        dual_clipped = torch.zeros_like(clipped_low)
    return PolicyLossOutput(loss, ratio_d, clipped_low, clipped_high, dual_clipped)


@register_policy_loss("clipped")
def clipped_surrogate_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """Token-level ratio rho_t = exp(log pi_t - log pi_old_t) (GRPO, DAPO, the paper)."""
    log_ratio = (inputs.logprobs - inputs.old_logprobs.to(inputs.logprobs.dtype)).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    return clipped_objective(log_ratio, inputs.advantages, cfg)


@register_policy_loss("gspo")
def gspo_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its token ratios,
    s_i = exp(mean_t (log pi_t - log pi_old_t)).

    Per-token form: log rho_t = sg[log s_i] + log pi_t - sg[log pi_t]. Its value is log s_i for
    every token; its gradient w.r.t. log pi_t is rho_t = s_i, so with seq-mean-token-mean
    aggregation the gradient is s_i * A_i * mean_t grad log pi_t, as in the GSPO paper.
    """
    logprobs = inputs.logprobs
    token_log_ratio = logprobs - inputs.old_logprobs.to(logprobs.dtype)
    lengths = segment_lengths(inputs.seq_ids, inputs.num_seqs, logprobs.dtype).clamp(min=1.0)
    seq_log_ratio = segment_sum(token_log_ratio.detach(), inputs.seq_ids, inputs.num_seqs) / lengths
    seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_ratio = seq_log_ratio[inputs.seq_ids] + logprobs - logprobs.detach()
    return clipped_objective(log_ratio, inputs.advantages, cfg)


# --- aggregation ----------------------------------------------------------------------------

AggregationFn = Callable[[torch.Tensor, torch.Tensor, int, LossNormalizer], torch.Tensor]
LOSS_AGGREGATIONS = Registry(
    "loss aggregation",
    "algorithm.loss_aggregation",
    arity=4,
    signature="fn(per_token, seq_ids, num_seqs, norm: LossNormalizer) -> Tensor (a share)",
)
register_aggregation = LOSS_AGGREGATIONS.register


@register_aggregation("token-mean")
def token_mean(per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, norm: LossNormalizer) -> torch.Tensor:
    """sum over all tokens of the step / number of tokens of the step (DAPO): long responses
    weigh more, in proportion to their length."""
    return per_token.sum() / norm.num_tokens


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(
    per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, norm: LossNormalizer
) -> torch.Tensor:
    """The paper's (and GRPO's) form: mean over a sequence's tokens, then mean over sequences.
    The per-sequence mean is complete inside one micro-batch (sequences are never split)."""
    lengths = segment_lengths(seq_ids, num_seqs, per_token.dtype).clamp(min=1.0)
    return (segment_sum(per_token, seq_ids, num_seqs) / lengths).sum() / norm.num_seqs


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(
    per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, norm: LossNormalizer
) -> torch.Tensor:
    """Sum over a sequence's tokens, mean over sequences."""
    return per_token.sum() / norm.num_seqs


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, norm: LossNormalizer
) -> torch.Tensor:
    """Dr. GRPO: sum over a sequence's tokens divided by a constant (the maximum response
    length), mean over sequences; no length-dependent normaliser."""
    if norm.max_response_length < 1:
        raise ValueError(
            f"seq-mean-token-sum-norm needs LossNormalizer.max_response_length >= 1, got {norm.max_response_length}"
        )
    return per_token.sum() / (norm.num_seqs * norm.max_response_length)


def aggregate_loss(
    per_token: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int, mode: str, norm: LossNormalizer
) -> torch.Tensor:
    return LOSS_AGGREGATIONS.lookup(mode)(per_token, seq_ids, num_seqs, norm)


# --- correction for the generator's numbers ----------------------------------------------------


def tis_weights(inputs: LossInputs, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling: w_t = min(pi_old(t) / pi_gen(t), cap), detached, and
    which tokens hit the cap. Tokens without a generator log-prob (NaN) get weight 1.

    The samples were drawn from the generator's distribution, the loss assumes pi_old's; when the
    two differ (FP8 or other kernels in the generator) w_t re-weights each token to pi_old, and
    the cap bounds the variance of the rare tokens the generator under-sampled."""
    old = inputs.old_logprobs.detach()
    gen = inputs.generation_logprobs
    if gen is None:
        return torch.ones_like(old), torch.zeros_like(old, dtype=torch.bool)
    gen = gen.detach().to(old.dtype)
    log_w = (old - gen).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    weight = torch.exp(log_w)
    capped = weight > cap  # False where gen is NaN (NaN compares false)
    weight = torch.where(torch.isnan(gen), torch.ones_like(weight), weight.clamp(max=cap))
    return weight, capped


# --- the callable the actor receives ----------------------------------------------------------


class PolicyLoss:
    """loss_fn(inputs, norm) -> (loss_share, metrics); all metrics are shares (see module doc).

    Metrics: pg_loss, kl and kl_loss (beta * kl, only when kl_beta > 0), clip_frac_low,
    clip_frac_high, dual_clip_frac, ratio_mean, ratio_sq_mean (finalize_loss_metrics derives
    ratio_std from the two), ppo_kl (k3 estimate of KL(pi_old || pi), a drift measure).
    Token fractions and token means are over all trained tokens of the step.
    """

    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg
        self.policy_loss = get_policy_loss(cfg.policy_loss)
        LOSS_AGGREGATIONS.lookup(cfg.loss_aggregation)  # fail at construction, naming the key
        if cfg.kl_beta > 0:
            KL_ESTIMATORS.lookup(cfg.kl_estimator)
        if cfg.policy_loss == "gspo" and max(cfg.clip_eps_low, cfg.clip_eps_high) > 0.01:
            # Sequence ratios move far less than token ratios; eps of 0.2 almost never clips.
            logger.warning(
                "GSPO with clip eps %.3g/%.3g: the GSPO paper uses ~3e-4/4e-4 (sequence-level ratios stay near 1)",
                cfg.clip_eps_low,
                cfg.clip_eps_high,
            )

    def __call__(self, inputs: LossInputs, norm: LossNormalizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = inputs.logprobs.shape[0]
        for name in ("old_logprobs", "advantages", "seq_ids"):
            t = getattr(inputs, name)
            if t.shape != (n,):
                raise ValueError(f"LossInputs.{name} has shape {tuple(t.shape)}, expected ({n},) like logprobs")
        if norm.num_tokens <= 0 or norm.num_seqs <= 0:
            raise ValueError(
                f"LossNormalizer needs positive counts, got num_tokens={norm.num_tokens}, num_seqs={norm.num_seqs}"
            )
        cfg = self.cfg
        out = self.policy_loss(inputs, cfg)
        if not isinstance(out, PolicyLossOutput):
            # A plug-in loss (import path) is only known by its signature until it runs.
            raise TypeError(
                f"algorithm.policy_loss={cfg.policy_loss!r} returned {type(out).__name__}, "
                "expected nemo_igrpo.algorithms.losses.PolicyLossOutput"
            )
        per_token_loss = out.per_token_loss
        metrics: dict[str, torch.Tensor] = {}
        if cfg.tis_cap is not None:
            weight, capped = tis_weights(inputs, cfg.tis_cap)
            per_token_loss = per_token_loss * weight.to(per_token_loss.dtype)
            metrics["tis_weight_mean"] = weight.sum() / float(norm.num_tokens)
            metrics["tis_capped_frac"] = capped.sum().to(torch.float32) / float(norm.num_tokens)
        pg_loss = aggregate_loss(per_token_loss, inputs.seq_ids, inputs.num_seqs, cfg.loss_aggregation, norm)
        loss = pg_loss
        metrics["pg_loss"] = pg_loss.detach()
        if cfg.kl_beta > 0:
            if inputs.ref_logprobs is None:
                raise ValueError("algorithm.kl_beta > 0 but the actor passed no ref_logprobs (reference model not run)")
            if inputs.ref_logprobs.shape != (n,):
                raise ValueError(
                    f"LossInputs.ref_logprobs has shape {tuple(inputs.ref_logprobs.shape)}, expected ({n},)"
                )
            per_token_kl = kl_penalty(inputs.logprobs, inputs.ref_logprobs.to(inputs.logprobs.dtype), cfg.kl_estimator)
            kl = aggregate_loss(per_token_kl, inputs.seq_ids, inputs.num_seqs, cfg.loss_aggregation, norm)
            loss = loss + cfg.kl_beta * kl
            metrics["kl"] = kl.detach()
            metrics["kl_loss"] = (cfg.kl_beta * kl).detach()
        with torch.no_grad():
            t = float(norm.num_tokens)
            drift = (inputs.old_logprobs.to(inputs.logprobs.dtype) - inputs.logprobs).clamp(
                -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
            )
            metrics["clip_frac_low"] = out.clipped_low.sum().to(torch.float32) / t
            metrics["clip_frac_high"] = out.clipped_high.sum().to(torch.float32) / t
            metrics["dual_clip_frac"] = out.dual_clipped.sum().to(torch.float32) / t
            metrics["ratio_mean"] = out.ratio.sum() / t
            metrics["ratio_sq_mean"] = out.ratio.square().sum() / t
            metrics["ppo_kl"] = (torch.exp(-drift) + drift - 1.0).sum() / t
        return loss, metrics


def make_loss_fn(cfg: AlgorithmConfig) -> PolicyLoss:
    """The loss callable for `MegatronActor.train_step(samples, loss_fn)`."""
    return PolicyLoss(cfg)


def finalize_loss_metrics(summed: dict[str, float]) -> dict[str, float]:
    """After the actor summed the shares: add statistics that are not themselves shares
    (ratio_std = sqrt(E[rho^2] - E[rho]^2)). Returns a new dict."""
    out = dict(summed)
    if "ratio_mean" in out and "ratio_sq_mean" in out:
        var = float(out["ratio_sq_mean"]) - float(out["ratio_mean"]) ** 2
        out["ratio_std"] = math.sqrt(max(var, 0.0))
    return out
