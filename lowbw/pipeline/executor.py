"""Run one rank's action list on real tensors: the pipeline executor.

For each action of the rank's list, in order: forward or backward of a held stage, or a send or
receive through the transport. Everything that computes -- forward, backward, codec encode and
decode, the optimizer -- is timed by the clock and recorded as busy; receives wait for their
message's delivery time. The rules are those of lowbw.pipeline.validate, so a validated schedule
cannot deadlock here.

Gradients: each microbatch's loss is divided by the number of microbatches, so that the summed
gradients of a step equal those of the mean loss over the whole batch in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lowbw.compress.base import Codec
from lowbw.metrics.timeline import Event
from lowbw.models.gpt import GPTStage
from lowbw.net.clock import Clock
from lowbw.net.transport import CH_BWD, CH_FWD, Transport
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.validate import peer_of

PHASE_TRAIN, PHASE_EVAL = 0, 1


@dataclass
class StageRuntime:
    """A stage held by this rank: its module and the codecs of its two boundaries."""

    index: int
    module: GPTStage
    send_fwd: Optional[Codec] = None  # encodes this stage's outputs for stage index+1
    recv_fwd: Optional[Codec] = None  # decodes this stage's inputs from stage index-1
    send_bwd: Optional[Codec] = None  # encodes gradients of this stage's inputs for stage index-1
    recv_bwd: Optional[Codec] = None  # decodes gradients of this stage's outputs from stage index+1
    # Evaluation uses codec instances of its own, so that validation batches leave no trace in
    # training state (error-feedback residuals, per-sample caches, warm starts).
    eval_send_fwd: Optional[Codec] = None
    eval_recv_fwd: Optional[Codec] = None


@dataclass
class CodecStats:
    """What one boundary and direction cost and changed in a step (key "<boundary>.<fwd|bwd>")."""

    messages: int = 0
    raw_bytes: int = 0  # bytes of the tensors before encoding
    wire_bytes: int = 0  # bytes of the payloads on the link
    encode_s: float = 0.0  # on the run clock, sender
    decode_s: float = 0.0  # on the run clock, receiver
    err_sq: float = 0.0  # sum of ||x_hat - x||^2 over measured messages
    norm_sq: float = 0.0  # sum of ||x||^2 over the same messages
    measured: int = 0  # messages whose error was measured


@dataclass
class StepResult:
    events: list[Event] = field(default_factory=list)
    loss_sum: float = 0.0  # sum over microbatches of the (unscaled) loss, last stage only
    n_loss: int = 0
    bytes_sent: dict[int, int] = field(default_factory=dict)  # destination rank -> payload bytes
    codecs: dict[str, CodecStats] = field(default_factory=dict)


class Executor:
    def __init__(
        self,
        rank: int,
        stages: dict[int, StageRuntime],
        transport: Transport,
        clock: Clock,
        device: torch.device,
        planned: Optional[Callable[[Action], Optional[float]]] = None,
    ):
        self.rank, self.stages, self.transport, self.clock, self.device = rank, stages, transport, clock, device
        # Planned duration of an action (virtual clock with durations=flops|fixed), None = measure it.
        # Codec work runs inside send/receive actions; planned timings charge it 0 s (see planner()).
        self.planned = planned or (lambda a: None)

    def run(self, sched: Schedule, phase: int, step: int, x: torch.Tensor, y: torch.Tensor,
            ids: torch.Tensor, emulate: bool = True, measure_error: bool = False) -> StepResult:
        """Run this rank's actions of ``sched`` for one batch split into ``sched.n_microbatches``.

        ``measure_error``: also decode each payload on the sender (outside the clock) to record the
        relative reconstruction error per boundary.
        """
        m, train = sched.n_microbatches, phase == PHASE_TRAIN
        xs, ys = x.chunk(m), y.chunk(m)
        # Per-sample codecs key their caches on training sample ids; evaluation passes none.
        idss = ids.chunk(m) if train else [None] * m
        res = StepResult()
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        out_grads: dict[tuple[int, int], torch.Tensor] = {}
        last = sched.n_stages - 1

        def record(kind: str, t0: float, t1: float, a: Action, nbytes: int = 0, peer: int = -1) -> None:
            res.events.append(Event(self.rank, kind, t0, t1, step, str(a), nbytes, peer))

        for a in sched.actions[self.rank]:
            s, mb = a.stage, a.microbatch
            st = self.stages[s]
            if a.kind == Kind.FORWARD:
                if s == 0:
                    inp = xs[mb].to(self.device)
                elif (s, mb) not in inputs:  # previous stage on this rank: take its output directly
                    inp = outputs[(s - 1, mb)].detach().requires_grad_(train)
                else:
                    inp = inputs[(s, mb)]
                inputs[(s, mb)] = inp

                def fwd(inp=inp, s=s, mb=mb):
                    with torch.set_grad_enabled(train):
                        out = self.stages[s].module(inp)
                        return self.scaled_loss(out, ys[mb], m, res) if s == last else out

                out, t0, t1 = self.clock.compute(fwd, self.planned(a))
                outputs[(s, mb)] = out
                record("forward", t0, t1, a)
            elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
                self._backward(a, st, inputs, outputs, out_grads, last, record)
            elif a.kind == Kind.SEND_F:
                codec = st.send_fwd if train else st.eval_send_fwd
                self.send(sched, a, (phase, step, s + 1, mb), codec, outputs[(s, mb)].detach(), idss[mb], res,
                          record, emulate, measure_error)
                if not train:
                    del outputs[(s, mb)]
            elif a.kind == Kind.SEND_B:
                self.send(sched, a, (phase, step, s - 1, mb), st.send_bwd, inputs.pop((s, mb)).grad, idss[mb], res,
                          record, emulate, measure_error)
            elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                codec = (st.recv_fwd if train else st.eval_recv_fwd) if a.kind == Kind.RECV_F else st.recv_bwd
                tensor = self.receive(sched, a, (phase, step, s, mb), codec, idss[mb], res, record, emulate)
                if a.kind == Kind.RECV_F:
                    inputs[(s, mb)] = tensor.requires_grad_(train)
                else:
                    out_grads[(s, mb)] = tensor
        return res

    # ---- pieces ---------------------------------------------------------------------------

    def _backward(self, a, st, inputs, outputs, out_grads, last, record) -> None:
        s, mb = a.stage, a.microbatch
        out = outputs[(s, mb)]
        grad = None if s == last else out_grads[(s, mb)]
        if s < last and (s, mb) not in out_grads:  # next stage on this rank: its input's gradient
            grad = inputs[(s + 1, mb)].grad
        inp = inputs.get((s, mb))

        if a.kind == Kind.FULL_BACKWARD:
            def run():
                torch.autograd.backward(out, grad)
            kind = "backward"
        elif a.kind == Kind.BACKWARD_INPUT:
            def run():
                if inp is not None and inp.requires_grad:  # stage 0's input is token ids: nothing to do until W
                    torch.autograd.backward(out, grad, inputs=[inp], retain_graph=True)
            kind = "backward_input"
        else:
            def run():
                torch.autograd.backward(out, grad, inputs=[p for p in st.module.parameters() if p.requires_grad])
            kind = "backward_weight"

        _, t0, t1 = self.clock.compute(run, self.planned(a))
        record(kind, t0, t1, a)
        if a.kind != Kind.BACKWARD_INPUT:
            outputs.pop((s, mb))
            out_grads.pop((s, mb), None)
            if s == 0 or self.stages.get(s - 1) is not None:
                inputs.pop((s, mb), None)

    def scaled_loss(self, logits: torch.Tensor, targets: torch.Tensor, m: int, res: StepResult) -> torch.Tensor:
        """Last stage: record the microbatch's loss, return it divided by m (gradients of the batch mean)."""
        loss = GPTStage.loss(logits, targets.to(self.device))
        res.loss_sum += float(loss.detach())
        res.n_loss += 1
        return loss / m

    def send(self, sched: Schedule, a: Action, key: tuple, codec: Codec, x: torch.Tensor, ids, res: StepResult,
             record, emulate: bool, measure_error: bool) -> None:
        """SEND_F / SEND_B: encode (busy), hand the payload to the link, count its bytes."""
        boundary = f"{a.stage}.fwd" if a.kind == Kind.SEND_F else f"{a.stage - 1}.bwd"
        payload = self._encode(codec, x, ids, a, record, res.codecs.setdefault(boundary, CodecStats()), measure_error)
        dst = peer_of(a, sched)
        self.transport.send(dst, CH_FWD if a.kind == Kind.SEND_F else CH_BWD, key, payload, emulate)
        res.bytes_sent[dst] = res.bytes_sent.get(dst, 0) + payload.numel()
        record("send", self.clock.now(), self.clock.now(), a, payload.numel(), dst)

    def receive(self, sched: Schedule, a: Action, key: tuple, codec: Codec, ids, res: StepResult, record,
                emulate: bool) -> torch.Tensor:
        """RECV_F / RECV_B: wait for delivery on this rank's clock, then decode (busy)."""
        src = peer_of(a, sched)
        t0 = self.clock.now()
        msg = self.transport.recv(src, CH_FWD if a.kind == Kind.RECV_F else CH_BWD, key)
        self.clock.wait_until(self.transport.delivery_time(msg, emulate))
        record("recv_wait", t0, self.clock.now(), a, msg.nbytes, src)
        boundary = f"{a.stage - 1}.fwd" if a.kind == Kind.RECV_F else f"{a.stage}.bwd"
        return self._decode(codec, msg.payload, ids, a, record, res.codecs.setdefault(boundary, CodecStats()))

    def _encode(self, codec: Codec, x: torch.Tensor, ids, a: Action, record, stats: CodecStats,
                measure_error: bool) -> torch.Tensor:
        payload, t0, t1 = self.clock.compute(lambda: codec.encode(x, ids), self.planned(a))
        record("encode", t0, t1, a)
        stats.messages += 1
        stats.raw_bytes += x.numel() * x.element_size()
        stats.wire_bytes += payload.numel()
        stats.encode_s += t1 - t0
        if measure_error:
            with self.clock.paused(), torch.no_grad():
                if codec.name != "none":  # lossless: the error is 0 without decoding
                    x_hat = codec.reconstruction(payload, ids).to(x.dtype)
                    stats.err_sq += float((x_hat - x).float().pow(2).sum())
                stats.norm_sq += float(x.float().pow(2).sum())
                stats.measured += 1
        return payload

    def _decode(self, codec: Codec, payload: torch.Tensor, ids, a: Action, record, stats: CodecStats) -> torch.Tensor:
        payload = payload.to(self.device)
        x, t0, t1 = self.clock.compute(lambda: codec.decode(payload, ids).clone(), self.planned(a))
        record("decode", t0, t1, a)
        stats.decode_s += t1 - t0
        return x
