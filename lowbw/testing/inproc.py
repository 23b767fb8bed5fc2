"""Every rank of a pipeline as a thread of this process: the builders and executor of real runs, with
an in-memory wire (lowbw.net.wire.MemoryWire) where a run has gloo.

For checks that would need hundreds of process groups (tests/test_executor_agrees.py plays every
schedule generator over many shapes): :func:`run_inproc` builds each rank with
:func:`lowbw.rank.build.build_rank` -- one after the other, in this thread, because building seeds
torch's global generator -- joins them on one :class:`~lowbw.net.wire.Switchboard`, and runs the
plan's training schedule for a few steps on all ranks at once, one thread each, as
:mod:`lowbw.testing.gradcheck` does in processes. What differs from a run is only the wire: the
transport above it (framing, early posting, emulation) is the real one. A rank that fails takes its
links down, so the others stop waiting at once and the error names the first rank that failed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from lowbw.net.wire import MemoryWire, Switchboard
from lowbw.pipeline.executor import PHASE_TRAIN, StepResult
from lowbw.rank.build import Rank, build_rank
from lowbw.validation import Plan


@dataclass
class RankOutcome:
    """What one rank's thread left behind."""

    results: list[StepResult] = field(default_factory=list)  # one per step
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # "stage{s}.{param}" after the last step
    error: Optional[BaseException] = None


def _run_rank(r: Rank, plan: Plan, optimize: bool, ahead: int, out: RankOutcome, board: Switchboard) -> None:
    torch.set_num_threads(1)
    try:
        for step in range(r.cfg.train.steps):
            b = r.corpus.train_batch(step, r.cfg.train.batch_size)
            if ahead and step + ahead < r.cfg.train.steps:
                r.executor.expect_ahead(plan.schedule, PHASE_TRAIN, step + ahead, b.x.shape)
            r.optimizer.zero_grad(set_to_none=True)
            out.results.append(r.executor.run(plan.schedule, PHASE_TRAIN, step, b.x, b.y, b.ids))
            if optimize:
                r.optimizer.step()
        r.transport.close()
        out.grads = {f"stage{s}.{n}": q.grad for s, st in r.stages.items() for n, q in st.module.named_parameters()}
    except BaseException as e:  # noqa: BLE001 -- reported by run_inproc, naming this rank
        out.error = e
        board.fail(r.rank, f"{type(e).__name__}: {e}")


def run_inproc(cfg: Any, plan: Plan, optimize: bool = False, timeout_s: float = 120.0,
               ahead: int = 0) -> list[RankOutcome]:
    """Run the config's ``train.steps`` training steps of ``plan`` with every rank a thread; one outcome per rank.

    ``cfg``: the composed config (DictConfig or plain dict); ``optimize``: also take the optimizer step
    (without it, gradients accumulate over the steps); ``ahead``: each step has the receives of the step this
    many later posted at one of its waits (Executor.expect_ahead; 1 as the step loop does, 0 never). Raises RuntimeError naming the first rank that
    failed, or the ranks still running after ``timeout_s``."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    world = plan.schedule.n_ranks
    board = Switchboard()
    ranks = [build_rank(cfg, plan, r, world, wire=MemoryWire(board, r)) for r in range(world)]
    outcomes = [RankOutcome() for _ in range(world)]
    threads = [threading.Thread(target=_run_rank, args=(ranks[r], plan, optimize, ahead, outcomes[r], board),
                                name=f"lowbw-rank{r}", daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    if hung:
        for r in hung:
            board.fail(r, "the in-process run timed out")
        raise RuntimeError(f"ranks {hung} of schedule {plan.schedule.name!r} still running after {timeout_s:.0f} s")
    failed = [(r, o.error) for r, o in enumerate(outcomes) if o.error is not None]
    if failed:
        first = min(failed, key=lambda f: _blames_a_peer(f[1]))
        raise RuntimeError(f"rank {first[0]} of schedule {plan.schedule.name!r}: "
                           f"{type(first[1]).__name__}: {first[1]}") from first[1]
    return outcomes


def _blames_a_peer(e: BaseException) -> bool:
    """Failures that only report a peer's failure sort after the failure itself."""
    return getattr(e, "peer", None) is not None
