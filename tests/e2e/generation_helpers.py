"""Reference computations for the generation tests, done with Hugging Face transformers (the
independent implementation every backend is checked against)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[t] | prompt + completion[:t]) at temperature 1: what the trainer recomputes."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def updated_model_dir(tmp_dir: Path, arch: str = "qwen2", **kwargs) -> Path:
    """Same architecture as the conftest's tiny model, other random weights (seed 1)."""
    from helpers import tiny_hf_model

    return tiny_hf_model(tmp_dir, arch=arch, seed=1, **kwargs)


def state_dict_stream(model_dir: Path):
    """(name, tensor) pairs from a safetensors checkpoint, as the trainer's HF export yields them."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
