import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    # `pytest -m cuda_sim`: every test that runs the engine on the simulated GPU, by a "simulated"
    # parameter (the parity suites' DEVICES) or marked so by hand.
    cuda_sim = pytest.mark.cuda_sim
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(value == "simulated" for value in params.values()):
            item.add_marker(cuda_sim)
        if any(value == "cuda" for value in params.values()):
            item.add_marker(pytest.mark.gpu)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
