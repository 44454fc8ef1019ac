#!/usr/bin/env python
"""Fill launch/sbatch/*.sbatch from a run config, for clusters without nemo-run.

    python launch/render_sbatch.py CONFIG --cluster CLUSTER.yaml [overrides...] [--requeue]
        [--hetjob] [-o job.sbatch]
    sbatch job.sbatch

The config is loaded and validated and its layout checked (heads, layers, vocabulary, nodes,
memory) before anything is written, so a mistake costs a second instead of a queue wait.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_job_arguments, LAUNCH_DIR, JobPlan, LaunchError, build_plan, load_site, node_entry_env  # noqa: E402

TEMPLATES = LAUNCH_DIR / "sbatch"


def _sbatch_site_lines(plan: JobPlan) -> str:
    lines = []
    if plan.account:
        lines.append(f"#SBATCH --account={plan.account}")
    if plan.partition:
        lines.append(f"#SBATCH --partition={plan.partition}")
    if plan.qos:
        lines.append(f"#SBATCH --qos={plan.qos}")
    if plan.exclusive:
        lines.append("#SBATCH --exclusive")
    return "\n".join(lines)


def _sbatch_requeue_lines(plan: JobPlan) -> str:
    # The time-limit warning is useful even without requeueing: the trainer checkpoints.
    lines = [f"#SBATCH --signal=B:USR1@{plan.signal_seconds}"]
    lines.append("#SBATCH --requeue" if plan.requeue else "#SBATCH --no-requeue")
    return "\n".join(lines)


def container_args(plan: JobPlan) -> list[str]:
    if not plan.container_image:
        raise LaunchError("no container image: set container_image in the cluster file or cluster.container_image")
    args = [f"--container-image={plan.container_image}"]
    if plan.mounts:
        args.append(f"--container-mounts={','.join(plan.mounts)}")
    args += [f"--container-workdir={plan.code_dir}", "--no-container-mount-home"]
    return args


def job_environment(plan: JobPlan) -> dict[str, str]:
    return {**plan.env, **node_entry_env(plan)}


def render(plan: JobPlan, hetjob: bool = False, config_label: str = "") -> str:
    if hetjob and not plan.generation_nodes:
        raise LaunchError(f"{config_label}: --hetjob needs a generation node (cluster.generation_nodes=1)")
    template = (TEMPLATES / ("igrpo_hetjob.sbatch" if hetjob else "igrpo_train.sbatch")).read_text()
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(job_environment(plan).items()))
    vllm_host_line = (
        f"export IGRPO_VLLM_HOST=${{hosts[{plan.train_nodes}]}}  # the generation node" if plan.generation_nodes else ""
    )
    values = {
        "CONFIG": config_label or plan.config_path,
        "JOB_NAME": plan.name,
        "NODES": str(plan.nodes),
        "TRAIN_NODES": str(plan.train_nodes),
        "GPUS_PER_NODE": str(plan.gpus_per_node),
        "TIME": plan.time,
        "LOG_DIR": plan.log_dir,
        "SBATCH_SITE": _sbatch_site_lines(plan),
        "SBATCH_REQUEUE": _sbatch_requeue_lines(plan),
        "SIGNAL_SECONDS": str(plan.signal_seconds),
        "EXPORTS": exports,
        "VLLM_HOST_LINE": vllm_host_line,
        "CONTAINER_ARGS": " ".join(shlex.quote(a) for a in container_args(plan)),
        # Fixed overrides single-quoted; run-time ones (the NCCL master address from Slurm)
        # double-quoted so this script expands them after scontrol has named the nodes.
        "TRAINER_ARGS": plan.trainer_shell_args(),
        "MAX_REQUEUES": str(plan.max_requeues),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    if "@@" in template:
        leftover = template[template.index("@@") :].split("@@")[1]
        raise LaunchError(f"template placeholder @@{leftover}@@ has no value")
    return template


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--hetjob", action="store_true", help="heterogeneous job: the vLLM node is its own component")
    p.add_argument("--name", help="job name (default: run.name)")
    p.add_argument("-o", "--output", help="write the script here (default: stdout)")
    args = p.parse_intermixed_args(argv)
    try:
        site = load_site(args.cluster)
        plan = build_plan(args.config, args.overrides, site, requeue=args.requeue, name=args.name)
        script = render(plan, hetjob=args.hetjob, config_label=args.config)
    except LaunchError as e:
        print(f"render_sbatch: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        # Slurm does not create the --output folder; a job whose log folder is missing fails silently.
        Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(script)
        print(
            f"wrote {args.output}: {plan.nodes} node(s) x {plan.gpus_per_node} GPUs, TP={plan.layout.tp} "
            f"PP={plan.layout.pp} DP={plan.layout.dp}; submit with: sbatch {args.output}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
