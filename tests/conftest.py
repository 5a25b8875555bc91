from __future__ import annotations

import pytest
import torch

# The models under test are tiny: one thread is as fast, and it stays fast when other processes
# (a torchrun test, a second pytest) share the machine's cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
