from __future__ import annotations

import pytest
import torch

from toy_models import SPREAD_POOL, results_alone, spread_resnet20

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


# A resnet20 whose confidences spread 40 random inputs over all its four exits, and each
# input's early-exit result computed alone: the reference of the batching invariants.
@pytest.fixture(scope="module")
def spread_pool() -> torch.Tensor:
    return torch.randn(SPREAD_POOL, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def spread_net(spread_pool):
    return spread_resnet20(spread_pool)


@pytest.fixture(scope="module")
def spread_alone(spread_net, spread_pool):
    result = results_alone(spread_net, spread_pool)
    counts = torch.bincount(result.exit_index, minlength=spread_net.num_exits + 1)
    assert (counts >= 2).all(), counts  # every exit is used
    return result
