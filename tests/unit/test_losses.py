"""Policy losses, KL estimators and aggregation: hand-computed values, an independent float64
re-implementation (per token, per sequence, in plain loops) on random ragged batches, and
invariance of the loss, its gradient and its metrics to micro-batch and data-parallel splits."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.algorithms.losses import POLICY_LOSSES, finalize_loss_metrics, make_loss_fn, register_policy_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MAX_LEN = 9


# --- building LossInputs the way the actor does --------------------------------------------------


def make_sequences(seed: int, num: int, *, spread: float = 0.4):
    """Ragged sequences: trained-token log-probs (current and old), advantage, reference."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(num):
        n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=gen))
        old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
        new = old + torch.randn(n, generator=gen, dtype=torch.float64) * spread
        ref = old + torch.randn(n, generator=gen, dtype=torch.float64) * spread
        adv = 0.0 if i % 5 == 0 else float(torch.randn(1, generator=gen))  # some zero-advantage sequences
        seqs.append({"new": new, "old": old, "ref": ref, "adv": adv})
    return seqs


def leaves(seqs):
    """One float64 leaf per sequence, so gradients can be compared however the batch is split."""
    return [s["new"].clone().requires_grad_(True) for s in seqs]


def pack(seqs, logps, indices, with_ref: bool) -> LossInputs:
    """A micro-batch of the sequences `indices`, flattened like the actor's padding-free pack."""
    return LossInputs(
        logprobs=torch.cat([logps[i] for i in indices]),
        old_logprobs=torch.cat([seqs[i]["old"] for i in indices]),
        advantages=torch.cat([torch.full_like(seqs[i]["old"], seqs[i]["adv"]) for i in indices]),
        seq_ids=torch.cat([torch.full((len(seqs[i]["old"]),), k, dtype=torch.int64) for k, i in enumerate(indices)]),
        num_seqs=len(indices),
        ref_logprobs=torch.cat([seqs[i]["ref"] for i in indices]) if with_ref else None,
    )


def global_norm(seqs) -> LossNormalizer:
    return LossNormalizer(
        num_tokens=float(sum(len(s["old"]) for s in seqs)), num_seqs=float(len(seqs)), max_response_length=MAX_LEN
    )


def run_split(cfg, seqs, partition):
    """Sum the loss shares and metric shares over `partition` (a list of micro-batches of
    sequence indices, in any order across 'ranks'); return (loss, grads per sequence, metrics)."""
    loss_fn = make_loss_fn(cfg)
    logps = leaves(seqs)
    norm = global_norm(seqs)
    total = torch.zeros((), dtype=torch.float64)
    metrics: dict[str, float] = {}
    for micro in partition:
        share, m = loss_fn(pack(seqs, logps, micro, cfg.kl_beta > 0), norm)
        share.backward()
        total = total + share.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
    return float(total), [lp.grad.clone() for lp in logps], metrics


# --- independent float64 reference ----------------------------------------------------------------


def reference_loss(cfg: AlgorithmConfig, seqs, logps):
    """Loss of the whole batch, written from the formulas in docs/algorithm.md, token by token."""
    el, eh, c = cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c
    total_tokens = sum(len(s["old"]) for s in seqs)
    per_seq_pg, per_seq_kl, lengths = [], [], []
    clip_low = clip_high = 0
    for s, lp in zip(seqs, logps):
        n, a = len(s["old"]), s["adv"]
        if cfg.policy_loss == "gspo":
            seq_log_ratio = sum(float(lp[t].detach()) - float(s["old"][t]) for t in range(n)) / n
        pg_terms, kl_terms = [], []
        for t in range(n):
            if cfg.policy_loss == "clipped":
                ratio = torch.exp(torch.clamp(lp[t] - s["old"][t], -20, 20))
            else:  # value s_i, gradient s_i * d log pi_t
                ratio = math.exp(seq_log_ratio) * torch.exp(lp[t] - lp[t].detach())
            clipped_ratio = torch.clamp(ratio, 1 - el, 1 + eh)
            term = torch.maximum(-a * ratio, -a * clipped_ratio)
            if c is not None and a < 0:
                term = torch.minimum(term, torch.tensor(-a * c, dtype=torch.float64))
            r = float(ratio.detach())
            clip_low += a < 0 and r < 1 - el
            clip_high += a > 0 and r > 1 + eh
            pg_terms.append(term)
            if cfg.kl_beta > 0:
                x = torch.clamp(lp[t] - s["ref"][t], -20, 20)
                k = {"k1": x, "k2": 0.5 * x * x, "k3": torch.exp(-x) + x - 1}[cfg.kl_estimator]
                kl_terms.append(torch.clamp(k, -10, 10))
        per_seq_pg.append(pg_terms)
        per_seq_kl.append(kl_terms)
        lengths.append(n)

    def aggregate(per_seq):
        num_seqs = len(per_seq)
        if cfg.loss_aggregation == "token-mean":
            return sum(sum(terms) for terms in per_seq) / total_tokens
        if cfg.loss_aggregation == "seq-mean-token-mean":
            return sum(sum(terms) / len(terms) for terms in per_seq) / num_seqs
        if cfg.loss_aggregation == "seq-mean-token-sum":
            return sum(sum(terms) for terms in per_seq) / num_seqs
        return sum(sum(terms) / MAX_LEN for terms in per_seq) / num_seqs

    loss = aggregate(per_seq_pg)
    kl = aggregate(per_seq_kl) if cfg.kl_beta > 0 else None
    if kl is not None:
        loss = loss + cfg.kl_beta * kl
    return loss, kl, clip_low / total_tokens, clip_high / total_tokens


CONFIGS = [
    AlgorithmConfig(),
    AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0),
    AlgorithmConfig(kl_beta=0.05, kl_estimator="k1"),
    AlgorithmConfig(kl_beta=0.05, kl_estimator="k2", clip_eps_high=0.28),
    AlgorithmConfig(kl_beta=0.1, kl_estimator="k3", dual_clip_c=2.0),
    AlgorithmConfig(policy_loss="gspo", clip_eps_low=3e-2, clip_eps_high=4e-2),
    AlgorithmConfig(policy_loss="gspo", clip_eps_low=3e-2, clip_eps_high=4e-2, dual_clip_c=1.05, kl_beta=0.02),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg_index", range(len(CONFIGS)))
def test_matches_float64_reference(mode, cfg_index):
    cfg = replace(CONFIGS[cfg_index], loss_aggregation=mode)
    seqs = make_sequences(seed=cfg_index * 10 + MODES.index(mode), num=12)
    # The whole batch in one micro-batch.
    loss, grads, metrics = run_split(cfg, seqs, [list(range(len(seqs)))])
    logps = leaves(seqs)
    ref, ref_kl, ref_clip_low, ref_clip_high = reference_loss(cfg, seqs, logps)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    for got, lp in zip(grads, logps):
        assert torch.allclose(got, lp.grad, rtol=1e-9, atol=1e-12)
    if cfg.policy_loss == "clipped":
        assert metrics["clip_frac_low"] == pytest.approx(ref_clip_low, abs=1e-7)
        assert metrics["clip_frac_high"] == pytest.approx(ref_clip_high, abs=1e-7)
    if ref_kl is not None:
        assert metrics["kl"] == pytest.approx(float(ref_kl.detach()), rel=1e-9)
    assert metrics["pg_loss"] + metrics.get("kl_loss", 0.0) == pytest.approx(loss, rel=1e-9, abs=1e-12)


def test_reference_exercises_clipping():
    # Guards the random data: both clip sides and the dual clip must actually occur.
    cfg = CONFIGS[1]
    _, _, metrics = run_split(cfg, make_sequences(seed=3, num=40, spread=0.6), [list(range(40))])
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0 and metrics["dual_clip_frac"] > 0


def random_partition(rng: random.Random, n: int, dp: int) -> list[list[int]]:
    """Shuffle the sequences over `dp` ranks, then cut each rank's list into micro-batches."""
    order = list(range(n))
    rng.shuffle(order)
    ranks = [order[r::dp] for r in range(dp)]
    micro = []
    for rank in ranks:
        i = 0
        while i < len(rank):
            size = rng.randint(1, 4)
            micro.append(rank[i : i + size])
            i += size
    return micro


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg_index", [0, 4, 6])
def test_invariant_to_microbatch_and_dp_split(mode, cfg_index):
    cfg = replace(CONFIGS[cfg_index], loss_aggregation=mode)
    seqs = make_sequences(seed=100 + cfg_index, num=13)
    full_loss, full_grads, full_metrics = run_split(cfg, seqs, [list(range(13))])
    rng = random.Random(cfg_index)
    for dp in (1, 2, 4):
        loss, grads, metrics = run_split(cfg, seqs, random_partition(rng, 13, dp))
        assert loss == pytest.approx(full_loss, rel=1e-10, abs=1e-12)
        for a, b in zip(grads, full_grads):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
        for key, value in full_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_local_normalisation_would_not_be_invariant():
    # The invariance above is not automatic: normalising each micro-batch by its own counts
    # (what a naive gradient-accumulation loop does) changes the loss. This shows the test
    # above can fail.
    cfg = replace(CONFIGS[0], loss_aggregation="token-mean")
    seqs = make_sequences(seed=7, num=6)
    loss_fn = make_loss_fn(cfg)
    logps = leaves(seqs)
    full, _ = loss_fn(pack(seqs, logps, list(range(6)), False), global_norm(seqs))
    naive = 0.0
    for micro in ([0], [1, 2, 3, 4, 5]):
        local = global_norm([seqs[i] for i in micro])
        naive += float(loss_fn(pack(seqs, logps, micro, False), local)[0].detach()) / 2
    assert abs(naive - float(full.detach())) > 1e-3


# --- hand-computed values -------------------------------------------------------------------------


def single_tokens(ratios, advantages, dtype=torch.float64):
    """One-token sequences with the given importance ratios and advantages."""
    old = torch.full((len(ratios),), -1.0, dtype=dtype)
    new = (old + torch.log(torch.tensor(ratios, dtype=dtype))).requires_grad_(True)
    inputs = LossInputs(
        logprobs=new,
        old_logprobs=old,
        advantages=torch.tensor(advantages, dtype=dtype),
        seq_ids=torch.arange(len(ratios)),
        num_seqs=len(ratios),
    )
    norm = LossNormalizer(num_tokens=len(ratios), num_seqs=len(ratios), max_response_length=1)
    return inputs, norm


def test_clipped_surrogate_hand_values():
    cfg = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, loss_aggregation="token-mean")
    ratios = [1.5, 0.5, 4.0, 1.1, 0.9, 2.0]
    advs = [1.0, -1.0, -1.0, 1.0, -2.0, 0.0]
    inputs, norm = single_tokens(ratios, advs)
    out = POLICY_LOSSES["clipped"](inputs, cfg)
    expected = [
        -1.28,  # A>0, rho above 1+eps_high: -A (1+eps_high)
        0.8,  # A<0, rho below 1-eps_low: max(0.5, 0.8)
        3.0,  # A<0, rho=4: max(4, 1.28) = 4, dual clip caps it at -A c = 3
        -1.1,  # inside the range
        1.8,  # A=-2, rho 0.9: max(1.8, 1.6)
        0.0,  # A=0
    ]
    assert out.per_token_loss.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.clipped_high.tolist() == [True, False, False, False, False, False]
    assert out.clipped_low.tolist() == [False, True, False, False, False, False]
    assert out.dual_clipped.tolist() == [False, False, True, False, False, False]
    loss, metrics = make_loss_fn(cfg)(inputs, norm)
    assert loss.item() == pytest.approx(sum(expected) / 6, abs=1e-12)
    loss.backward()
    # d loss / d log pi = (-A rho) / 6 for tokens that are not clipped; 0 for clipped ones.
    grads = inputs.logprobs.grad.tolist()
    assert grads == pytest.approx([0.0, 0.0, 0.0, -1.1 / 6, 2 * 0.9 / 6, 0.0], abs=1e-12)
    assert float(metrics["clip_frac_high"]) == pytest.approx(1 / 6)
    assert float(metrics["ratio_mean"]) == pytest.approx(sum(ratios) / 6)
    stats = finalize_loss_metrics({k: float(v) for k, v in metrics.items()})
    mean = sum(ratios) / 6
    assert stats["ratio_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in ratios) / 6), rel=1e-6)


def test_aggregation_hand_values():
    # Two sequences: lengths 1 and 3, per-token losses -A*rho with rho = 1 (old == new).
    # Seq 0: A = 3 -> [-3]; seq 1: A = -1 -> [1, 1, 1].
    old = torch.zeros(4, dtype=torch.float64)
    inputs = LossInputs(
        logprobs=old.clone().requires_grad_(True),
        old_logprobs=old,
        advantages=torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64),
        seq_ids=torch.tensor([0, 1, 1, 1]),
        num_seqs=2,
    )
    norm = LossNormalizer(num_tokens=4, num_seqs=2, max_response_length=5)
    expected = {
        "token-mean": (-3 + 3) / 4,
        "seq-mean-token-mean": (-3 / 1 + 3 / 3) / 2,
        "seq-mean-token-sum": (-3 + 3) / 2,
        "seq-mean-token-sum-norm": (-3 + 3) / (2 * 5),
    }
    for mode, value in expected.items():
        loss, _ = make_loss_fn(AlgorithmConfig(loss_aggregation=mode))(inputs, norm)
        assert loss.item() == pytest.approx(value, abs=1e-12), mode
    # The paper's seq-mean-token-mean gives the lone token of seq 0 three times the weight of
    # each token of seq 1: gradient -A/(|o| G).
    loss, _ = make_loss_fn(AlgorithmConfig(loss_aggregation="seq-mean-token-mean"))(inputs, norm)
    loss.backward()
    assert inputs.logprobs.grad.tolist() == pytest.approx([-1.5, 1 / 6, 1 / 6, 1 / 6], abs=1e-12)


def test_gspo_sequence_ratio():
    # One sequence of 3 tokens with token log-ratios 0.3, -0.1, 0.1: s = exp(0.1) for every token.
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    new = (old + torch.tensor([0.3, -0.1, 0.1], dtype=torch.float64)).requires_grad_(True)
    inputs = LossInputs(new, old, torch.full((3,), 2.0, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 1)
    cfg = AlgorithmConfig(policy_loss="gspo", clip_eps_low=0.2, clip_eps_high=0.2)
    out = POLICY_LOSSES["gspo"](inputs, cfg)
    assert out.ratio.tolist() == pytest.approx([math.exp(0.1)] * 3, abs=1e-12)
    loss, _ = make_loss_fn(cfg)(inputs, LossNormalizer(3, 1, 3))
    loss.backward()
    # seq-mean-token-mean: d/d log pi_t = -A s / |o|
    assert new.grad.tolist() == pytest.approx([-2 * math.exp(0.1) / 3] * 3, abs=1e-12)


def test_kl_estimators_hand_values():
    x = math.log(2.0)
    lp = torch.tensor([x, 30.0, -30.0], dtype=torch.float64)
    ref = torch.zeros(3, dtype=torch.float64)
    assert kl_penalty(lp, ref, "k1").tolist() == pytest.approx([x, 10.0, -10.0])  # value clamp +-10
    assert kl_penalty(lp, ref, "k2").tolist() == pytest.approx([0.5 * x * x, 10.0, 10.0])
    # k3 = exp(-x) + x - 1; at x = 30 the log-ratio is clamped to 20 first: 19 -> 10.
    assert kl_penalty(lp, ref, "k3").tolist() == pytest.approx([0.5 + x - 1, 10.0, 10.0])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    # k3 is an unbiased estimator of KL(p || q) for samples from p: check on two categoricals.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    per_token = kl_penalty(p.log(), q.log(), "k3")
    assert float((p * per_token).sum()) == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-12)


def test_kl_beta_needs_reference_logprobs():
    inputs, norm = single_tokens([1.0], [1.0])
    with pytest.raises(ValueError, match="no ref_logprobs"):
        make_loss_fn(AlgorithmConfig(kl_beta=0.1))(inputs, norm)


def test_beta_zero_ignores_reference():
    inputs, norm = single_tokens([1.2, 0.7], [1.0, -0.5])
    loss_a, metrics = make_loss_fn(AlgorithmConfig())(inputs, norm)
    inputs.ref_logprobs = torch.tensor([-50.0, 3.0], dtype=torch.float64)
    loss_b, _ = make_loss_fn(AlgorithmConfig())(inputs, norm)
    assert loss_a.item() == loss_b.item() and "kl" not in metrics


def test_float32_inputs_and_bad_shapes():
    inputs, norm = single_tokens([1.1, 0.8], [1.0, -1.0], dtype=torch.float32)
    loss, metrics = make_loss_fn(AlgorithmConfig())(inputs, norm)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    inputs.seq_ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="seq_ids has shape"):
        make_loss_fn(AlgorithmConfig())(inputs, norm)
    with pytest.raises(ValueError, match="algorithm.policy_loss: 'ppo2'"):
        make_loss_fn(AlgorithmConfig(policy_loss="ppo2"))


def test_policy_loss_registry_extension():
    @register_policy_loss("test_reinforce")
    def reinforce(inputs, cfg):
        from nemo_igrpo.algorithms.losses import PolicyLossOutput

        none = torch.zeros_like(inputs.advantages, dtype=torch.bool)
        return PolicyLossOutput(
            -inputs.advantages * inputs.logprobs, torch.ones_like(inputs.logprobs), none, none, none
        )

    try:
        inputs, norm = single_tokens([1.0, 1.0], [2.0, -1.0])
        loss, _ = make_loss_fn(AlgorithmConfig(policy_loss="test_reinforce", loss_aggregation="token-mean"))(
            inputs, norm
        )
        assert loss.item() == pytest.approx((-2.0 * -1.0 + 1.0 * -1.0) / 2)
    finally:
        del POLICY_LOSSES["test_reinforce"]


def test_truncated_importance_sampling_hand_values():
    """algorithm.tis_cap: each token's loss is weighted by min(pi_old / pi_gen, cap), detached;
    tokens without a generator log-prob (NaN) keep weight 1."""
    cfg = AlgorithmConfig(loss_aggregation="token-mean", tis_cap=2.0)
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    gen = torch.tensor([-1.0, -1.5, -3.0, float("nan")], dtype=torch.float64)  # w = 1, e^0.5, e^2 -> 2, 1
    logp = old.clone().requires_grad_(True)  # on-policy: rho = 1, per-token loss = -A
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    inputs = LossInputs(
        logprobs=logp, old_logprobs=old, advantages=adv, seq_ids=torch.arange(4), num_seqs=4, generation_logprobs=gen
    )
    norm = LossNormalizer(num_tokens=4, num_seqs=4, max_response_length=1)
    weights = [1.0, math.exp(0.5), 2.0, 1.0]
    loss, metrics = make_loss_fn(cfg)(inputs, norm)
    assert loss.item() == pytest.approx(sum(-a * w for a, w in zip(adv.tolist(), weights)) / 4, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-a * w / 4 for a, w in zip(adv.tolist(), weights)], abs=1e-12)
    assert float(metrics["tis_weight_mean"]) == pytest.approx(sum(weights) / 4)
    assert float(metrics["tis_capped_frac"]) == pytest.approx(1 / 4)
    # Off (the default): the same inputs give the plain loss.
    plain, plain_metrics = make_loss_fn(replace(cfg, tis_cap=None))(
        replace(inputs, logprobs=old.clone().requires_grad_(True)), norm
    )
    assert plain.item() == pytest.approx(-adv.sum().item() / 4) and "tis_weight_mean" not in plain_metrics


def test_tis_cap_below_one_is_rejected():
    from nemo_igrpo.algorithms.validation import check_algorithm_config

    with pytest.raises(ValueError, match="algorithm.tis_cap"):
        check_algorithm_config(AlgorithmConfig(tis_cap=0.5))
