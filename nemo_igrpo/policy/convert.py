"""`igrpo convert`: Hugging Face <-> Megatron dist-checkpoint, through megatron-bridge.

hf-to-megatron writes a dist-checkpoint of the model weights (layout-free: it loads under any
TP/PP) plus a copy of the HF config and tokenizer (`hf_template/`) so it can be exported back
without the original directory. megatron-to-hf reads either such a weights checkpoint or a
training checkpoint written by MegatronActor.save_checkpoint (a run directory picks its latest
complete `checkpoints/step_N`), and writes an HF directory that transformers and vLLM load.
Run it as a single process, or under torchrun with --tensor/--pipeline-parallel-size.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from nemo_igrpo.policy import cpu_compat
from nemo_igrpo.policy.config import ModelConfig, PolicyConfig
from nemo_igrpo.utils import collectives

WEIGHTS_FORMAT = "nemo_igrpo.megatron_weights.v1"
HF_TEMPLATE_FILES = re.compile(
    r"(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|.*\.jinja|vocab\..*|merges\.txt"
    r"|configuration_.*\.py|modeling_.*\.py)$"
)
# Remote-code files a checkpoint's config.json may name in `auto_map` (Nemotron-H ships
# configuration_nemotron_h.py / modeling_nemotron_h.py, and megatron-bridge's export writes that
# auto_map): carried to the exported directory so it loads with trust_remote_code as well.
REMOTE_CODE_FILES = re.compile(r"(configuration|modeling)_.*\.py$")


def _policy_cfg(hf_dir: str, tp: int, pp: int, base: Optional[PolicyConfig] = None) -> PolicyConfig:
    cfg = base if base is not None else PolicyConfig()
    cfg.model = ModelConfig(hf_path=hf_dir, transformer_impl=cfg.model.transformer_impl)
    cfg.tensor_parallel_size, cfg.pipeline_parallel_size = tp, pp
    # Conversion is exact in fp32; it must not depend on the run's training precision.
    cfg.precision, cfg.fp8 = "fp32", None
    return cfg


def _build(cfg: PolicyConfig, load_weights: bool):
    from nemo_igrpo.policy.distributed import init_parallel_state
    from nemo_igrpo.policy.model import build_model

    init_parallel_state(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, seed=0)
    return build_model(cfg, cfg.model.hf_path, trainable=False, load_weights=load_weights)


def hf_to_megatron(src: str, dst: str, tp: int = 1, pp: int = 1) -> None:
    from megatron.core import dist_checkpointing

    from nemo_igrpo.policy.checkpoint import replace_dir
    from nemo_igrpo.policy.model import unwrap

    built = _build(_policy_cfg(src, tp, pp), load_weights=True)
    out = Path(dst)
    tmp = out.with_name(out.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "hf_template").mkdir(parents=True)
        for f in Path(src).iterdir():
            if f.is_file() and HF_TEMPLATE_FILES.match(f.name):
                shutil.copy2(f, tmp / "hf_template" / f.name)
    collectives.barrier()
    state = {
        "model": unwrap(built.chunks[0]).sharded_state_dict(),
        "meta": {"format": WEIGHTS_FORMAT, "hf_path": str(Path(src).resolve())},
    }
    with cpu_compat.cuda_to_cpu():
        dist_checkpointing.save(state, str(tmp))
    collectives.barrier()
    if dist.get_rank() == 0:
        replace_dir(tmp, out)
    collectives.barrier()


def find_checkpoint(src: str | Path) -> Path:
    """A dist-checkpoint dir itself, or the latest complete checkpoints/step_N of a run dir."""
    src = Path(src)
    if (src / "metadata.json").is_file():
        return src
    steps = []
    for d in (src / "checkpoints").glob("step_*") if (src / "checkpoints").is_dir() else []:
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "metadata.json").is_file():
            steps.append((int(m.group(1)), d))
    if not steps:
        raise FileNotFoundError(
            f"{src}: neither a Megatron dist-checkpoint (metadata.json) nor a run directory with checkpoints/step_N"
        )
    return max(steps)[1]


def megatron_to_hf(
    src: str, dst: str, hf_template: Optional[str] = None, tp: int = 1, pp: int = 1, base: Optional[PolicyConfig] = None
) -> None:
    from megatron.core import dist_checkpointing

    from nemo_igrpo.policy.checkpoint import CHECKPOINT_FORMAT, replace_dir
    from nemo_igrpo.policy.distributed import init_process_group
    from nemo_igrpo.policy.model import unwrap

    ckpt = find_checkpoint(src)
    cpu_compat.enable()
    init_process_group()
    with cpu_compat.cuda_to_cpu():
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    meta = common.get("meta", {})
    if meta.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        raise ValueError(f"{ckpt}: not a nemo_igrpo checkpoint (format {meta.get('format')!r})")
    template = hf_template
    if template is None and (ckpt / "hf_template" / "config.json").is_file():
        template = str(ckpt / "hf_template")
    if template is None and base is not None and base.model.hf_path:
        template = base.model.hf_path
    if template is None:
        template = meta.get("hf_path")
    if not template or not (Path(template) / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt}: no HF template to describe the model (tried --hf-template, hf_template/, the config's "
            f"policy.model.hf_path, and the recorded {meta.get('hf_path')!r}); pass --hf-template DIR"
        )
    built = _build(_policy_cfg(template, tp, pp, base), load_weights=False)
    model = unwrap(built.chunks[0])
    with cpu_compat.cuda_to_cpu():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        model.load_state_dict(loaded["model"], strict=True)
    out = Path(dst)
    tmp = out.with_name(out.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    with cpu_compat.cuda_to_cpu():
        built.bridge.save_hf_pretrained(built.chunks, str(tmp), show_progress=False)
    collectives.barrier()
    if dist.get_rank() == 0:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(template).save_pretrained(str(tmp))
        for f in Path(template).iterdir():
            if f.is_file() and REMOTE_CODE_FILES.match(f.name) and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, out)
    collectives.barrier()


def run_convert_cli(args) -> int:
    """Entry point of `igrpo convert` (argparse namespace from nemo_igrpo.cli)."""
    from nemo_igrpo.utils.errors import UserError

    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    try:
        if args.direction == "hf-to-megatron":
            hf_to_megatron(args.source, args.target, tp, pp)
        else:
            base = None
            config_path = args.config
            if config_path is None and (Path(args.source) / "config.yaml").is_file():
                config_path = str(Path(args.source) / "config.yaml")
            if config_path is not None:
                from nemo_igrpo.config import load_config

                base = load_config(config_path, []).policy
            megatron_to_hf(args.source, args.target, args.hf_template, tp, pp, base)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    if dist.get_rank() == 0:
        print(f"wrote {args.target}")
    return 0
