"""Test-wide settings: never touch the network, never log to wandb's servers, seed everything."""

import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run under Triton's interpreter (fp32/fp16 only; bf16 is wrong
# there). It must be set before any kernel is defined, i.e. before sfa.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where a test module's train.py runs prepare their data: once per module, shared by its runs."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, repeatable failures."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_tests.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
