#!/usr/bin/env bash
# Run on one GPU node inside the image to check what a build machine cannot (no GPU driver there):
#   srun -N1 --gpus-per-node=1 --container-image=nemo-igrpo.sqsh bash /opt/nemo-igrpo/containers/check_image.sh
set -euo pipefail
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no GPU visible"
import transformer_engine.pytorch as te
from transformer_engine.pytorch.fp8 import check_fp8_support
import megatron.core, megatron.bridge, vllm, nemo_igrpo  # noqa: F401
ok, why = check_fp8_support()
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; TE FP8 available: {ok} {why or ''}")
# One TE layer forward/backward in bf16 and (where supported) FP8.
layer = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
layer(x).sum().backward()
if ok:
    with te.fp8_autocast(enabled=True):
        layer(x).sum().backward()
print("check_image: TE ok")
PY
# vLLM's GPU build against this torch: its compiled ops load, and the OpenAI server's entry point
# parses its arguments (imports the serving path, orjson included).
python -c "import vllm, vllm._C, orjson; print('vllm', vllm.__version__)"
python -m vllm.entrypoints.openai.api_server --help > /dev/null
echo "check_image: ok"
