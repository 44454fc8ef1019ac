"""The root configuration object. Each module owns its own section's dataclass; this file
composes them and holds the sections that belong to the run as a whole.

Public key paths (kept stable for users' scripts): run.dir, seed, trainer.max_steps,
algorithm.num_drafts, algorithm.num_refinements, policy.tensor_parallel_size,
policy.pipeline_parallel_size, generation.backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.data.config import DataConfig
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.policy.config import PolicyConfig
from nemo_igrpo.rewards.config import RewardConfig


@dataclass
class RunConfig:
    name: str = "igrpo"
    dir: str = "runs/${run.name}"


@dataclass
class TrainerConfig:
    max_steps: int = 100
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    save_every: int = 0  # 0: save only at the end (and on SIGTERM / repeated NaN)
    keep_last_k: int = 2
    # A step whose loss or gradients are NaN/Inf skips its update; this many in a row stop
    # the run with a checkpoint and a clear message.
    max_consecutive_nonfinite: int = 3
    progress_bars: bool = True
    # Write the final policy as a Hugging Face directory (<run.dir>/hf) when the run completes.
    export_hf: bool = True


@dataclass
class EvalConfig:
    """Single-shot evaluation, as the model is deployed (no draft)."""

    num_samples: int = 1  # Pass@1 averaged over this many samples per problem
    temperature: float = 0.6  # paper's evaluation settings
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # None: generation.max_new_tokens
    pass_k: list[int] = field(default_factory=lambda: [1])


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nemo-igrpo"
    wandb_entity: Optional[str] = None
    # quiet: the terminal shows the project's own lines (progress bar, one line per step,
    # evaluation, errors); other libraries' output goes to <run.dir>/logs/rank<R>.log.
    # verbose: everything on the terminal (same as --verbose). docs/logging.md.
    console: str = "quiet"
    # Prompts per step whose drafts, chosen draft, refinements, rewards and advantages go to
    # <run.dir>/samples.jsonl (and TensorBoard text / a W&B table when those are on); 0: none.
    samples_per_step: int = 2
    # samples.jsonl stops growing at this size (one warning); `igrpo samples RUN_DIR` reads it.
    samples_max_mb: float = 50.0


@dataclass
class ClusterConfig:
    """Where the job runs. Used by launch/ to render Slurm scripts; ignored by local runs."""

    nodes: int = 1
    gpus_per_node: int = 0
    # Nodes reserved for a separate generation server (the paper's layout: 1 of 2 for 7B).
    generation_nodes: int = 0
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: str = "04:00:00"
    container_image: Optional[str] = None
    mounts: list[str] = field(default_factory=list)


@dataclass
class IGRPOConfig:
    seed: int = 1234
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
