#!/usr/bin/env python
"""Launch a nemo-igrpo run on Slurm through nemo-run (SlurmExecutor + torchrun, in a container).

    python launch/run.py CONFIG --cluster CLUSTER.yaml [overrides...] [--requeue] [--dry-run]

  --dry-run     print the sbatch script nemo-run would submit; needs no cluster (CI renders it)
  --requeue     requeue after pre-emption or the time limit; the trainer checkpoints on SIGTERM
                and resumes from its run directory on restart
  --ssh HOST    submit from this machine through an SSH tunnel to HOST (default: local sbatch)

Layouts without a generation node use nemo-run's Torchrun launcher directly. With a generation
node (the paper's 1 + 1 and 4 + 1 layouts) the job is one allocation whose nodes pick their role in
launch/node_entry.sh: nemo-run 0.11's heterogeneous mode applies the first task's launcher to
every component and rendezvouses torchrun on localhost, which cannot run a multi-node trainer.
For a real Slurm heterogeneous job use launch/render_sbatch.py --hetjob.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_job_arguments, REPO, JobPlan, LaunchError, build_plan, load_site, node_entry_env  # noqa: E402

NEMO_RUN_WORKDIR = "/nemo_run/code"  # where nemo-run's packager unpacks the repository snapshot


def _in_git_repo() -> bool:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "true"


def _host_setup_lines(plan: JobPlan) -> str:
    """Run by the batch script outside the container (where scontrol exists); srun exports them."""
    lines = [
        'IGRPO_HOSTS=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        "export IGRPO_TRAIN_MASTER=${IGRPO_HOSTS[0]}",
    ]
    if plan.generation_nodes:
        lines.append(f"export IGRPO_VLLM_HOST=${{IGRPO_HOSTS[{plan.train_nodes}]}}")
    return "\n".join(lines)


def build_experiment(plan: JobPlan, packager: str, ssh_host: str | None = None):
    """Return (nemo_run.Script, nemo_run.SlurmExecutor) for the plan."""
    import nemo_run as run

    if not plan.container_image:
        raise LaunchError("no container image: set container_image in the cluster file or cluster.container_image")
    if packager == "git":
        # The committed repository is copied next to the job and becomes the working directory,
        # so configs are found at their repository paths and the snapshot's code is imported.
        pkg = run.GitArchivePackager()
        code_dir = NEMO_RUN_WORKDIR
    else:
        pkg = run.Packager()  # nothing copied: the image's copy of the repository is used
        code_dir = plan.code_dir
    if ssh_host:
        user, _, host = ssh_host.rpartition("@")
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=plan.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=plan.job_dir)

    # nemo-run writes `export NAME=value` without quoting: quote values here.
    env = {k: shlex.quote(v) for k, v in {**plan.env, **node_entry_env(plan)}.items()}
    executor = run.SlurmExecutor(
        account=plan.account or "",
        partition=plan.partition,
        qos=plan.qos,
        nodes=plan.nodes,
        ntasks_per_node=1,
        gpus_per_node=plan.gpus_per_node,
        time=plan.time,
        exclusive=plan.exclusive or None,
        container_image=plan.container_image,
        container_mounts=list(plan.mounts),
        env_vars=env,
        tunnel=tunnel,
        packager=pkg,
        # SIGTERM to the job step before the time limit: torchrun forwards it to the trainers,
        # which checkpoint; nemo-run's script requeues a job whose step exited non-zero.
        signal=f"TERM@{plan.signal_seconds}",
        job_name_prefix="igrpo-",
    )
    executor.retries = plan.max_requeues
    trainer_args = plan.trainer_args()
    if packager != "git":
        trainer_args[1] = f"{code_dir}/{plan.config_path}"
    if plan.generation_nodes:
        executor.setup_lines = _host_setup_lines(plan)
        entry = f"{code_dir}/launch/node_entry.sh"
        # Run-time overrides (the NCCL master address) stay double-quoted: each node's shell
        # expands them from the variables the setup lines exported before srun.
        script = run.Script(inline=f"cd {code_dir}\nexec bash {entry} auto {plan.trainer_shell_args(trainer_args)}\n")
    else:
        if plan.runtime_overrides:
            # build_plan makes them only for generation-node layouts; the Torchrun launcher has no
            # shell of ours in which to expand them.
            raise LaunchError(f"internal: run-time overrides {plan.runtime_overrides} without a generation node")
        executor.launcher = run.Torchrun(rdzv_port=29500)
        executor.torchrun_nproc_per_node = plan.gpus_per_node
        script = run.Script(path="nemo_igrpo", entrypoint="python", m=True, args=trainer_args)
    return script, executor


def render_dry_run(plan: JobPlan, packager: str = "none") -> str:
    """The sbatch script nemo-run would submit, rendered without a cluster."""
    import nemo_run as run

    script, executor = build_experiment(plan, packager)
    # nemo-run's local tunnel runs shell commands through `invoke`, which reads stdin; give it an
    # empty one so a dry run also works where stdin is closed or captured (CI, pytest).
    saved_stdin = sys.stdin
    try:
        with open(os.devnull) as devnull:
            sys.stdin = devnull
            with run.Experiment(plan.name, executor=executor, log_level="WARN") as exp:
                exp.add(script, name=plan.name)
                exp.dryrun(log=False)
                text = exp.jobs[0]._dryrun_info.request.materialize()
    finally:
        sys.stdin = saved_stdin
    if script.inline:
        # nemo-run stores an inline task in the job directory; show it, it is what each node runs.
        text += "\n# ---- task script (nemo-run writes it to /nemo_run/scripts/) ----\n"
        text += "".join(f"# {line}\n" for line in script.inline.splitlines())
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument(
        "--packager",
        choices=["git", "none"],
        default=None,
        help="git: snapshot the committed repository into the job (default inside a git work tree); "
        "none: use the repository copy inside the image",
    )
    p.add_argument("--ssh", metavar="[USER@]HOST", help="submit through an SSH tunnel to this login node")
    p.add_argument("--name", help="job name (default: run.name)")
    args = p.parse_intermixed_args(argv)
    try:
        site = load_site(args.cluster)
        plan = build_plan(args.config, args.overrides, site, requeue=args.requeue, name=args.name)
        packager = args.packager or ("git" if _in_git_repo() else "none")
        if args.dry_run:
            sys.stdout.write(render_dry_run(plan, packager))
            return 0
        import nemo_run as run

        script, executor = build_experiment(plan, packager, args.ssh)
        print(
            f"[launch] {plan.name}: {plan.nodes} node(s) x {plan.gpus_per_node} GPUs "
            f"({plan.train_nodes} training, TP={plan.layout.tp} PP={plan.layout.pp} DP={plan.layout.dp}; "
            f"{plan.generation_nodes} vLLM), logs in {plan.job_dir}",
            file=sys.stderr,
        )
        with run.Experiment(plan.name, executor=executor) as exp:
            exp.add(script, name=plan.name)
            exp.run(detach=True)
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
