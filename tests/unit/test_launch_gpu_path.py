"""The launchers' decisions on the GPU path, checked on CPU: the colocated vLLM engine's memory,
NCCL weight sync to a generation node, models the actor refuses, and the memory arithmetic's
sequence-parallel and log-prob chunk terms (docs/cluster.md, section 6)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

from common import LaunchError, build_plan, load_site, vllm_serve_args  # noqa: E402
from layout import (  # noqa: E402
    LayoutError,
    check_layout,
    check_model_supported,
    estimate_train_memory_gib,
    train_memory_terms,
    uses_sequence_parallel,
    vllm_sleep_residual_gib,
)
from model_shapes import MODEL_SHAPES  # noqa: E402
from render_sbatch import render  # noqa: E402

from nemo_igrpo.config import load_config  # noqa: E402
from nemo_igrpo.policy.model import HYBRID_ARCHITECTURES, SUPPORTED_ARCHITECTURES  # noqa: E402

CONF = REPO / "conf"
CFG_7B = CONF / "paper" / "deepseek_r1_distill_qwen_7b_igrpo.yaml"
CFG_14B = CONF / "paper" / "deepseek_r1_distill_qwen_14b_igrpo.yaml"
CFG_NEMOTRON_H = CONF / "paper" / "nemotron_h_8b_base_8k_igrpo.yaml"
COLOCATED = ["cluster=single_node_colocated"]
NCCL = ["generation.server.weight_sync=nccl"]
ADDRESS_OVERRIDE = '"generation.server.nccl_master_address=${IGRPO_TRAIN_MASTER:?}"'
QWEN_7B = MODEL_SHAPES["DeepSeek-R1-Distill-Qwen-7B"]
GIB = 1024**3


@pytest.fixture()
def site_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run_home"))
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "account": "acct",
                "partition": "gpu",
                "container_image": "/shared/img.sqsh",
                "mounts": ["/shared:/shared"],
                "job_dir": str(tmp_path / "jobs"),
                "runs_dir": "/shared/runs",
                "models_dir": "/shared/models",
                "data_dir": "/shared/data",
            }
        )
    )
    return path


def _plan(site_file, config, overrides=(), **kw):
    return build_plan(str(config), list(overrides), load_site(site_file), **kw)


# ---- 7: vLLM colocated with the trainer ------------------------------------------------------


def _peak_and_resident(cfg):
    p = cfg.policy
    terms = train_memory_terms(
        QWEN_7B,
        p.tensor_parallel_size,
        1,
        8 // p.tensor_parallel_size,
        p.max_tokens_per_microbatch,
        p.activation_recompute,
        p.fp8 is not None,
        sequence_parallel=uses_sequence_parallel(cfg),
        logprob_chunk_tokens=p.logprob_chunk_tokens,
    )
    return terms.total, terms.resident


def test_colocated_without_sleep_counts_the_whole_vllm_share():
    # 7B on one node with vLLM at 0.5 x 80 GB: the trainer's ~48 GiB + 40 GiB does not fit.
    cfg = load_config(CFG_7B, [*COLOCATED, "generation.vllm.enable_sleep_mode=false"])
    with pytest.raises(LayoutError, match=r"generation\.vllm\.gpu_memory_utilization.*enable_sleep_mode"):
        check_layout(cfg, str(CFG_7B))
    # The share is counted exactly: just under what is left beside the trainer fits, just over does not.
    peak, _ = _peak_and_resident(cfg)
    room = (80 - peak) / 80
    fits = load_config(
        CFG_7B,
        [
            *COLOCATED,
            "generation.vllm.enable_sleep_mode=false",
            f"generation.vllm.gpu_memory_utilization={room - 0.005:.4f}",
        ],
    )
    assert check_layout(fits, str(CFG_7B)).colocated_vllm_gib == pytest.approx((room - 0.005) * 80, abs=0.01)
    over = load_config(
        CFG_7B,
        [
            *COLOCATED,
            "generation.vllm.enable_sleep_mode=false",
            f"generation.vllm.gpu_memory_utilization={room + 0.005:.4f}",
        ],
    )
    with pytest.raises(LayoutError, match=r"generation\.vllm\.gpu_memory_utilization"):
        check_layout(over, str(CFG_7B))


def test_colocated_with_sleep_keeps_only_the_residual_during_the_update():
    cfg = load_config(CFG_7B, COLOCATED)  # the fragment: 0.5, sleep mode on, CUDA graphs (enforce_eager off)
    assert cfg.generation.vllm.enable_sleep_mode and not cfg.generation.vllm.enforce_eager
    layout = check_layout(cfg, str(CFG_7B))
    assert layout.colocated_vllm_gib == vllm_sleep_residual_gib(enforce_eager=False) == 4.0
    eager = check_layout(load_config(CFG_7B, [*COLOCATED, "generation.vllm.enforce_eager=true"]), str(CFG_7B))
    assert eager.colocated_vllm_gib == vllm_sleep_residual_gib(enforce_eager=True) == 2.0


def test_colocated_with_sleep_still_needs_room_to_generate():
    # While vLLM generates, the trainer keeps weights, fp32 grads and optimizer shards (~38 GiB):
    # vLLM's share must fit beside them even though sleep frees it during the update.
    cfg = load_config(CFG_7B, COLOCATED)
    _, resident = _peak_and_resident(cfg)
    too_big = (80 - resident) / 80 + 0.01
    cfg = load_config(CFG_7B, [*COLOCATED, f"generation.vllm.gpu_memory_utilization={too_big:.3f}"])
    with pytest.raises(LayoutError, match=r"generation\.vllm\.gpu_memory_utilization.*while vLLM generates"):
        check_layout(cfg, str(CFG_7B))


def test_colocated_update_must_fit_beside_the_sleep_residual():
    # 24K-token micro-batches in one log-prob piece: ~79 GiB alone fits 80, not with 4 GiB asleep.
    cfg = load_config(CFG_7B, [*COLOCATED, "policy.max_tokens_per_microbatch=24576", "policy.logprob_chunk_tokens=0"])
    peak, _ = _peak_and_resident(cfg)
    assert peak < 80 < peak + 4
    with pytest.raises(LayoutError, match=r"policy\.max_tokens_per_microbatch.*sleeping colocated vLLM"):
        check_layout(cfg, str(CFG_7B))


def test_generation_nodes_do_not_share_training_gpus():
    assert check_layout(load_config(CFG_7B), str(CFG_7B)).colocated_vllm_gib is None


# ---- 8: NCCL weight sync to a generation node -------------------------------------------------


def _vllm_args_from_export(script: str) -> list[str]:
    """IGRPO_VLLM_ARGS as node_entry.sh's `eval "exec vllm serve ${IGRPO_VLLM_ARGS}"` splits it."""
    line = next(line for line in script.splitlines() if line.startswith("export IGRPO_VLLM_ARGS="))
    return shlex.split(shlex.split(line.split("=", 1)[1])[0])


def test_vllm_serve_args_carry_the_weight_transfer_config():
    cfg = load_config(CFG_7B, NCCL)
    args = vllm_serve_args(cfg, 8)
    i = args.index("--weight-transfer-config")
    assert json.loads(args[i + 1]) == {"backend": "nccl"}
    assert "--weight-transfer-config" not in vllm_serve_args(load_config(CFG_7B), 8)  # reload_from_dir


def test_vllm_0_32_parses_the_rendered_serve_command():
    """Every flag the launcher gives `vllm serve` is one vLLM 0.32's own parser accepts, and the
    weight-transfer JSON becomes its WeightTransferConfig(backend='nccl')."""
    pytest.importorskip("vllm")
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers())
    # Parsing only: building the engine arguments would look the model up (no checkpoint here).
    args = parser.parse_args(["serve", *vllm_serve_args(load_config(CFG_14B, NCCL), 8)])
    assert args.weight_transfer_config == WeightTransferConfig(backend="nccl")
    assert (args.tensor_parallel_size, args.data_parallel_size, args.logprobs_mode) == (2, 4, "raw_logprobs")


def test_sbatch_renders_fill_the_nccl_master_from_slurm(site_file):
    plan = _plan(site_file, CFG_14B, NCCL)
    assert plan.runtime_overrides == ["generation.server.nccl_master_address=${IGRPO_TRAIN_MASTER:?}"]
    for script in (render(plan, hetjob=True), render(plan)):
        args = _vllm_args_from_export(script)
        assert args[args.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
        assert "export VLLM_SERVER_DEV_MODE=1" in script
        train = next(
            line for line in script.splitlines() if "node_entry.sh train" in line or "node_entry.sh auto" in line
        )
        assert f"generation.server.nccl_master_port=29650 {ADDRESS_OVERRIDE}" in train, train
        assert "weight_sync_dir" not in script  # no directory to share with NCCL
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_nemo_run_dry_run_fills_the_nccl_master_from_slurm(site_file):
    from run import render_dry_run

    script = render_dry_run(_plan(site_file, CFG_14B, NCCL), packager="none")
    assert "export IGRPO_TRAIN_MASTER=${IGRPO_HOSTS[0]}" in script and "export VLLM_SERVER_DEV_MODE=1" in script
    args = _vllm_args_from_export(script)
    assert args[args.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
    task = next(line for line in script.splitlines() if line.startswith("# exec bash "))
    assert task.endswith(f"generation.server.nccl_master_port=29650 {ADDRESS_OVERRIDE}"), task


def _fake_slurm(tmp_path: Path) -> Path:
    """scontrol that expands comma lists, srun that records its arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && tr , "\\n" <<< "$3"\nexit 0\n',
        # One file per call: the server's srun runs in the background beside the trainers'. The
        # script stops the server when the trainers' step ends, so with EXPECT_SERVER the trainers'
        # call waits (at most 30 s) until the server's call has written its file.
        "srun": (
            '#!/bin/bash\ntrap "" TERM\n{ printf "%s\\n" "$@"; echo "VLLM_ARGS=$IGRPO_VLLM_ARGS"; } > "$SRUN_LOG.$$"\n'
            'if [ -n "${EXPECT_SERVER:-}" ] && [ "${*: -1}" != generate ]; then\n'
            '  for _ in $(seq 300); do grep -qx generate "$SRUN_LOG".* && break; sleep 0.1; done\nfi\n'
        ),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("hetjob", [True, False], ids=["hetjob", "one_allocation"])
def test_the_rendered_script_passes_the_first_training_node(site_file, tmp_path, hetjob):
    """Run the sbatch script itself with stand-in scontrol / srun: the trainers are told the first
    training node's name, the server gets the weight-transfer JSON as one argument."""
    script = render(_plan(site_file, CFG_14B, NCCL, requeue=False), hetjob=hetjob)
    log = tmp_path / "srun"
    env = {
        **os.environ,
        "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}",
        "SRUN_LOG": str(log),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "trn10,trn11,trn9,trn12,gen01",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "trn10,trn11,trn9,trn12",
        "SLURM_JOB_NODELIST_HET_GROUP_1": "gen01",
        **({"EXPECT_SERVER": "1"} if hetjob else {}),
    }
    subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True, text=True, timeout=60)
    calls = [f.read_text().strip("\n").split("\n") for f in tmp_path.glob("srun.*")]
    assert len(calls) == (2 if hetjob else 1)
    train = next(c for c in calls if "train" in c or "auto" in c)
    assert "generation.server.nccl_master_address=trn10" in train  # not sorted: trn10 is node 0
    assert "generation.server.nccl_master_port=29650" in train
    vllm_args = shlex.split(train[-1].split("=", 1)[1])  # node_entry.sh evals IGRPO_VLLM_ARGS
    assert vllm_args[vllm_args.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'


def test_node_entry_puts_rank_0_on_the_first_training_node(tmp_path):
    """torchrun's static rendezvous honours --node-rank, so global rank 0 (which binds the NCCL
    rendezvous) runs on IGRPO_TRAIN_MASTER; c10d would order nodes by hostname instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$TORCHRUN_LOG"\n')
    (bin_dir / "torchrun").chmod(stat.S_IRWXU)
    log = tmp_path / "torchrun.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TORCHRUN_LOG": str(log),
        "SLURM_NODEID": "0",
        "IGRPO_TRAIN_NODES": "4",
        "IGRPO_GPUS_PER_NODE": "8",
        "IGRPO_RDZV_PORT": "29500",
        "IGRPO_TRAIN_MASTER": "trn10",
    }
    subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "node_entry.sh"),
            "train",
            "train",
            "cfg.yaml",
            "generation.server.nccl_master_address=trn10",
        ],
        env=env,
        check=True,
        timeout=60,
    )
    args = log.read_text().split("\n")
    joined = " ".join(args)
    assert "--rdzv-backend static" in joined and "--rdzv-endpoint trn10:29500" in joined
    assert "--node-rank 0" in joined and "c10d" not in joined
    assert args[args.index("nemo_igrpo") + 1 : -1] == [
        "train",
        "cfg.yaml",
        "generation.server.nccl_master_address=trn10",
    ]


def test_loopback_nccl_master_across_nodes_is_refused(site_file):
    # The plan-time rule: without the launcher filling it, 127.0.0.1 cannot reach a generation node.
    cfg = load_config(CFG_7B, NCCL)
    with pytest.raises(LayoutError, match=r"generation\.server\.nccl_master_address.*127\.0\.0\.1"):
        check_layout(cfg, str(CFG_7B))
    check_layout(cfg, str(CFG_7B), fills_nccl_master_address=True)
    # Given explicitly on the command line, the launcher does not overrule it: refused.
    with pytest.raises(LaunchError, match=r"generation\.server\.nccl_master_address"):
        _plan(site_file, CFG_7B, [*NCCL, "generation.server.nccl_master_address=127.0.0.1"])
    # An external server on another host (no generation node in this job) cannot reach it either.
    external = load_config(
        CFG_7B, [*NCCL, "cluster.nodes=1", "cluster.generation_nodes=0", "generation.server.url=http://gen-host:8000"]
    )
    with pytest.raises(LayoutError, match=r"generation\.server\.nccl_master_address.*http://gen-host:8000"):
        check_layout(external, str(CFG_7B))


def test_a_routable_nccl_master_is_kept(site_file):
    plan = _plan(site_file, CFG_7B, [*NCCL, "generation.server.nccl_master_address=10.1.2.3"])
    assert plan.runtime_overrides == [] and "generation.server.nccl_master_address=10.1.2.3" in plan.overrides


def test_a_site_file_cannot_switch_dev_mode_off(site_file, tmp_path):
    raw = yaml.safe_load(site_file.read_text())
    raw["env"] = {"VLLM_SERVER_DEV_MODE": "0"}
    site_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(LaunchError, match=r"env\.VLLM_SERVER_DEV_MODE"):
        _plan(site_file, CFG_7B, NCCL)


# ---- 9: models the actor refuses (and Nemotron-H, which it builds) ------------------------------


def test_nemotron_h_plans(site_file):
    plan = _plan(site_file, CFG_NEMOTRON_H)
    assert check_model_supported(plan.cfg, str(CFG_NEMOTRON_H)) == "NemotronHForCausalLM"
    layout = plan.layout
    assert (layout.tp, layout.pp, layout.dp) == (2, 1, 4) and layout.sequence_parallel
    # ~45 GiB per GPU with the Mamba layers counted (docs/cluster.md, hybrid models).
    assert 40 < layout.train_memory_gib < 50, layout.train_memory_gib
    from render_sbatch import main as render_main
    from run import main as run_main

    assert run_main([str(CFG_NEMOTRON_H), "--cluster", str(site_file), "--dry-run"]) == 0
    assert render_main([str(CFG_NEMOTRON_H), "--cluster", str(site_file)]) == 0


def test_a_qwen_7b_plan_passes(site_file):
    plan = _plan(site_file, CFG_7B)
    assert check_model_supported(plan.cfg, str(CFG_7B)) == "Qwen2ForCausalLM"


def test_a_readable_config_json_wins_over_the_table(tmp_path):
    # Named like a supported model, but the checkpoint says otherwise: the checkpoint decides.
    ckpt = tmp_path / "DeepSeek-R1-Distill-Qwen-7B"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cfg = load_config(CFG_7B, [f"policy.model.hf_path={ckpt}"])
    with pytest.raises(LayoutError, match=rf"policy\.model\.hf_path.*{re.escape(str(ckpt))}/config\.json"):
        check_model_supported(cfg, "x.yaml")
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    assert check_model_supported(cfg, "x.yaml") == "MistralForCausalLM"
    # Neither a readable checkpoint nor a table entry: left to the actor at start-up.
    assert check_model_supported(load_config(CFG_7B, [f"policy.model.hf_path={tmp_path}/Unknown-7B"])) is None


def test_every_shape_names_an_architecture_the_actor_knows():
    for name, shape in MODEL_SHAPES.items():
        assert shape.architecture in SUPPORTED_ARCHITECTURES + HYBRID_ARCHITECTURES, name


@pytest.mark.parametrize(
    "path", sorted(p for p in (CONF / "paper").rglob("*.yaml") if not p.name.startswith("_")), ids=lambda p: p.stem
)
def test_every_paper_config_plans(site_file, path):
    assert _plan(site_file, path).layout.sequence_parallel  # TP 2 / 4 with the TE spec


# ---- 10: memory arithmetic --------------------------------------------------------------------


def _estimate(tp=2, sp=True, chunk=1024, s=16384):
    return estimate_train_memory_gib(
        QWEN_7B, tp, 1, 8 // tp, s, "full", False, sequence_parallel=sp, logprob_chunk_tokens=chunk
    )


def test_sequence_parallel_divides_the_layer_inputs_only_when_on():
    on, off = _estimate(sp=True), _estimate(sp=False)
    h, layers, s = QWEN_7B.hidden_size, QWEN_7B.num_layers, 16384
    # Without SP each TP rank keeps the whole [s, h] layer input of every layer, and the layer's
    # 10 s h of replicated activations while it is recomputed: the difference at TP=2.
    expected = (layers * 2 * s * h / 2 + 10 * s * h / 2) / GIB
    assert off - on == pytest.approx(expected)
    assert _estimate(tp=1, sp=True) == _estimate(tp=1, sp=False)  # nothing to split at TP=1


def test_log_prob_chunks_bound_the_fp32_temporaries():
    small, large = _estimate(chunk=512), _estimate(chunk=4096)
    vocab_shard = 152064 / 2  # already a multiple of 128 x 2
    assert large - small == pytest.approx(4 * 4 * (4096 - 512) * vocab_shard / GIB)
    # 0 = one piece: the whole micro-batch, same as a chunk as large as (or larger than) it.
    assert _estimate(chunk=0) == _estimate(chunk=16384) == _estimate(chunk=100_000) > large


def test_the_actors_sequence_parallel_rule():
    def sp(*overrides):
        return uses_sequence_parallel(load_config(CFG_7B, list(overrides)))

    assert sp()  # TP 2, transformer_engine
    assert sp("policy.model.transformer_impl=auto")  # GPU plans: the container has TE
    assert not sp("policy.model.transformer_impl=local")
    assert not sp("policy.tensor_parallel_size=1")


def test_the_layout_check_uses_both():
    te = check_layout(load_config(CFG_7B), str(CFG_7B))
    local = check_layout(load_config(CFG_7B, ["policy.model.transformer_impl=local"]), str(CFG_7B))
    assert te.sequence_parallel and not local.sequence_parallel
    assert local.train_memory_gib > te.train_memory_gib
    # 14B at TP=2 fits only because log-probs are chunked (one piece: ~82 GiB).
    overrides = ["policy.tensor_parallel_size=2", "generation.vllm.tensor_parallel_size=2"]
    assert check_layout(load_config(CFG_14B, overrides), str(CFG_14B)).train_memory_gib < 70
    with pytest.raises(LayoutError, match=r"policy\.max_tokens_per_microbatch"):
        check_layout(load_config(CFG_14B, [*overrides, "policy.logprob_chunk_tokens=0"]), str(CFG_14B))
    with pytest.raises(LayoutError, match=r"policy\.logprob_chunk_tokens"):
        check_layout(load_config(CFG_7B, ["policy.logprob_chunk_tokens=-1"]), str(CFG_7B))


def test_hybrid_memory_counts_each_layer_kind():
    from layout import hybrid_layer_working_sets

    nh = MODEL_SHAPES["Nemotron-H-8B-Base-8K"]
    assert nh.layer_counts() == {"M": 24, "*": 4, "-": 24}
    s, h = 8192, nh.hidden_size
    sets = hybrid_layer_working_sets(nh, s, 2, 2)
    # Mamba-2: in_proj output (P = 2*8192 + 2*8*128 + 128 = 18560 channels), conv output, three
    # d-wide tensors, fp32 dt terms, chunk states and C.B^T scores; split over TP=2.
    mamba = 2 * 18560 + 2 * (8192 + 2048) + 6 * 8192 + 8 * 128 + 4 * 128 * 64 * 128 / 128 + 4 * 8 * 128
    assert sets["M"] == pytest.approx(s * (5 * h / 2 + mamba / 2))
    assert sets["-"] == pytest.approx(s * (5 * h / 2 + 6 * nh.ffn_hidden_size / 2))
    assert sets["M"] > sets["-"] > sets["*"]
    full = train_memory_terms(nh, 2, 1, 4, s, "full", False, sequence_parallel=True, logprob_chunk_tokens=1024)
    assert full.layer_working_set == pytest.approx(sets["M"] / GIB)  # the largest layer is recomputed at the peak
    kept = train_memory_terms(nh, 2, 1, 4, s, None, False, sequence_parallel=True, logprob_chunk_tokens=1024)
    assert kept.layer_inputs == pytest.approx((24 * sets["M"] + 4 * sets["*"] + 24 * sets["-"]) / GIB)
