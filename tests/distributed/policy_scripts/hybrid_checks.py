"""Nemotron-H (hybrid Mamba-2) actor checks under torchrun, 2 processes (gloo), one launch.

Same tiny random Nemotron-H ("M*M-": Mamba, attention, Mamba, MLP; scan chunk 16 so the test
sequences span several chunks), same samples, at layouts TP1 (DP2), TP2, PP2 (1F1B):

- TP1: HF -> Megatron -> HF export and save_hf are bit-exact; per-token log-probs and entropies
  match transformers' own pure-torch Nemotron-H within 1e-5 (fp32), packed micro-batches with a
  trailing padding segment included; packing / padding change no log-prob (the SSM state and the
  convolution restart at every sequence boundary); one update's gradients (exported under HF
  names) match transformers' autograd gradients of the same loss; a checkpoint is written;
  generation.backend=megatron refuses the hybrid model with a clear error.
- TP2, PP2: export exact; log-probs, step metrics, gradients and the update equal TP1's; the TP1
  checkpoint resumes with the same step-2 metrics.
- full activation recompute trains exactly like none; bf16 close to fp32 (the paper's settings).
- `igrpo convert` hf-to-megatron (TP2) then megatron-to-hf (TP1) is bit-exact.

Rank 0 writes {check_name: error or null} to argv[2]. Usage: hybrid_checks.py <hf_dir> <report.json> <work_dir>
"""

from __future__ import annotations

import json
import os
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
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
checks: dict[str, str | None] = {}


def check(name: str, fn) -> None:
    try:
        fn()
        checks.setdefault(name, None)
    except Exception as e:  # recorded, reported by the pytest side
        checks[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def make_samples() -> list[TrainSample]:
    g = torch.Generator().manual_seed(3)
    # Lengths above and below the scan chunk (16); response starts anywhere.
    spec = [(37, 5), (12, 3), (21, 20), (7, 1), (30, 10), (18, 9)]
    return [
        TrainSample(
            token_ids=torch.randint(4, 100, (n,), generator=g).tolist(),
            response_start=r,
            advantage=float(torch.randn((), generator=g)),
        )
        for n, r in spec
    ]


def pg_loss(inp, norm):
    # Linear in the log-probs, token-mean over the step: its gradient is easy to recompute in
    # transformers, and it varies the Mamba parameters' gradients from sample to sample.
    return -(inp.advantages * inp.logprobs).sum() / norm.num_tokens, {}


def export(actor) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in actor.export_hf_weights()}


def export_grads(actor) -> dict[str, torch.Tensor]:
    """Gradients under HF names: swap each parameter's data with its main_grad and export."""
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


def transformers_reference(samples):
    """Per-sample log-probs and entropies of the response tokens, and the HF-named gradients of
    pg_loss, from transformers' NemotronHForCausalLM (pure-torch Mamba path, fp32)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    hf.train()  # dropout is 0; train mode takes the same torch path (the fused kernel is absent)
    num_tokens = sum(s.response_length for s in samples)
    lps, ents, loss = [], [], 0.0
    for s in samples:
        logp = torch.log_softmax(hf(torch.tensor([s.token_ids])).logits[0].float(), -1)
        r = s.response_start
        lp = logp[r - 1 : -1].gather(1, torch.tensor(s.token_ids[r:])[:, None])[:, 0]
        lps.append(lp.detach())
        ents.append((-(logp.exp() * logp).sum(-1)[r - 1 : -1]).detach())
        loss = loss - (s.advantage * lp).sum() / num_tokens
    loss.backward()
    # transformers names the backbone "model." in memory and "backbone." on disk (the bridge's names).
    grads = {n.replace("model.", "backbone.", 1): p.grad.detach().clone() for n, p in hf.named_parameters()}
    return lps, ents, grads


def assert_grads_close(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for k, w in want.items():
        scale = float(w.abs().max())
        err = float((got[k] - w).abs().max())
        assert err <= 1e-4 * scale + 1e-8, f"{where}: gradient of {k}: max error {err:.3g}, scale {scale:.3g}"


def main() -> None:
    from safetensors.torch import load_file

    rank = int(os.environ["RANK"])
    hf_weights = load_file(str(Path(HF_DIR) / "model.safetensors"))
    samples = make_samples()
    seqs = [SequenceSample(s.token_ids, s.response_start) for s in samples]
    ckpt = WORK / "ckpt_tp1"
    base: dict = {}
    timings = {}
    ref = transformers_reference(samples) if rank == 0 else None
    for phase, (tp, pp) in enumerate(LAYOUTS):
        t0 = time.time()
        tag = f"tp{tp}_pp{pp}"
        cfg = PolicyConfig(
            model=ModelConfig(hf_path=HF_DIR, transformer_impl="local"),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            max_tokens_per_microbatch=45,  # several packs per rank, up to three sequences each
            optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, clip_grad=0.0, adam_eps=1e-2),
        )
        actor = MegatronActor(cfg, seed=0, total_steps=4)
        res: dict = {"export": export(actor)}
        res["logprobs"], res["entropy"] = actor.compute_logprobs(seqs, with_entropy=True)
        if phase == 0:
            # A trailing padding segment in every pack (as FP8 / sequence parallel pad them).
            actor.pack_multiple = 16
            res["padded"] = actor.compute_logprobs(seqs)
            actor.pack_multiple = 1
            actor.cfg.max_tokens_per_microbatch = 1  # every sample alone
            res["alone"] = actor.compute_logprobs(seqs)
            actor.cfg.max_tokens_per_microbatch = 45
            actor.save_hf(str(WORK / "saved_hf"))
            try:
                from nemo_igrpo.generation.config import GenerationConfig
                from nemo_igrpo.generation.interface import SamplingParams
                from nemo_igrpo.generation.megatron_backend import MegatronGenerationBackend

                backend = MegatronGenerationBackend(actor, GenerationConfig(backend="megatron"), seed=0)
                backend.generate([seqs[0].token_ids[:5]], SamplingParams(max_new_tokens=3, temperature=0.0))
                res["megatron_generation"] = "generated without error"
            except Exception as e:  # noqa: BLE001 - the message is what is checked
                res["megatron_generation"] = f"{type(e).__name__}: {e}"
        res["m1"] = actor.train_step(samples, pg_loss)
        res["grads"] = export_grads(actor)
        res["after"] = export(actor)
        if phase == 0:
            actor.save_checkpoint(str(ckpt), {"step": 1})
        else:
            res["extra"] = actor.load_checkpoint(str(ckpt))
        res["m2"] = actor.train_step(samples, pg_loss)
        timings[tag] = round(time.time() - t0, 1)

        if rank == 0:
            if phase == 0:
                base = res
                lps, ents, grads = ref

                def export_exact():
                    assert set(res["export"]) == set(hf_weights), set(res["export"]) ^ set(hf_weights)
                    for k, v in hf_weights.items():
                        assert torch.equal(res["export"][k], v.float()), f"{k} differs after HF->Megatron->HF"
                    saved = load_file(str(WORK / "saved_hf" / "model.safetensors"))
                    for k, v in hf_weights.items():
                        assert torch.equal(saved[k], v), f"save_hf: {k} differs"
                    from transformers import AutoConfig

                    assert (
                        AutoConfig.from_pretrained(WORK / "saved_hf").layers_block_type
                        == AutoConfig.from_pretrained(HF_DIR).layers_block_type
                    )

                def vs_transformers():
                    for i in range(len(samples)):
                        for key, want in (("logprobs", lps[i]), ("entropy", ents[i]), ("padded", lps[i])):
                            got = res[key][i]
                            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{key}, sample {i}")

                def packing_invisible():
                    for i in range(len(samples)):
                        torch.testing.assert_close(
                            res["alone"][i], res["logprobs"][i], rtol=0, atol=1e-6, msg=f"sample {i} alone vs packed"
                        )
                        torch.testing.assert_close(
                            res["padded"][i],
                            res["logprobs"][i],
                            rtol=0,
                            atol=1e-6,
                            msg=f"sample {i} packed with padding vs packed",
                        )

                def grads_vs_transformers():
                    assert res["m1"]["skipped"] == 0.0 and res["m1"]["grad_norm"] > 0, res["m1"]
                    assert_grads_close(res["grads"], grads, "TP1 vs transformers")

                def megatron_generation_refused():
                    msg = res["megatron_generation"]
                    assert "Nemotron-H" in msg and "generation.backend=vllm" in msg, msg

                check("export_and_save_hf_exact_tp1", export_exact)
                check("logprobs_match_transformers", vs_transformers)
                check("packing_and_padding_invisible", packing_invisible)
                check("grads_match_transformers", grads_vs_transformers)
                check("megatron_generation_refused", megatron_generation_refused)

                def checkpoint_written():
                    assert (ckpt / "metadata.json").is_file(), "no dist-checkpoint metadata"

                check("checkpoint_written", checkpoint_written)
                continue

            def same_export():
                for k, v in hf_weights.items():
                    assert torch.equal(res["export"][k], v.float()), f"{k} differs after HF->Megatron->HF at {tag}"

            def same_logprobs():
                for i in range(len(samples)):
                    torch.testing.assert_close(
                        res["logprobs"][i], base["logprobs"][i], rtol=0, atol=1e-5, msg=f"sample {i}"
                    )
                    torch.testing.assert_close(
                        res["entropy"][i], base["entropy"][i], rtol=0, atol=1e-5, msg=f"sample {i}"
                    )

            def same_step():
                for key in ("loss", "entropy", "num_tokens", "grad_norm", "lr"):
                    a, b = res["m1"][key], base["m1"][key]
                    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{key}: {a} vs TP1 {b}"
                assert_grads_close(res["grads"], base["grads"], f"{tag} vs TP1")
                for k in base["after"]:
                    torch.testing.assert_close(
                        res["after"][k], base["after"][k], rtol=1e-4, atol=2e-6, msg=f"{k} after step"
                    )

            def resumed():
                assert res["extra"] == {"step": 1}, res["extra"]
                for key in ("loss", "grad_norm", "lr"):
                    a, b = res["m2"][key], base["m2"][key]
                    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step-2 {key}: {a} vs TP1 {b}"

            check(f"export_exact_{tag}", same_export)
            check(f"logprobs_{tag}", same_logprobs)
            check(f"step_{tag}", same_step)
            check(f"resume_from_tp1_{tag}", resumed)
        del actor

    # The paper configs' settings: full activation recompute (exact) and bf16 (close), at TP1.
    t0 = time.time()
    steps = {}
    for name, kw in (("full_recompute", {"activation_recompute": "full"}), ("bf16", {"precision": "bf16"})):
        cfg = PolicyConfig(
            model=ModelConfig(hf_path=HF_DIR, transformer_impl="local"),
            max_tokens_per_microbatch=45,
            optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.0, clip_grad=0.0, adam_eps=1e-2),
            **kw,
        )
        actor = MegatronActor(cfg, seed=0, total_steps=4)
        steps[name] = actor.train_step(samples, pg_loss)
        del actor
    timings["recompute_bf16"] = round(time.time() - t0, 1)
    if rank == 0:

        def recompute_and_bf16():
            want = base["m1"]
            full, bf16 = steps["full_recompute"], steps["bf16"]
            for key in ("loss", "grad_norm"):
                assert abs(full[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), (key, full[key], want[key])
                assert abs(bf16[key] - want[key]) <= 2e-2 * max(1.0, abs(want[key])), (key, bf16[key], want[key])
            assert bf16["skipped"] == 0.0

        check("full_recompute_exact_and_bf16_close", recompute_and_bf16)

    t0 = time.time()
    from nemo_igrpo.cli import main as cli

    mcore, back = WORK / "nh_mcore", WORK / "nh_back"
    # Real Nemotron-H checkpoints ship remote-code files their auto_map names: carried through.
    remote_code = Path(HF_DIR) / "configuration_nemotron_h.py"
    if rank == 0:
        remote_code.write_text("# stand-in for the checkpoint's remote-code configuration\n")
    dist.barrier()
    rc1 = cli(["convert", "hf-to-megatron", HF_DIR, str(mcore), "--tensor-parallel-size", "2"])
    rc2 = cli(["convert", "megatron-to-hf", str(mcore), str(back)])
    timings["convert"] = round(time.time() - t0, 1)
    if rank == 0:

        def convert_exact():
            assert (rc1, rc2) == (0, 0), (rc1, rc2)
            out = load_file(str(back / "model.safetensors"))
            assert set(out) == set(hf_weights), set(out) ^ set(hf_weights)
            for k, v in hf_weights.items():
                assert torch.equal(out[k], v), f"{k} differs after convert round trip"
            assert (back / remote_code.name).read_text() == remote_code.read_text()

        check("convert_round_trip_exact", convert_exact)
        Path(REPORT).write_text(json.dumps({"checks": checks, "timings_s": timings}, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
