"""The step loop of one rank: train, evaluate, report, checkpoint.

The same on every rank; what differs per rank is built in (the :class:`~lowbw.rank.build.Rank`)
or is a role (lowbw.rank.reporting). One step::

    batch (from the seed, no data messages; made during the step before) -> executor.run(schedule)
    -> [the last step's divergence check] -> global gradient norm (one all-reduce, started; or later,
    see below) -> [clip: wait for it] -> optimizer step (timed) -> [no clip: wait for it]
    -> report (busy time, end time, bytes, loss, events, codec stats) -> [evaluation] -> [checkpoint]

A step's report goes to the reporting at the first wait after its divergence check (:class:`HeldReport`).

With replicas (lowbw.replicas), the batch is the replica's own, the replicas synchronise after the
backward pass and after the optimizer step (``replicas/sync``: over the emulated links, on the run
clock), and their traffic joins the step's events and bytes.

The global gradient norm: each rank sums the squares of its stages' gradients (plus infinity when
its loss is not finite) into its replica's slot of a vector, one all-reduce of it gives every rank
the norm over all stages of its replica. A norm that is not finite stops every rank at the same step (:class:`~lowbw.errors.Diverged`,
status ``diverged``); ``train.grad_clip > 0`` scales every gradient by ``clip / (norm + 1e-6)`` when
the norm exceeds it, as ``torch.nn.utils.clip_grad_norm_`` does in one process. The all-reduce is
control traffic: neither emulated nor charged to the run clock. Without a clip nothing needs the norm
before the optimizer step, so the all-reduce runs during it -- or, on a step after which nothing reads
the weights but the next step (no evaluation, no checkpoint, not the last step, one replica, no injected
crash next), the norm is computed and its all-reduce started at the next step's first wait and checked
at that step's end (:func:`checks_later`): computing it took ~0.4 ms of rank 0's critical path at every
step's end. A divergence then stops the run one step later, still at the step it happened and before
its weights are evaluated, saved or stepped on again, and the step's report is held until its check
passed.

Evaluation runs a forward-only schedule with the clock paused and emulation off. Checkpoints are
written with the clock paused too.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from lowbw.checkpoint import checkpoint_dir
from lowbw.data.corpus import Batch
from lowbw.errors import Diverged, ignore_stop_signals
from lowbw.metrics.timeline import Event, busy_seconds
from lowbw.pipeline.executor import PHASE_EVAL, PHASE_TRAIN
from lowbw.rank.build import Rank
from lowbw.rank.faults import RankFaults
from lowbw.rank.launcher_watch import as_stop
from lowbw.rank.reporting import Reporting
from lowbw.rank.state import restore_rank, save_rank


@dataclass(frozen=True)
class StepSettings:
    """The settings the step loop reads, read once. An attribute of the run's OmegaConf DictConfig costs
    25-60 us to read (measured here: ``cfg.train.grad_clip`` 57 us), and the loop read 16 a step -- half a
    millisecond on the critical path of every step."""

    steps: int
    eval_interval: int
    checkpoint_every: int
    batch_size: int
    error_every: int
    grad_clip: float
    timeout_s: float
    lr: float
    crash_step: int  # the step at which faults.crash_rank exits; -1: none

    @classmethod
    def of(cls, cfg: Any) -> "StepSettings":
        t = cfg.train
        return cls(t.steps, t.eval_interval, cfg.checkpoint.every, t.batch_size, cfg.compress.error_every,
                   t.grad_clip, cfg.timeout_s, t.lr, cfg.faults.crash_step if cfg.faults.crash_rank >= 0 else -1)


def train(r: Rank, reporting: Reporting, run_dir: Optional[Path]) -> Optional[dict]:
    """Run every step of the run on this rank; return the summary on rank 0 (None elsewhere)."""
    cfg = r.cfg
    s = StepSettings.of(cfg)
    faults = RankFaults(cfg.faults, r.rank, r.clock, r.transport)
    ckpt_root = checkpoint_dir(cfg, run_dir)
    held = HeldReport(reporting)
    try:
        r.watch.await_all("built")  # start-up and building may take longer than timeout_s: not a failure
        first_step, resumed_at = restore_rank(r, reporting, ckpt_root) if cfg.resume else (0, 0.0)
        metering = False
        batches = NextBatch(r, s.batch_size, s.steps - 1)
        last_norm: Optional[GlobalGradNorm] = None  # a step's norm checked during the next (checks_later)
        with steps_without_gc() as between_steps:  # collects before the clocks start
            # every rank's clock starts together (at 0, or where the checkpoint left it)
            r.watch.collective(r.rank, "the start barrier", lambda: dist.barrier(async_op=True), cfg.timeout_s)
            r.clock.start(resumed_at)
            # The meter covers the steps throughput and energy are averaged over (warm-up left out).
            measure_from = max(first_step, cfg.train.warmup_steps if cfg.train.steps > cfg.train.warmup_steps else 0)
            for step in range(first_step, s.steps):
                if step == measure_from:
                    r.meter.begin()
                    metering = True
                if faults.crashes_at(step):
                    held.hand_over()  # the last step's report is sent before the crash, as it was made (checked)
                faults.before_step(step)
                report, last_norm = train_step(r, step, s, batches, held, last_norm)  # this step's, if checked later
                eval_wall = 0.0
                if evaluates_after(step, s):
                    w0 = time.perf_counter()
                    with r.clock.paused():
                        report["val_loss"] = evaluate(r, step)
                    eval_wall = time.perf_counter() - w0
                held.hold(step, report, eval_wall, checked=last_norm is None)
                if checkpoints_after(step, s):
                    with r.clock.paused():
                        held.hand_over()  # every one checked: this step's and the last one's
                        reporting.drain()
                        save_rank(r, reporting, ckpt_root, step)
                r.meter.poll()
                between_steps(step)
        held.hand_over()
        if metering:
            r.meter.end()
        measurement = r.meter.measurement()
        reporting.finish(measurement.to_dict() if measurement is not None else None)
        r.transport.close()
    except BaseException as caught:
        ignore_stop_signals()  # record the failure whole (a stop signal now would cut it short)
        e = as_stop(caught)  # the launcher is gone: a stop, whatever this rank noticed first
        try:
            try:  # the steps done before the failure are recorded; a diverged one is not
                held.hand_over(unchecked=not isinstance(e, Diverged))
            except Exception:  # noqa: BLE001 -- the reporting itself failed: the failure below is the one to record
                pass
            reporting.fail(e)
        except Exception as record_error:  # noqa: BLE001 -- the first error is the one to report
            print(f"lowbw: rank {r.rank}: could not record the failure: {record_error}", file=sys.stderr, flush=True)
        raise
    return reporting.complete()


#: Python's cyclic garbage collector runs every this many steps, between them (torchtitan's
#: ``training.gc_freq`` is 50 too).
GC_EVERY = 50


@contextlib.contextmanager
def steps_without_gc() -> Iterator[Callable[[int], None]]:
    """Python's cyclic garbage collector off during the steps; the caller runs the function it yields after
    each step, which collects every ``GC_EVERY`` steps.

    Left on, the collector runs whenever enough objects were allocated -- inside a forward or a receive
    wait as likely as anywhere -- on the run clock. Measured with ``scripts/bench_overhead.py``'s 2-rank
    GPT before this: 0.9 s of collections in 60 steps on rank 0, one of them 0.3 s. The model, optimizer
    and buffers built before the first step are frozen out of every collection."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()

    def between_steps(step: int) -> None:
        if (step + 1) % GC_EVERY == 0:
            gc.collect(1)  # the young generations: what the steps allocated

    try:
        yield between_steps
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


class NextBatch:
    """Each step's training batch, made during the step before, at its first wait (an executor chore).

    Making a batch (sampling its windows, copying them into tensors) took 0.3-0.7 ms, which sat between
    rank 0's optimizer step and its next forward -- on the critical path (scripts/bench_overhead.py)."""

    def __init__(self, r: Rank, batch_size: int, last_step: int):
        self.r, self.batch_size, self.last_step = r, batch_size, last_step
        self._made: Optional[tuple[int, Batch]] = None

    def _make(self, step: int) -> Batch:
        r = self.r
        # replica j takes the j-th of R consecutive batches: R replicas of batch B see what one pipeline of
        # batch R x B would (and R = 1 the batches of a single pipeline)
        return r.corpus.train_batch(step * r.layout.replicas + r.replica, self.batch_size)

    def _prefetch(self, step: int) -> None:
        self._made = (step, self._make(step))

    def take(self, step: int) -> Batch:
        """Step ``step``'s batch; asks the executor to make the next one at the step's first wait."""
        made, self._made = self._made, None
        batch = made[1] if made is not None and made[0] == step else self._make(step)
        if step < self.last_step:
            self.r.executor.chore(lambda: self._prefetch(step + 1))
        return batch


class HeldReport:
    """Step reports, each handed to the reporting at the first wait after its step's divergence check passed
    (an executor chore, the last of the step's) rather than at once: the next step's first wait, or the one
    after when the check comes a step later (:func:`checks_later`). In step order, at the latest before a
    checkpoint or at the end; when the run fails or crashes, the reports whose check will never come are
    handed over too, unless their loss is not finite.

    On rank 0 the reporting's collector thread takes it from there: it receives the other ranks' reports
    and writes metrics, the timeline and TensorBoard (~1 ms of CPU a step on scripts/bench_overhead.py's
    run, TensorBoard's writer thread more). Handed over at once, that ran beside rank 0's next forward, on
    the critical path: the forward took 7.1-7.3 ms on the wall clock for 5.7 ms of CPU, against 5.3 ms
    while rank 0 waits for its first gradient. On the other ranks it is the report's serialisation and send."""

    def __init__(self, reporting: Reporting):
        self.reporting = reporting
        self._held: list[list] = []  # [step, report, eval wall s, checked], oldest first

    def hold(self, step: int, report: dict, eval_wall_s: float, checked: bool) -> None:
        self._held.append([step, report, eval_wall_s, checked])
        if len(self._held) > 2:  # steps without a wait: the older ones go now
            self.hand_over()

    def checked(self, step: int) -> None:
        """Step ``step``'s divergence check passed."""
        for held in self._held:
            if held[0] == step:
                held[3] = True

    def when_waiting(self, r: Rank) -> None:
        if self._held:
            r.executor.chore(self.hand_over)

    def hand_over(self, unchecked: bool = False) -> None:
        """Hand over the held reports, oldest first, up to the first still to be checked (``unchecked``: those
        too -- the run failed or crashes, their check will never come -- up to the first whose loss is not
        finite, which no file may hold)."""
        while self._held:
            step, report, eval_wall_s, checked = self._held[0]
            if not checked and not (unchecked and math.isfinite(report["loss_sum"])):
                return
            del self._held[0]
            self.reporting.submit(step, report, eval_wall_s)


def evaluates_after(step: int, s: StepSettings) -> bool:
    return step == s.steps - 1 or bool(s.eval_interval and (step + 1) % s.eval_interval == 0)


def checkpoints_after(step: int, s: StepSettings) -> bool:
    return bool(s.checkpoint_every and (step + 1) % s.checkpoint_every == 0)


def checks_later(r: Rank, step: int, s: StepSettings) -> bool:
    """Whether step ``step``'s gradient norm is computed, all-reduced and checked during the next step: only
    when nothing but the next step reads the weights it leaves (no clip needs the norm first, no evaluation,
    checkpoint or replica synchronisation follows, it is not the last step) and no rank crashes next
    (``faults.crash_rank``: its last report goes before it crashes, checked, as in a run without faults --
    unchecked, rank 0 could not record it before that rank's end, which waits until it is recorded)."""
    return (s.grad_clip == 0 and r.layout.replicas == 1 and not evaluates_after(step, s)
            and not checkpoints_after(step, s) and step + 1 != s.crash_step)


def train_step(r: Rank, step: int, s: StepSettings, batches: NextBatch, held: HeldReport,
               last_norm: Optional["GlobalGradNorm"]) -> tuple[dict, Optional["GlobalGradNorm"]]:
    """One optimizer step on this rank; returns its report for rank 0, and its gradient norm if it is to be
    checked during the next step (``last_norm``: the last step's, if so; ``held``: the reports not yet
    handed over)."""
    if last_norm is not None:  # first at the first wait: before zero_grad frees the gradients it reads
        r.executor.chore(last_norm.start)
    batch = batches.take(step)
    if not evaluates_after(step, s):  # the next run is the next step's: its receives go out at a wait of this one
        r.executor.expect_ahead(r.plan.schedule, PHASE_TRAIN, step + 1, batch.x.shape)
    r.executor.chore(lambda: r.optimizer.zero_grad(set_to_none=True))  # before the first backward, off the critical path
    held.when_waiting(r)  # last: the collector's work then overlaps the wait, not the other chores
    every = s.error_every
    res = r.executor.run(r.plan.schedule, PHASE_TRAIN, step, batch.x, batch.y, batch.ids,
                         measure_error=bool(every) and step % every == 0)
    if last_norm is not None:  # long done: the check costs a few calls, not the norm's ~0.4 ms
        last_norm.value()
        held.checked(step - 1)
    r.sync.after_backward(step)
    later = checks_later(r, step, s)
    norm = GlobalGradNorm(r, step, res.loss_sum if res.n_loss else 0.0, s, start=not later)
    if s.grad_clip > 0:  # the clip needs the norm before the step
        clip_gradients(r, norm.value(), s.grad_clip)
    _, t0, t1 = r.clock.compute(r.optimizer.step, r.optimizer_seconds)
    res.events.append(Event(r.rank, "optimizer", t0, t1, step, "optimizer"))
    # Without a clip the all-reduce runs during the optimizer step: nothing waits for it (the first
    # rank to finish its backward would otherwise wait for the last before stepping). A divergence
    # still stops the run at this step, before the weights are used again (replica sync, evaluation,
    # checkpoint, the next step) -- or, checked later, before they are evaluated, saved or stepped on.
    if not later:
        norm.value()
    r.sync.after_optimizer(step)
    sync_events, sync_sent = r.group.take_events()
    res.events.extend(sync_events)
    for dst, n in sync_sent.items():
        res.bytes_sent[dst] = res.bytes_sent.get(dst, 0) + n
    return {
        "rank": r.rank, "step": step, "end": r.clock.now(),
        "busy": busy_seconds(res.events),
        "bytes_sent": {str(k): v for k, v in res.bytes_sent.items()},
        "sync_bytes": sum(sync_sent.values()),
        "loss_sum": res.loss_sum, "n_loss": res.n_loss,
        "events": res.events,  # named tuples: rows in the report (lowbw.metrics.timeline.event_dict)
        "codecs": {k: v.__dict__ for k, v in res.codecs.items()},
    }, norm if later else None


def _gradients(r: Rank) -> list[torch.Tensor]:
    return [p.grad for p in r.parameters if p.grad is not None]


class GlobalGradNorm:
    """The L2 norm of every stage's gradients of this rank's replica: one all-reduce of a vector with a
    slot per replica, started on construction (or by :meth:`start`, ``start=False``); :meth:`value` waits for
    it and raises Diverged when the norm or the loss is not finite on any rank of any replica."""

    def __init__(self, r: Rank, step: int, loss_sum: float, s: StepSettings, start: bool = True):
        self.r, self.step, self.s, self.loss_sum = r, step, s, loss_sum
        self.work: Any = None
        self._norm: Optional[float] = None
        if start:
            self.start()

    def start(self) -> None:
        """Sum this rank's squares and start the all-reduce, if not yet done."""
        if self.work is not None:
            return
        r, loss_sum = self.r, self.loss_sum
        grads = _gradients(r)
        # Started at once, rank 0 computes this on the critical path, between its last backward and its optimizer
        # step, with the caches cold: a few torch calls (each 25-60 us there, scripts/bench_cold_calls.py).
        if not math.isfinite(loss_sum) or not grads:
            mine = torch.tensor(0.0 if math.isfinite(loss_sum) else math.inf, dtype=torch.float64)
        else:  # per-tensor norms in one call, as torch.nn.utils.clip_grad_norm_ computes them; squares summed in double
            norms = torch.stack(torch._foreach_norm(grads)).double()
            mine = torch.dot(norms, norms)
        if r.layout.replicas == 1:
            self.sq = mine.reshape(1)
        else:
            self.sq = torch.zeros(r.layout.replicas, dtype=torch.float64)
            self.sq[r.replica] = mine
        self.what = f"the gradient-norm all-reduce of step {self.step}"
        self.work = r.watch.start_collective(r.rank, self.what, lambda: dist.all_reduce(self.sq, async_op=True))

    def value(self) -> float:
        if self._norm is None:
            r = self.r
            r.watch.finish_collective(r.rank, self.what, self.work, self.s.timeout_s)
            sq = self.sq.tolist()
            if not all(math.isfinite(v) for v in sq):
                raise Diverged(self.step, f"training diverged at step {self.step}: the loss or the gradients are "
                                          f"not finite (train.lr={self.s.lr}); lower train.lr or set "
                                          "train.grad_clip")
            self._norm = math.sqrt(sq[r.replica])
        return self._norm


def clip_gradients(r: Rank, norm: float, clip: float) -> None:
    """Scale every gradient so that the global norm is at most ``clip`` (``train.grad_clip`` > 0)."""
    if norm > clip:
        coef = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        for g in _gradients(r):
            g.mul_(coef)


def evaluate(r: Rank, step: int) -> Optional[float]:
    """Mean validation loss over ``train.eval_batches`` batches (last stage of replica 0; None elsewhere).

    Only replica 0 evaluates: under allreduce every replica holds the same weights; under diloco and
    sparta replicas differ between synchronisations, and replica 0's model is the one reported. Its
    batches are R x ``train.batch_size`` sequences: the validation set of one pipeline trained on the
    replicas' combined batch, so that the two are compared on the same text."""
    cfg = r.cfg
    if r.replica != 0:
        return None
    total, n = 0.0, 0
    for i in range(cfg.train.eval_batches):
        b = r.corpus.val_batch(i, cfg.train.batch_size * r.layout.replicas)
        res = r.executor.run(r.plan.eval_schedule, PHASE_EVAL, step * cfg.train.eval_batches + i, b.x, b.y, b.ids,
                             emulate=False)
        total += res.loss_sum
        n += res.n_loss
    return total / n if n else None
