"""Pipelined gradients equal single-process gradients (no compression): classic and V-shaped schedules."""

import torch

from lowbw.testing.gradcheck import Scenario, pipeline_grads, reference_grads

SCENARIOS = [
    Scenario("gpipe", stages=2, n_layer=2),
    Scenario("gpipe", stages=2, n_layer=4, partition=[1, 3]),
    Scenario("gpipe", stages=4, n_layer=6, partition=[2, 1, 1, 2]),
    Scenario("1f1b", stages=2, n_layer=4, partition=[3, 1]),
    Scenario("1f1b", stages=4, n_layer=4),
    Scenario("1f1b", stages=4, n_layer=5, partition=[1, 1, 2, 1], microbatches=2),
    # V shapes: two stages a rank (r and 2p-1-r), the turn of the V handed over in memory on the last rank
    Scenario("zbv", stages=2, n_layer=4),
    Scenario("zbv", stages=3, n_layer=7, microbatches=3, batch_size=6),
    Scenario("dualpipev", stages=2, n_layer=4, microbatches=4),
    Scenario("dualpipev", stages=3, n_layer=6, microbatches=7, batch_size=7),
]


def test_pipelined_gradients_equal_single_process_gradients():
    torch.set_num_threads(1)
    results = pipeline_grads(SCENARIOS)
    for sc, got in zip(SCENARIOS, results):
        want = reference_grads(sc)
        assert got.keys() == want.keys(), sc
        for name in want:
            assert got[name] is not None, (sc, name)
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sc} {name}: {m}")
