"""Configuration of training and evaluation data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # JSONL / Parquet file, or a Hugging Face dataset saved to a local directory.
    train_path: str = "???"
    eval_path: Optional[str] = None
    prompt_key: str = "problem"
    answer_key: str = "answer"
    split: str = "train"  # for Hugging Face dataset directories
    prompts_per_step: int = 16
    shuffle: bool = True
    # Wrap each problem in the tokenizer's chat template (with algorithm.template.system_prompt).
    apply_chat_template: bool = True
    max_eval_samples: Optional[int] = None
