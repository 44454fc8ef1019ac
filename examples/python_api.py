"""The Python API in one script: prepare a benchmark, load and override a config, train with a
plug-in loss and advantage (examples/plugins), evaluate single-shot, and run an evaluation suite.

    PYTHONPATH=examples/plugins .venv/bin/python examples/python_api.py MODEL_DIR GSM8K_TEST.parquet [key=value ...]

MODEL_DIR: a Hugging Face model folder (a small one: this trains for two steps on CPU);
GSM8K_TEST: GSM8K's test split as published (parquet, JSONL or a saved HF dataset folder);
key=value: further config overrides (a base model without a chat template, or one with a short
context, wants `data.apply_chat_template=false algorithm.template.system_prompt=null`).
Everything goes under runs/api_example/ in the working directory. The same steps on the command line:

    igrpo data prepare gsm8k GSM8K_TEST runs/api_example/benchmarks
    igrpo train conf/base.yaml policy.model.hf_path=MODEL_DIR data.train_path=... algorithm.policy_loss=...
    igrpo eval conf/base.yaml --checkpoint runs/api_example/run --suite SUITE.yaml --data-dir runs/api_example/benchmarks
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemo_igrpo import api

BASE_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "base.yaml"  # the paper's settings


def main(model_dir: str, gsm8k_source: str, extra: list[str]) -> None:
    work = Path("runs/api_example")
    # 1. The benchmark, in this project's JSONL (answer after '####', commas removed).
    prepared = api.prepare_data("gsm8k", gsm8k_source, work / "benchmarks")
    print(prepared.summary())

    # 2. A config: the base file plus overrides, as lists of key=value or as a mapping.
    cfg = api.load_config(
        BASE_CONFIG,
        [f"policy.model.hf_path={model_dir}", f"data.train_path={prepared.output}", f"run.dir={work / 'run'}", *extra],
    )
    cfg = api.override(
        cfg,
        {
            "trainer.max_steps": 2,
            "data.prompts_per_step": 2,
            "generation.backend": "megatron",  # the cheapest generator on CPU
            "generation.max_new_tokens": 64,
            # Plug-ins by import path (examples/plugins must be on PYTHONPATH): checked right here,
            # at override time, like every other key.
            "algorithm.policy_loss": "my_igrpo_plugins.losses:unclipped_pg",
            "algorithm.advantage": "my_igrpo_plugins.advantages:rank_advantage",
            "algorithm.loss_aggregation": "my_igrpo_plugins.losses:seq_mean_token_sqrt",
        },
    )
    print(api.to_yaml(cfg))

    # 3. Train (a rerun resumes from the run's latest checkpoint).
    result = api.train(cfg)
    print(f"trained to step {result.last_step}")

    # 4. Single-shot evaluation of the trained policy on one file.
    cfg = api.override(cfg, {"eval.num_samples": 2, "eval.pass_k": [1, 2]})
    for r in api.evaluate(cfg, checkpoint=cfg.run.dir, benchmarks=[prepared.output]):
        print(
            f"{r.name}: Pass@1 {100 * r.accuracy:.1f}% over {r.num_samples} samples, pass@2 {100 * r.pass_at_k[2]:.1f}%"
        )

    # 5. Before and after, side by side, on a suite of the prepared files (the paper's suite
    # is suite="paper", given every benchmark of its table in data_dir).
    suite = work / "suite.yaml"
    suite.write_text("name: gsm8k_only\nbenchmarks:\n  - {name: gsm8k, title: GSM8K, num_samples: 2}\n")
    report = api.evaluate_suite(
        cfg, [model_dir, cfg.run.dir], suite=str(suite), data_dir=work / "benchmarks", labels=["before", "after"]
    )
    print(report.table())


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
