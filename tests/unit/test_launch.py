"""The Slurm launch scripts, rendered without a cluster (nemo-run dry run and the sbatch templates),
carry the right nodes, GPUs, container, command, environment and requeue handling."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

from common import LaunchError, build_plan, load_site  # noqa: E402
from render_sbatch import render  # noqa: E402

CFG_7B = "conf/paper/deepseek_r1_distill_qwen_7b_igrpo.yaml"
CFG_14B_FP8 = "conf/paper/fp8/deepseek_r1_distill_qwen_14b_igrpo_fp8.yaml"


@pytest.fixture()
def site_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run_home"))  # nemo-run's local metadata
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "account": "acct_rl",
                "partition": "gpu_long",
                "time": "03:30:00",
                "container_image": "/shared/images/nemo-igrpo.sqsh",
                "mounts": ["/shared:/shared"],
                "job_dir": str(tmp_path / "jobs"),
                "runs_dir": "/shared/runs",
                "models_dir": "/shared/models",
                "data_dir": "/shared/data",
                "env": {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "ib0"},
                "requeue": {"max_requeues": 7, "signal_seconds_before_end": 420},
            }
        )
    )
    return path


def _plan(site_file, config, overrides=(), requeue=True):
    return build_plan(str(REPO / config), list(overrides), load_site(site_file), requeue=requeue)


def _sbatch_flags(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_nemo_run_dry_run_single_node_uses_torchrun(site_file):
    from run import render_dry_run

    # The 7B config on one node with vLLM colocated: nemo-run's Torchrun launcher directly.
    plan = _plan(site_file, CFG_7B, ["cluster=single_node_colocated", "trainer.max_steps=3"])
    script = render_dry_run(plan, packager="none")
    flags = _sbatch_flags(script)
    for flag in (
        "--account=acct_rl",
        "--partition=gpu_long",
        "--nodes=1",
        "--gpus-per-node=8",
        "--ntasks-per-node=1",
        "--time=03:30:00",
        "--signal=TERM@420",
        "--exclusive",
    ):
        assert flag in flags, (flag, flags)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image /shared/images/nemo-igrpo.sqsh" in srun
    assert "/shared:/shared" in srun
    assert "torchrun" in srun and "--nproc-per-node 8" in srun and "--nnodes 1" in srun
    assert (f"-m nemo_igrpo train /opt/nemo-igrpo/{CFG_7B} cluster=single_node_colocated trainer.max_steps=3") in srun
    for export in (
        "export NCCL_IB_HCA=mlx5_0,mlx5_1",
        "export NCCL_SOCKET_IFNAME=ib0",
        "export IGRPO_RUNS_DIR=/shared/runs",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240",
    ):
        assert export in script
    # Requeue: sbatch --requeue, and a non-zero exit (the trainer stopped by SIGTERM) is requeued
    # up to max_requeues times.
    assert "sbatch --requeue" in script and "export TORCHX_MAX_RETRIES=7" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_nemo_run_dry_run_with_a_generation_node(site_file):
    from run import render_dry_run

    plan = _plan(site_file, CFG_14B_FP8)
    script = render_dry_run(plan, packager="none")
    flags = _sbatch_flags(script)
    assert "--nodes=5" in flags and "--gpus-per-node=8" in flags
    assert "export IGRPO_TRAIN_NODES=4" in script
    assert "export IGRPO_VLLM_HOST=${IGRPO_HOSTS[4]}" in script  # the fifth node serves vLLM
    assert "export IGRPO_TRAIN_MASTER=${IGRPO_HOSTS[0]}" in script
    vllm_args = shlex.split(
        next(line for line in script.splitlines() if line.startswith("export IGRPO_VLLM_ARGS=")).split("=", 1)[1]
    )[0]
    assert vllm_args.startswith("/shared/models/DeepSeek-R1-Distill-Qwen-14B ")
    assert "--tensor-parallel-size 2 --data-parallel-size 4" in vllm_args
    assert "--gpu-memory-utilization 0.85" in vllm_args and "--max-model-len 10240" in vllm_args
    assert "--quantization fp8_per_tensor" in vllm_args  # the FP8 config generates in FP8
    # The node task: role picked per node, the config and the shared weight directory passed on.
    assert (
        "# exec bash /opt/nemo-igrpo/launch/node_entry.sh auto train "
        f"/opt/nemo-igrpo/{CFG_14B_FP8} 'generation.server.weight_sync_dir=${{run.dir}}/weight_sync'" in script
    )


def test_sbatch_hetjob_for_the_papers_14b_layout(site_file):
    plan = _plan(site_file, CFG_14B_FP8, ["trainer.max_steps=2"])
    script = render(plan, hetjob=True, config_label=CFG_14B_FP8)
    head, _, second = script.partition("#SBATCH hetjob")
    assert "#SBATCH --nodes=4" in head and "#SBATCH --nodes=1" in second
    assert head.count("#SBATCH --gpus-per-node=8") == 1 and "#SBATCH --gpus-per-node=8" in second
    assert "#SBATCH --account=acct_rl" in head and "#SBATCH --account=acct_rl" in second
    assert "#SBATCH --requeue" in head and "#SBATCH --signal=B:USR1@420" in head
    assert "max_requeues=7" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "$SLURM_JOB_NODELIST_HET_GROUP_1" in script
    assert "srun --het-group=1" in script and "node_entry.sh generate" in script
    assert ("srun --het-group=0 --kill-on-bad-exit=1 --wait=120") in script
    assert (
        f"node_entry.sh train train {CFG_14B_FP8} trainer.max_steps=2 "
        "'generation.server.weight_sync_dir=${run.dir}/weight_sync'" in script
    )
    assert "--container-image=/shared/images/nemo-igrpo.sqsh" in script
    assert "--container-mounts=/shared:/shared" in script and "--container-workdir=/opt/nemo-igrpo" in script
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_1" in script and "export IGRPO_GPUS_PER_NODE=8" in script
    assert "@@" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the script parses


def test_sbatch_single_allocation_and_no_requeue(site_file):
    plan = _plan(site_file, CFG_7B, requeue=False)
    script = render(plan)
    flags = _sbatch_flags(script)
    assert "--nodes=2" in flags and "--no-requeue" in flags and "--signal=B:USR1@420" in flags
    assert "export IGRPO_VLLM_HOST=${hosts[1]}" in script  # node 2 of 2 serves vLLM
    assert "max_requeues=0" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_node_entry_parses_and_refuses_an_unknown_role(tmp_path):
    script = REPO / "launch" / "node_entry.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # It runs, and an unknown role is an error that names it (not a silent success).
    proc = subprocess.run(
        ["bash", str(script), "nonsense-role"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0 and "nonsense-role" in (proc.stdout + proc.stderr), (proc.returncode, proc.stderr)


def test_render_sbatch_cli_refuses_a_bad_layout(site_file, capsys, tmp_path):
    from render_sbatch import main

    out = tmp_path / "job.sbatch"
    assert main([str(REPO / CFG_7B), "--cluster", str(site_file), "policy.tensor_parallel_size=8", "-o", str(out)]) == 2
    assert "policy.tensor_parallel_size" in capsys.readouterr().err and not out.exists()
    assert main([str(REPO / CFG_7B), "--cluster", str(site_file), "--requeue", "-o", str(out)]) == 0
    assert "#SBATCH --requeue" in out.read_text()
    assert (tmp_path / "jobs" / "deepseek_r1_distill_qwen_7b_igrpo" / "logs").is_dir()


def test_bad_site_file_names_the_key(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("acount: x\n")
    with pytest.raises(LaunchError, match="unknown key 'acount'.*account"):
        load_site(bad)


def test_command_line_cluster_override_beats_the_site_file(site_file):
    plan = _plan(site_file, CFG_7B, ["cluster.partition=debug"])
    assert plan.partition == "debug" and plan.account == "acct_rl"
