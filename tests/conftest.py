"""Shared pytest set-up: markers by folder, CPU-friendly defaults.

Markers (see pyproject.toml): tests under tests/unit are `unit`, tests/distributed
`distributed` (real processes under torchrun + gloo), tests/e2e `e2e` (real tiny runs).
`make test` runs all of them; `pytest -m unit` runs the fast ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Keep the two CI cores for the processes a test starts, not for oversubscribed BLAS threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS_DIR).parts
        if parts and parts[0] in ("unit", "distributed", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (char tokenizer, head_dim 64 so vLLM's CPU attention takes it)."""
    from helpers import tiny_hf_model

    return tiny_hf_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    from helpers import tiny_hf_model

    return tiny_hf_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


# megatron-core's LanguageModule writes its attention backend choice into os.environ
# (NVTE_FLASH_ATTN / NVTE_FUSED_ATTN / NVTE_UNFUSED_ATTN) and asserts on it the next time a model
# is built. A model built inside the pytest process (in-process actor tests) would then leak its
# choice into every later subprocess and into models of another kind: keep each test module's own.
_NVTE_ATTENTION_VARS = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@pytest.fixture(autouse=True, scope="module")
def _restore_nvte_attention_env():
    # Module scope: the in-process actors are module fixtures, set up before any function one.
    before = {k: os.environ.get(k) for k in _NVTE_ATTENTION_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
