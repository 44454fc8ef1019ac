"""What both launchers share: the site file, the checked job plan, the environment, the commands.

`launch/run.py` (nemo-run) and `launch/render_sbatch.py` (plain sbatch) turn the same JobPlan into
a Slurm script, so the two paths cannot drift apart on nodes, environment or commands.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

LAUNCH_DIR = Path(__file__).resolve().parent
REPO = LAUNCH_DIR.parent
if str(LAUNCH_DIR) not in sys.path:
    sys.path.insert(0, str(LAUNCH_DIR))

from layout import Layout, LayoutError, check_layout, check_model_supported, is_loopback  # noqa: E402

from nemo_igrpo.config.loader import ConfigError, load_config  # noqa: E402
from nemo_igrpo.config.schema import IGRPOConfig  # noqa: E402

# Where the trainer listens for its vLLM server, and the rendezvous port of the trainer's nodes.
VLLM_PORT = 8000
RDZV_PORT = 29500
# The batch script sets this to the first training node's Slurm hostname (scontrol show hostnames);
# torchrun's rank 0 runs there (launch/node_entry.sh), which makes it the NCCL weight-sync master.
TRAIN_MASTER_VAR = "IGRPO_TRAIN_MASTER"
# vLLM 0.32's `vllm serve` flag for its RL weight-transfer engine (vllm/engine/arg_utils.py,
# vllm/config/weight_transfer.py); /init_weight_transfer_engine and /update_weights need it.
NCCL_WEIGHT_TRANSFER_ARGS = ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
# Weight syncs whose endpoints vLLM registers only with VLLM_SERVER_DEV_MODE=1
# (vllm/entrypoints/launchers/api_server/routers.py: dev and RL routers).
DEV_MODE_WEIGHT_SYNCS = ("reload_from_dir", "nccl")

# Environment every job gets; a site file's `env` adds to or replaces these.
DEFAULT_ENV: dict[str, str] = {
    # megatron-core overlaps TP communication with compute only with one hardware queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective fails the job instead of idling it
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # fewer fragmentation OOMs with varying lengths
    # torchrun forwards SIGTERM to the trainers and kills them after this many seconds: leave time
    # for the pre-emption checkpoint (the default, 30 s, is short for a 7B optimizer state).
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "240",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # compute nodes read checkpoints from shared storage, not the hub
    "PYTHONUNBUFFERED": "1",
    # `vllm serve` exposes its weight-reload / cache-reset endpoints only in dev mode; the trainer
    # needs them to push new weights after every step.
    "VLLM_SERVER_DEV_MODE": "1",
}


class LaunchError(ValueError):
    """A problem with the launch inputs (site file, layout, arguments); printed without a traceback."""


@dataclass
class RequeueConfig:
    max_requeues: int = 10
    # Slurm sends SIGTERM this long before the time limit, so the trainer can checkpoint.
    signal_seconds_before_end: int = 300


@dataclass
class SiteConfig:
    """One cluster's settings (a YAML file passed as --cluster); see launch/clusters/example.yaml."""

    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    container_image: Optional[str] = None
    mounts: list[str] = field(default_factory=list)
    job_dir: str = "~/nemo-igrpo/jobs"  # generated scripts and Slurm logs
    runs_dir: Optional[str] = None  # IGRPO_RUNS_DIR: run directories (checkpoints, metrics)
    models_dir: Optional[str] = None  # IGRPO_MODELS_DIR
    data_dir: Optional[str] = None  # IGRPO_DATA_DIR
    code_dir: str = "/opt/nemo-igrpo"  # the repository inside the container image
    gpus_per_node: Optional[int] = None  # overrides cluster.gpus_per_node (e.g. 4-GPU nodes)
    gpu_memory_gib: float = 80.0
    exclusive: bool = True
    env: dict[str, str] = field(default_factory=dict)
    requeue: RequeueConfig = field(default_factory=RequeueConfig)


def load_site(path: str | os.PathLike) -> SiteConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise LaunchError(f"cluster file not found: {path}") from None
    except yaml.YAMLError as e:
        raise LaunchError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LaunchError(f"{path}: the top level must be a mapping")
    known = {f.name for f in fields(SiteConfig)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise LaunchError(f"{path}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    requeue = raw.pop("requeue", None) or {}
    if not isinstance(requeue, dict) or set(requeue) - {f.name for f in fields(RequeueConfig)}:
        raise LaunchError(f"{path}: 'requeue' takes max_requeues and signal_seconds_before_end")
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise LaunchError(f"{path}: 'env' must be a mapping of NAME: value")
    raw["env"] = {str(k): str(v) for k, v in env.items()}
    if not isinstance(raw.get("mounts", []) or [], list):
        raise LaunchError(f"{path}: 'mounts' must be a list of SRC:DST strings")
    site = SiteConfig(
        **{k: v for k, v in raw.items() if v is not None or k in ("qos",)}, requeue=RequeueConfig(**requeue)
    )
    for name in ("job_dir", "runs_dir", "models_dir", "data_dir", "container_image"):
        value = getattr(site, name)
        if isinstance(value, str):
            setattr(site, name, os.path.expanduser(os.path.expandvars(value)))
    site.mounts = [os.path.expandvars(m) for m in (site.mounts or [])]
    return site


@dataclass
class JobPlan:
    """Everything a Slurm script needs, derived from a run config, overrides and a site file."""

    name: str
    config_path: str  # as the trainer sees it inside the container (relative to the code dir)
    overrides: list[str]
    cfg: IGRPOConfig
    layout: Layout
    nodes: int
    train_nodes: int
    generation_nodes: int
    gpus_per_node: int
    account: Optional[str]
    partition: Optional[str]
    qos: Optional[str]
    time: str
    container_image: Optional[str]
    mounts: list[str]
    env: dict[str, str]
    job_dir: str
    code_dir: str
    exclusive: bool
    requeue: bool
    max_requeues: int
    signal_seconds: int
    vllm_serve_args: list[str] = field(default_factory=list)
    # Trainer overrides whose values the job script fills in from Slurm at run time: each holds a
    # shell variable and is double-quoted in the script (e.g. the NCCL master address).
    runtime_overrides: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> str:
        return os.path.join(self.job_dir, self.name, "logs")

    def trainer_args(self) -> list[str]:
        """Arguments of `python -m nemo_igrpo train` (the config and every override known now)."""
        return ["train", self.config_path, *self.overrides]

    def trainer_shell_args(self, args: Optional[list[str]] = None) -> str:
        """trainer_args (or `args`) as shell words: fixed ones single-quoted, run-time ones
        double-quoted so the script expands their variables on the node."""
        fixed = " ".join(shlex.quote(a) for a in (self.trainer_args() if args is None else args))
        return " ".join([fixed, *(f'"{o}"' for o in self.runtime_overrides)])


def _explicit_cluster_overrides(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.startswith("cluster.") and "=" in o}


def vllm_serve_args(cfg: IGRPOConfig, gpus_per_node: int) -> list[str]:
    """`vllm serve` arguments for a generation node, from the run config."""
    g, v = cfg.generation, cfg.generation.vllm
    args = [
        cfg.policy.model.hf_path or "",
        "--host",
        "0.0.0.0",
        "--port",
        str(VLLM_PORT),
        "--served-model-name",
        g.server.model_name or Path(cfg.policy.model.hf_path or "model").name,
        "--tensor-parallel-size",
        str(v.tensor_parallel_size),
        # One engine per TP group on the node; the server balances requests across them.
        "--data-parallel-size",
        str(gpus_per_node // v.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(v.gpu_memory_utilization),
        "--dtype",
        "bfloat16" if v.dtype == "auto" else v.dtype,
        "--seed",
        str(cfg.seed),
        # The trainer's importance ratio needs the log-probs the sampler actually used (see
        # generation.logprobs_mode).
        "--logprobs-mode",
        g.logprobs_mode,
    ]
    if v.max_model_len:
        args += ["--max-model-len", str(v.max_model_len)]
    if v.max_num_seqs:
        args += ["--max-num-seqs", str(v.max_num_seqs)]
    if v.quantization:
        args += ["--quantization", v.quantization]  # FP8 generation (vLLM re-quantizes each sync)
    args.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if v.enforce_eager:
        args.append("--enforce-eager")
    if g.server.weight_sync == "nccl":
        # The trainer's rank 0 broadcasts each bucket to the server's workers over NCCL.
        args += NCCL_WEIGHT_TRANSFER_ARGS
    return args


def _override_given(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == key for o in overrides if "=" in o)


def build_plan(
    config: str,
    overrides: list[str],
    site: SiteConfig,
    *,
    requeue: bool = False,
    name: Optional[str] = None,
    code_dir: Optional[str] = None,
) -> JobPlan:
    """Load and validate the run config, check its layout, and merge it with the site file.

    Site values (account, partition, time, container, mounts) come from the site file, then from
    the run config's `cluster` section; a `cluster.X=...` given on the command line wins over both.
    """
    # Resolve ${oc.env:IGRPO_*} paths the way the job will see them.
    job_env = {"IGRPO_RUNS_DIR": site.runs_dir, "IGRPO_MODELS_DIR": site.models_dir, "IGRPO_DATA_DIR": site.data_dir}
    saved = {k: os.environ.get(k) for k in job_env}
    try:
        os.environ.update({k: v for k, v in job_env.items() if v})
        if site.gpus_per_node is not None and "cluster.gpus_per_node" not in " ".join(overrides):
            overrides = [*overrides, f"cluster.gpus_per_node={site.gpus_per_node}"]
        try:
            cfg = load_config(config, overrides, import_reward_terms=False)
        except ConfigError as e:
            raise LaunchError(str(e)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c, server = cfg.cluster, cfg.generation.server
    # NCCL weight sync to a generation node: the trainer must open the rendezvous on an address
    # that node reaches. The launcher passes the first training node's hostname at run time,
    # unless the config names a routable address itself; a loopback address given explicitly on
    # the command line is refused (check_layout names the key).
    nccl_address_key = "generation.server.nccl_master_address"
    fill_nccl_address = bool(
        c.generation_nodes
        and cfg.generation.backend == "vllm_server"
        and server.weight_sync == "nccl"
        and is_loopback(server.nccl_master_address)
        and not _override_given(overrides, nccl_address_key)
    )
    try:
        check_model_supported(cfg, source=str(config))
        layout = check_layout(
            cfg, source=str(config), gpu_memory_gib=site.gpu_memory_gib, fills_nccl_master_address=fill_nccl_address
        )
    except LayoutError as e:
        raise LaunchError(str(e)) from None
    if c.generation_nodes > 1:
        raise LaunchError(
            f"{config}: 'cluster.generation_nodes': these launchers start one `vllm serve` node; "
            f"got {c.generation_nodes} (raise generation.vllm.tensor_parallel_size or run more servers yourself)"
        )
    if c.generation_nodes and not cfg.policy.model.hf_path:
        raise LaunchError(f"{config}: 'policy.model.hf_path': a vLLM server node needs a checkpoint to serve")
    explicit = _explicit_cluster_overrides(overrides)

    def pick(site_value: Any, cfg_key: str) -> Any:
        cfg_value = getattr(c, cfg_key)
        if cfg_key in explicit or site_value in (None, [], ""):
            return cfg_value
        return site_value

    runtime_overrides: list[str] = []
    if (
        c.generation_nodes
        and server.weight_sync == "reload_from_dir"
        and not _override_given(overrides, "generation.server.weight_sync_dir")
    ):
        # The server node reads the pushed weights from the run directory on shared storage.
        overrides = [*overrides, "generation.server.weight_sync_dir=${run.dir}/weight_sync"]
    if fill_nccl_address:
        runtime_overrides.append(f"{nccl_address_key}=${{{TRAIN_MASTER_VAR}:?}}")
        if not _override_given(overrides, "generation.server.nccl_master_port"):
            overrides = [*overrides, f"generation.server.nccl_master_port={server.nccl_master_port}"]
    env = dict(DEFAULT_ENV)
    env.update({k: v for k, v in job_env.items() if v})
    env.update(site.env)
    if c.generation_nodes and server.weight_sync in DEV_MODE_WEIGHT_SYNCS and env.get("VLLM_SERVER_DEV_MODE") != "1":
        raise LaunchError(
            f"cluster file: 'env.VLLM_SERVER_DEV_MODE' is {env.get('VLLM_SERVER_DEV_MODE')!r}; "
            f"generation.server.weight_sync={server.weight_sync} needs the server's development endpoints "
            "(VLLM_SERVER_DEV_MODE=1)"
        )
    config_rel = _path_in_code_dir(config)
    code_dir = code_dir or site.code_dir
    mounts = list(
        dict.fromkeys([*(pick(site.mounts, "mounts") or []), *(c.mounts if "mounts" not in explicit else [])])
    )
    return JobPlan(
        name=name or cfg.run.name,
        config_path=config_rel,
        overrides=list(overrides),
        cfg=cfg,
        layout=layout,
        nodes=c.nodes,
        train_nodes=layout.train_nodes,
        generation_nodes=c.generation_nodes,
        gpus_per_node=c.gpus_per_node,
        account=pick(site.account, "account"),
        partition=pick(site.partition, "partition"),
        qos=site.qos,
        time=pick(site.time, "time_limit"),
        container_image=pick(site.container_image, "container_image"),
        mounts=mounts,
        env=env,
        job_dir=site.job_dir,
        code_dir=code_dir,
        exclusive=site.exclusive,
        requeue=requeue,
        max_requeues=site.requeue.max_requeues if requeue else 0,
        signal_seconds=site.requeue.signal_seconds_before_end,
        vllm_serve_args=vllm_serve_args(cfg, c.gpus_per_node) if c.generation_nodes else [],
        runtime_overrides=runtime_overrides,
    )


def _path_in_code_dir(config: str) -> str:
    """The config's path relative to the repository root (the trainer's working directory)."""
    path = Path(config).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        raise LaunchError(
            f"{config}: the config must live inside the repository ({REPO}) so the job can find it "
            "at the same relative path in the container"
        ) from None


def node_entry_env(plan: JobPlan) -> dict[str, str]:
    """Variables launch/node_entry.sh reads to pick its role and build the torchrun / vllm command."""
    env = {
        "IGRPO_TRAIN_NODES": str(plan.train_nodes),
        "IGRPO_GPUS_PER_NODE": str(plan.gpus_per_node),
        "IGRPO_RDZV_PORT": str(RDZV_PORT),
    }
    if plan.generation_nodes:
        env["IGRPO_VLLM_PORT"] = str(VLLM_PORT)
        env["IGRPO_VLLM_ARGS"] = shlex.join(plan.vllm_serve_args)
    return env


def quote_overrides(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments both launchers (run.py, render_sbatch.py) take."""
    p.add_argument("config", help="run config, e.g. conf/paper/deepseek_r1_distill_qwen_7b_igrpo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed to the trainer (trainer.max_steps=20)")
    p.add_argument("--cluster", required=True, help="site file (see launch/clusters/example.yaml)")
    p.add_argument("--requeue", action="store_true", help="requeue after pre-emption / time limit; the run resumes")
