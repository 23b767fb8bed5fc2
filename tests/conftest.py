import os

import pytest
import torch

# Tests and the processes they spawn share two cores: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def compose():
    from lowbw.train import compose as _compose

    return _compose
