"""Run under torchrun with 4 processes (gloo). Same tiny Qwen2 weights, same samples, at layouts
TP1 (DP4), TP2 (DP2), PP2 (DP2), TP2xPP2 (DP1), plus TP1 with the distributed optimizer:

- HF -> Megatron -> HF export is exact at every layout,
- log-probs / entropies match transformers (TP1) and TP1 (others),
- loss, metrics, gradients (exported to HF names through the bridge) and updated weights match TP1,
- a checkpoint saved at TP1 after step 1 resumes at every other layout with the same step-2 loss,
- a non-finite loss skips the update (skipped=1.0, weights unchanged).

Rank 0 writes a JSON report {check_name: error message or null} to argv[2].
Usage: parallel_equivalence.py <hf_dir> <report.json> <work_dir>
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_igrpo.policy.actor import MegatronActor
from nemo_igrpo.batch import SequenceSample, TrainSample
from nemo_igrpo.policy.config import ModelConfig, OptimizerConfig, PolicyConfig

HF_DIR, REPORT, WORK = sys.argv[1], sys.argv[2], Path(sys.argv[3])
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (1, 1, True)]
LOGPROB_TOL = dict(rtol=0, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
checks: dict[str, str | None] = {}


def check(name: str, fn) -> None:
    try:
        fn()
        checks.setdefault(name, None)
    except Exception as e:  # recorded, reported by the pytest side
        checks[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def make_samples():
    g = torch.Generator().manual_seed(1)
    spec = [(12, 5), (30, 10), (7, 1), (21, 20), (16, 3), (9, 4), (25, 12)]
    samples = []
    for i, (n, r) in enumerate(spec):
        tok = torch.randint(4, 100, (n,), generator=g).tolist()
        resp = n - r
        mask = None
        if i == 4:  # a partially masked response
            mask = torch.ones(resp)
            mask[::3] = 0
        samples.append(
            TrainSample(
                token_ids=tok,
                response_start=r,
                advantage=float(torch.randn((), generator=g)),
                old_logprobs=-torch.rand(resp, generator=g) - 3.0,
                loss_mask=mask,
            )
        )
    return samples


def loss_fn(inp, norm):
    # A PPO-style clipped objective, token-mean over the whole step, so the test exercises
    # old log-probs, advantages, the normaliser and a per-sequence metric.
    ratio = torch.exp(inp.logprobs - inp.old_logprobs)
    obj = torch.minimum(ratio * inp.advantages, ratio.clamp(0.8, 1.2) * inp.advantages)
    loss = -obj.sum() / norm.num_tokens
    per_seq = torch.zeros(inp.num_seqs).index_add(0, inp.seq_ids, torch.ones_like(inp.logprobs))
    return loss, {
        "ratio_sum": ratio.detach().sum() / norm.num_tokens,
        "seqs": (per_seq > 0).float().sum() / norm.num_seqs,
    }


def nan_loss(inp, norm):
    return inp.logprobs.sum() * float("nan"), {}


def export(actor) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in actor.export_hf_weights()}


def export_grads(actor) -> dict[str, torch.Tensor]:
    """Gradients under HF names: swap each parameter's data with its main_grad, export through
    the bridge (which undoes TP/PP sharding and QKV layout), swap back."""
    saved = []
    with torch.no_grad():
        for chunk in actor.model_chunks:
            for p in chunk.parameters():
                saved.append((p, p.data.clone()))
                p.data.copy_(p.main_grad)
    grads = export(actor)
    with torch.no_grad():
        for p, data in saved:
            p.data.copy_(data)
    return grads


def main() -> None:
    from safetensors.torch import load_file

    rank = int(__import__("os").environ["RANK"])
    hf_weights = load_file(str(Path(HF_DIR) / "model.safetensors"))
    samples = make_samples()
    seq_samples = [SequenceSample(token_ids=s.token_ids, response_start=s.response_start) for s in samples]
    ckpt = WORK / "ckpt_tp1"
    base = None
    timings = {}
    for phase, (tp, pp, dist_opt) in enumerate(LAYOUTS):
        t0 = time.time()
        tag = f"tp{tp}_pp{pp}" + ("_distopt" if dist_opt else "")
        cfg = PolicyConfig(
            model=ModelConfig(hf_path=HF_DIR, transformer_impl="local"),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            use_distributed_optimizer=dist_opt,
            max_tokens_per_microbatch=40,  # several micro-batches per rank (1F1B has work to overlap)
            # adam_eps well above the gradient noise: Adam's first update g/(|g|+eps) is then a
            # smooth function of g and can be compared across layouts.
            optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, clip_grad=0.0, adam_eps=1e-2),
        )
        actor = MegatronActor(cfg, seed=0, total_steps=4)
        res = {"export": export(actor)}
        lps, ents = actor.compute_logprobs(seq_samples, with_entropy=True)
        res["logprobs"], res["entropy"] = lps, ents
        res["m1"] = actor.train_step(samples, loss_fn)
        res["grads"] = export_grads(actor)
        res["after"] = export(actor)
        if phase == 0:
            actor.save_checkpoint(str(ckpt), {"step": 1, "sampler": [1, 2, 3]})
            res["m2"] = actor.train_step(samples, loss_fn)
        elif dist_opt:
            try:
                actor.load_checkpoint(str(ckpt))
                res["optimizer_kind_error"] = None
            except ValueError as e:
                res["optimizer_kind_error"] = str(e)
        else:
            extra = actor.load_checkpoint(str(ckpt))
            res["extra"] = extra
            res["m2"] = actor.train_step(samples, loss_fn)
        if (tp, pp) == (2, 2):
            before = export(actor)
            res["nan"] = actor.train_step(samples, nan_loss)
            res["nan_after"] = export(actor)
            res["nan_before"] = before
        timings[tag] = round(time.time() - t0, 1)

        if rank == 0:
            if phase == 0:
                base = res

                def vs_hf_export():
                    assert set(res["export"]) == set(hf_weights), set(res["export"]) ^ set(hf_weights)
                    for k, v in hf_weights.items():
                        assert torch.equal(res["export"][k], v.float()), f"{k} differs after HF->Megatron->HF"

                def vs_transformers():
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
                    for i, s in enumerate(seq_samples):
                        logits = hf(torch.tensor([s.token_ids])).logits[0].float()
                        logp = torch.log_softmax(logits, -1)
                        r = s.response_start
                        ref = logp[r - 1 : -1].gather(1, torch.tensor(s.token_ids[r:])[:, None])[:, 0]
                        ent = -(logp.exp() * logp).sum(-1)[r - 1 : -1]
                        torch.testing.assert_close(res["logprobs"][i], ref, **LOGPROB_TOL, msg=f"sample {i}")
                        torch.testing.assert_close(res["entropy"][i], ent, **LOGPROB_TOL, msg=f"sample {i}")

                def ckpt_atomic():
                    assert (ckpt / "metadata.json").is_file(), "no dist-checkpoint metadata"
                    assert not ckpt.with_name(ckpt.name + ".tmp").exists(), "temp dir left behind"

                check("export_exact_tp1", vs_hf_export)
                check("logprobs_match_transformers", vs_transformers)
                check("checkpoint_atomic", ckpt_atomic)
                check("step_metrics_sane", lambda: _sane(res["m1"]))
                continue

            def same_export():
                for k, v in hf_weights.items():
                    assert torch.equal(res["export"][k], v.float()), f"{k} differs after HF->Megatron->HF at {tag}"

            def same_logprobs():
                for i in range(len(samples)):
                    torch.testing.assert_close(
                        res["logprobs"][i], base["logprobs"][i], **LOGPROB_TOL, msg=f"sample {i}"
                    )
                    torch.testing.assert_close(res["entropy"][i], base["entropy"][i], **LOGPROB_TOL, msg=f"sample {i}")

            def same_step():
                for key in ("loss", "ratio_sum", "seqs", "entropy", "num_tokens", "grad_norm", "lr"):
                    a, b = res["m1"][key], base["m1"][key]
                    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{key}: {a} vs TP1 {b}"

            def same_grads():
                for k in base["grads"]:
                    torch.testing.assert_close(res["grads"][k], base["grads"][k], **GRAD_TOL, msg=f"grad of {k}")

            def same_update():
                for k in base["after"]:
                    torch.testing.assert_close(
                        res["after"][k], base["after"][k], rtol=1e-4, atol=2e-6, msg=f"{k} after step"
                    )

            def resumed():
                assert res["extra"] == {"step": 1, "sampler": [1, 2, 3]}, res["extra"]
                for key in ("loss", "grad_norm", "lr"):
                    a, b = res["m2"][key], base["m2"][key]
                    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step-2 {key}: {a} vs TP1 {b}"

            check(f"export_exact_{tag}", same_export)
            check(f"logprobs_{tag}", same_logprobs)
            check(f"step_{tag}", same_step)
            if not dist_opt:  # its grad buffers hold only the local shard after the reduce-scatter
                check(f"grads_{tag}", same_grads)
            check(f"update_{tag}", same_update)
            if dist_opt:

                def clear_error():
                    assert "use_distributed_optimizer" in (res["optimizer_kind_error"] or ""), res[
                        "optimizer_kind_error"
                    ]

                check("resume_needs_same_optimizer_kind", clear_error)
            else:
                check(f"resume_from_tp1_{tag}", resumed)
            if "nan" in res:

                def nan_guard():
                    assert res["nan"]["skipped"] == 1.0, res["nan"]
                    for k, v in res["nan_before"].items():
                        assert torch.equal(v, res["nan_after"][k]), f"{k} changed by a skipped update"

                check("nan_guard_skips_update", nan_guard)
        del actor
    if rank == 0:
        Path(REPORT).write_text(json.dumps({"checks": checks, "timings_s": timings}, indent=1))
    dist.barrier()


def _sane(m):
    for key in ("loss", "grad_norm", "lr", "entropy", "num_tokens", "skipped", "ratio_sum", "seqs"):
        assert key in m, f"metric {key} missing: {sorted(m)}"
    assert m["skipped"] == 0.0 and m["num_tokens"] > 0 and m["grad_norm"] > 0
    assert abs(m["seqs"] - 1.0) < 1e-6, f"every sequence has a trained token, seqs share sums to {m['seqs']}"


if __name__ == "__main__":
    main()
