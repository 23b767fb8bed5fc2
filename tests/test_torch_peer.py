"""Against a peer: lowbw's gradients equal torch.distributed.pipelining's on the same step.

Same model, weights, batch and microbatches on both sides. torch backpropagates each microbatch's
unscaled mean loss and divides the gradients by m at the end (``scale_grads=True``); lowbw divides
each microbatch's loss by m first: the same gradient.

Every schedule class torch 2.13 has runs in lowbw -- from a lowbw generator where lowbw has one, else
from the CSV torch dumps for it (LoopedBFS; InterleavedZeroBubble with two stages a rank) -- at 2 and
4 ranks, lowbw's side in real processes over gloo.
"""

import pytest
import torch
from torch.distributed import pipelining as pp

from lowbw.testing import torch_private
from lowbw.testing.gradcheck import Scenario, pipeline_grads
from lowbw.testing.torch_peer import torch_grads

SCENARIOS = [
    Scenario("gpipe", stages=2, n_layer=4, partition=[1, 3]),
    Scenario("1f1b", stages=2, n_layer=4, partition=[3, 1]),
    Scenario("1f1b", stages=2, n_layer=3, microbatches=8),
    Scenario("interleaved_1f1b", stages=2, n_layer=4, params={"virtual_stages": 2}),
]


def assert_same_grads(sc, got, want):
    assert got.keys() == want.keys(), sc
    for name in want:
        assert got[name] is not None and want[name] is not None, (sc, name)
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sc} {name}: {m}")
    assert any(float(g.abs().sum()) > 0 for g in want.values()), sc


def test_gradients_equal_torch_pipelining():
    torch.set_num_threads(1)
    ours = pipeline_grads(SCENARIOS)
    peer = torch_grads(SCENARIOS)
    for sc, got, want in zip(SCENARIOS, ours, peer):
        assert_same_grads(sc, got, want)


# torch's schedule class -> lowbw's generator of the same order (None: read torch's own CSV)
LOWBW_OF = {
    "ScheduleGPipe": ("gpipe", {}),
    "Schedule1F1B": ("1f1b", {}),
    "ScheduleInterleaved1F1B": ("interleaved_1f1b", {"virtual_stages": 2}),
    "ScheduleInterleavedZeroBubble": ("zb_h1", {}),  # one stage a rank; two stages a rank from torch's CSV below
    "ScheduleZBVZeroBubble": ("zbv", {}),
    "ScheduleDualPipeV": ("dualpipev", {}),
    "ScheduleLoopedBFS": None,
}
FROM_CSV = [("ScheduleLoopedBFS", "loop"), ("ScheduleInterleavedZeroBubble", "loop")]  # 2 stages a rank, s on s % p

TORCH_PRIVATE_MISSING = torch_private.unavailable("csv", "fake_process_group")


def test_every_schedule_class_of_torch_is_covered():
    assert set(LOWBW_OF) == {n for n in dir(pp) if n.startswith("Schedule")}


def _scenarios(p: int, tmp_path) -> tuple[list[Scenario], list[str]]:
    m, n_layer = 2 * p, 2 * p  # DualPipeV needs m >= 2p; two-chunk placements need 2p layers
    scenarios, classes = [], []
    for cls, mine in LOWBW_OF.items():
        if mine is not None:
            scenarios.append(Scenario(mine[0], stages=p, microbatches=m, n_layer=n_layer, params=mine[1]))
            classes.append(cls)
    for cls, _ in FROM_CSV:
        path = tmp_path / f"{cls}_{p}.csv"
        torch_private.dump_torch_schedule(cls, p, m, [0, p], 2 * p, str(path))
        scenarios.append(Scenario("csv", stages=p, microbatches=m, n_layer=n_layer, params={"csv": str(path)}))
        classes.append(cls)
    return scenarios, classes


@pytest.mark.skipif(TORCH_PRIVATE_MISSING is not None, reason=TORCH_PRIVATE_MISSING or "")
@pytest.mark.parametrize("p", [2, 4])
def test_every_torch_schedule_class_runs_in_lowbw_with_torchs_gradients(p, tmp_path):
    torch.set_num_threads(1)
    scenarios, classes = _scenarios(p, tmp_path)
    ours = pipeline_grads(scenarios, timeout_s=600)
    peer = torch_grads(scenarios, classes, timeout_s=600)
    for sc, cls, got, want in zip(scenarios, classes, ours, peer):
        assert_same_grads((cls, sc), got, want)
