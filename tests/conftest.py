import os

import torch

# Triton reads this when first imported: without a GPU its kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.testing.make_model import make_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """One small random checkpoint per architecture (llama with llama3 rope scaling)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_model(root / "llama", "llama", seed=1, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": make_model(root / "qwen2", "qwen2", seed=2, max_shard_size="200KB"),
        "qwen3": make_model(root / "qwen3", "qwen3", seed=3, tie_word_embeddings=True),
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
