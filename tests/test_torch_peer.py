"""Against a peer: lowbw's gradients equal torch.distributed.pipelining's on the same step.

GPipe, 1F1B and interleaved 1F1B (2 stages per rank), same model, weights, batch and microbatches.
torch backpropagates each microbatch's unscaled mean loss and divides the gradients by m at the end
(``scale_grads=True``); lowbw divides each microbatch's loss by m first: the same gradient.
"""

import torch

from lowbw.testing.gradcheck import Scenario, pipeline_grads
from lowbw.testing.torch_peer import torch_grads

SCENARIOS = [
    Scenario("gpipe", stages=2, n_layer=4, partition=[1, 3]),
    Scenario("1f1b", stages=2, n_layer=4, partition=[3, 1]),
    Scenario("1f1b", stages=2, n_layer=3, microbatches=8),
    Scenario("interleaved_1f1b", stages=2, n_layer=4, params={"virtual_stages": 2}),
]


def test_gradients_equal_torch_pipelining():
    torch.set_num_threads(1)
    ours = pipeline_grads(SCENARIOS)
    peer = torch_grads(SCENARIOS)
    for sc, got, want in zip(SCENARIOS, ours, peer):
        assert got.keys() == want.keys(), sc
        for name in want:
            assert got[name] is not None and want[name] is not None, (sc, name)
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sc} {name}: {m}")
        assert any(float(g.abs().sum()) > 0 for g in want.values()), sc
