"""Run one rank's action list on real tensors: the pipeline executor.

For each action of the rank's step, in order: forward or backward of a held stage, or a send or
receive through the transport. Everything that computes -- forward, backward, codec encode and
decode -- is timed by the clock and recorded as busy; receives wait for their message's delivery
time. The rules are those the validator checks (lowbw.pipeline.program), so a validated schedule cannot
deadlock here.

Before the first action the executor posts every receive of the run (:meth:`Executor._post_receives`; during
the run before, at a wait, when the step loop says which run comes next: :meth:`Executor.expect_ahead`):
every rank holds the whole schedule, so it knows what each peer will send it and in which order,
and the codec knows each payload's length (``payload_nbytes``) from the boundary's shape -- the
message moves the moment it is sent, as in torch.distributed.pipelining.

One engine runs every schedule. A synchronous schedule's step starts and ends empty; an
asynchronous one (PipeDream-2BW) carries microbatches and weight versions across steps in a
:class:`~lowbw.pipeline.weight_stash.WeightStash`. Tensors between actions are keyed
``(stage, batch, microbatch)``; for synchronous schedules the batch is the step. Adjacent stages
on one rank (interleaved with one rank, V-shaped placements) hand activations and gradients over
in memory, without a message.

Gradients: each microbatch's loss is divided by the number of microbatches, so that the summed
gradients of a step equal those of the mean loss over the whole batch in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lowbw.compress.base import Codec
from lowbw.compress.payload import Part, part_nbytes, part_tensor
from lowbw.metrics.timeline import Event
from lowbw.models.gpt import GPTStage
from lowbw.net.clock import Clock
from lowbw.net.transport import CH_BWD, CH_FWD, Transport
from lowbw.pipeline.actions import Action, Kind, Schedule
from lowbw.pipeline.stage import StageRuntime, attach_tokens, split_tokens
from lowbw.pipeline.program import peer_of
from lowbw.pipeline.weight_stash import InFlight, WeightStash

PHASE_TRAIN, PHASE_EVAL = 0, 1
_CHANNEL = {Kind.SEND_F: CH_FWD, Kind.RECV_F: CH_FWD, Kind.SEND_B: CH_BWD, Kind.RECV_B: CH_BWD}
_RECEIVE = {Kind.SEND_F: Kind.RECV_F, Kind.SEND_B: Kind.RECV_B}  # what the other end of a send does
_SENDS = frozenset(_RECEIVE)
_BACKWARD_EVENT = {Kind.FULL_BACKWARD: "backward", Kind.BACKWARD_INPUT: "backward_input",
                   Kind.BACKWARD_WEIGHT: "backward_weight"}


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
    bytes_sent: dict[int, int] = field(default_factory=dict)  # destination rank -> bytes the link charged
    codecs: dict[str, CodecStats] = field(default_factory=dict)


@dataclass
class _Step:
    """What one call of :meth:`Executor.run` works on."""

    sched: Schedule
    phase: int
    step: int
    train: bool
    asynchronous: bool  # steps overlap (the stash carries state across them)
    emulate: bool
    measure_error: bool
    batches: dict[int, tuple]  # batch -> (xs, ys, idss) chunked into microbatches
    state: InFlight
    res: StepResult
    # (channel, message key) -> the tensor a message decodes to, made when its receive was posted
    # (Codec.decoded_view): it holds the value once the message is in
    decoded: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def record(self, rank: int, kind: str, t0: float, t1: float, a: Action, nbytes: int = 0, peer: int = -1) -> None:
        self.res.events.append(Event(rank, kind, t0, t1, self.step, str(a), nbytes, peer))


class Executor:
    def __init__(
        self,
        rank: int,
        stages: dict[int, StageRuntime],
        transport: Transport,
        clock: Clock,
        device: torch.device,
        planned: Optional[Callable[[Action], Optional[float]]] = None,
        stash: Optional[WeightStash] = None,
        base: int = 0,
    ):
        """``rank``: this rank in the schedule; ``base``: the global rank of its replica's rank 0
        (lowbw.replicas.layout) -- the transport, the events and the byte counts speak global ranks."""
        self.rank, self.stages, self.transport, self.clock, self.device = rank, stages, transport, clock, device
        self.base, self.me = base, base + rank
        # Planned duration of an action (virtual clock with durations=flops|fixed), None = measure it.
        # Codec work runs inside send/receive actions; planned timings charge it 0 s (lowbw.rank.build).
        self.planned = planned or (lambda a: None)
        self.stash = stash  # asynchronous schedules only
        self._incoming_cache: dict[tuple, tuple[Schedule, list]] = {}  # see _incoming
        self._specs: dict[tuple, tuple] = {}  # see _spec
        # Outputs whose backward is done, kept until this rank next waits for a message: dropping one frees its
        # autograd graph, about 0.2 ms of a 3-block stage's, which would otherwise delay the action after every
        # backward (the send of its gradient, most often) -- on the critical path.
        self._spent: list[torch.Tensor] = []
        self._chores: list[Callable[[], None]] = []  # see chore
        self._ahead: Optional[tuple] = None  # see expect_ahead: (schedule, phase, step, batch shape, decoded views)

    def chore(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when this rank next has to wait for a message, and at the latest before its next backward
        (or at the end of the next run). For work that must happen before a backward but need not delay a
        forward: the step loop's ``zero_grad`` frees every gradient, 0.4-1 ms on a rank of the benchmark
        model, which sat between the optimizer step and the next step's first forward -- on the critical
        path, which starts there on rank 0."""
        self._chores.append(fn)

    def expect_ahead(self, sched: Schedule, phase: int, step: int, batch_shape: torch.Size) -> None:
        """Post the receives of the next run -- ``sched`` in ``phase`` for ``step``, on a batch of
        ``batch_shape`` -- at this rank's next wait (a :meth:`chore`) rather than when that run starts. Rank 0
        starts a step on the critical path, where posting a dozen receives (and making their decoded views)
        took 1-3 ms in scripts/bench_overhead.py's interleaved run. The next :meth:`run` must be that one: the
        receives are in each peer's order only if nothing else is posted between (no evaluation run)."""
        if sched.asynchronous and phase == PHASE_TRAIN:  # its messages depend on the weight stash's state then
            return
        self.chore(lambda: self._post_ahead(sched, phase, step, batch_shape))

    def _post_ahead(self, sched: Schedule, phase: int, step: int, batch_shape: torch.Size) -> None:
        m = sched.n_microbatches
        chunks = (torch.empty(batch_shape, dtype=torch.int64).chunk(m), None, None)  # shapes are all it reads
        ctx = _Step(sched, phase, step, phase == PHASE_TRAIN, False, True, False, {step: chunks}, InFlight(),
                    StepResult())
        self._post_receives(ctx)
        self._ahead = (sched, phase, step, tuple(batch_shape), ctx.decoded)

    def _housekeeping(self) -> None:
        """About to wait (or about to run a backward): the chores, and the graphs of finished microbatches."""
        chores, self._chores = self._chores, []
        for fn in chores:
            fn()
        self._spent.clear()

    def run(self, sched: Schedule, phase: int, step: int, x: torch.Tensor, y: torch.Tensor,
            ids: torch.Tensor, emulate: bool = True, measure_error: bool = False) -> StepResult:
        """Run this rank's actions of ``sched`` for one step on a batch split into ``sched.n_microbatches``.

        ``measure_error``: also decode each payload on the sender (outside the clock) to record the
        relative reconstruction error per boundary. Evaluation (``PHASE_EVAL``) always runs the
        synchronous way, on the live weights.
        """
        m, train = sched.n_microbatches, phase == PHASE_TRAIN
        # Per-sample codecs key their caches on training sample ids; evaluation passes none.
        chunks = (x.chunk(m), y.chunk(m), ids.chunk(m) if train else [None] * m)
        asynchronous = train and sched.asynchronous
        if asynchronous:
            self.stash.begin_step(step, chunks)
            batches, state = self.stash.batches, self.stash.state
        else:
            batches, state = {step: chunks}, InFlight()
        ctx = _Step(sched, phase, step, train, asynchronous, emulate, measure_error, batches, state, StepResult())
        self.transport.start_round()
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            self._post_receives(ctx)
        elif ahead[0] is sched and ahead[1:4] == (phase, step, tuple(x.shape)):
            ctx.decoded = ahead[4]
        else:
            raise RuntimeError(f"rank {self.rank}: receives were posted ahead for step {ahead[2]} of "
                               f"{ahead[0].name!r}, but step {step} of {sched.name!r} runs")
        for a, b, i in self._work(ctx, self.rank):
            # Messages that came in are noticed (and copied out of a shared-memory ring) before a compute or a
            # receive, not before a send: a send that follows a compute goes out first.
            if a.kind not in _SENDS:
                self.transport.progress()
            self._act(ctx, a, b, i)
        if self._chores:  # a run without a wait or a backward (evaluation)
            self._housekeeping()
        if asynchronous:
            self.stash.end_step(step, m)
        elif train and state:  # evaluation leaves its forwards' outputs: dropped with the step
            raise RuntimeError(f"rank {self.rank}: schedule {sched.name!r} left {len(state)} tensors in flight "
                               "at the end of a synchronous step")
        return ctx.res

    def _work(self, ctx: _Step, rank: int) -> list[tuple[Action, int, int]]:
        """``rank``'s actions in this run, each with its (batch, microbatch of the batch)."""
        if ctx.asynchronous:
            return ctx.sched.step_actions(rank, ctx.step, ctx.step == self.stash.last_step)
        return [(a, ctx.step, a.microbatch) for a in ctx.sched.actions[rank]]

    def _post_receives(self, ctx: _Step) -> None:
        """Post this run's receives: each message a peer sends this rank in the run, in the peer's order."""
        for src, ch, b, s, i, nbytes, spec in self._incoming(ctx):
            key = (ctx.phase, b, s, i)
            payload = self.transport.expect(src, ch, key, nbytes)
            if payload is not None and self.device.type == "cpu":
                codec, shape, dtype = spec
                view = codec.decoded_view(payload, shape, dtype)
                if view is not None:
                    ctx.decoded[(ch, key)] = view.requires_grad_(ctx.train) if ch == CH_FWD else view

    def _incoming(self, ctx: _Step) -> list[tuple[int, int, int, int, int, Optional[int], Optional[tuple]]]:
        """(global source rank, channel, batch, stage, microbatch, payload length or None, (codec, shape, dtype)
        of what it decodes to or None) of each message this run receives, in the order its peers send them. A
        synchronous step's list is the same every step but for the batch (the step): it is worked out once per
        schedule, phase and batch shape."""
        shapes = tuple(tuple(x.shape) for x in ctx.batches[ctx.step][0])
        key = (id(ctx.sched), ctx.train, shapes)
        if not ctx.asynchronous and key in self._incoming_cache:
            _, messages = self._incoming_cache[key]
            return [(src, ch, ctx.step, s, i, n, spec) for src, ch, _, s, i, n, spec in messages]
        sched, messages = ctx.sched, []
        peers = {sched.stage_to_rank[n] for s in self.stages for n in (s - 1, s + 1) if 0 <= n < sched.n_stages}
        for src in sorted(peers - {self.rank}):
            for a, b, i in self._work(ctx, src):
                if a.kind in _RECEIVE and peer_of(a, sched) == self.rank:
                    s = a.stage + 1 if a.kind == Kind.SEND_F else a.stage - 1
                    kind = _RECEIVE[a.kind]
                    codec = self.stages[s].codecs.for_action(kind, ctx.train)
                    shape, dtype, nbytes = (self._spec(codec, s, ctx.batches[b][0][i].shape)
                                            if self.stages[s].sized(kind) else (None, None, None))
                    messages.append((src + self.base, _CHANNEL[kind], b, s, i, nbytes,
                                     (codec, shape, dtype) if nbytes is not None else None))
        if not ctx.asynchronous:  # the schedule is kept with its entry: its id stays its own
            self._incoming_cache[key] = (sched, messages)
        return messages

    # ---- actions ----------------------------------------------------------------------------

    def _act(self, ctx: _Step, a: Action, b: int, i: int) -> None:
        kind = a.kind
        if kind == Kind.FORWARD:
            self._forward(ctx, a, b, i)
        elif kind in _BACKWARD_EVENT:
            self._backward(ctx, a, b, i)
        elif kind in (Kind.SEND_F, Kind.SEND_B):
            self._send(ctx, a, b, i)
        else:
            self._receive(ctx, a, b, i)

    def _forward(self, ctx: _Step, a: Action, b: int, i: int) -> None:
        s, k, st = a.stage, (a.stage, b, i), ctx.state
        xs, ys, _ = ctx.batches[b]
        # Boundary methods that send token ids (lowbw.boundary, e.g. subspace): the ids ride in the forward
        # payload (stage.attach_tokens / split_tokens), are kept per (stage, batch, microbatch) in st.tokens,
        # passed to the stage's module and sent on with its output. Backward messages never carry them.
        tokens = st.tokens.pop(k, None)  # the ids that crossed with the input, if the method sends them
        if s == 0:
            inp = xs[i].to(self.device)
            tokens = inp if self.stages[s].sends_tokens else None
        elif k in st.inputs:  # received from the previous stage's rank
            inp = st.inputs[k]
        else:  # the previous stage is on this rank: take its output directly
            inp = st.outputs[(s - 1, b, i)].detach().requires_grad_(ctx.train)
            tokens = st.tokens.pop((s - 1, b, i), None)
        st.inputs[k] = inp
        last = s == ctx.sched.n_stages - 1
        if tokens is not None and not last:  # to send on with this stage's output
            st.tokens[k] = tokens
        stashed = self.stash is not None and ctx.train and ctx.sched.asynchronous

        def fwd():
            with torch.set_grad_enabled(ctx.train):
                out = self.stash.forward(s, b, inp, tokens) if stashed else self.stages[s].module(inp, tokens)
                return self.scaled_loss(out, ys[i], ctx.sched.n_microbatches, ctx.res) if last else out

        out, t0, t1 = self.clock.compute(fwd, self.planned(a))
        st.outputs[k] = out
        ctx.record(self.me, "forward", t0, t1, a)
        if stashed:
            self.stash.log_forward(s, b, i, ctx.step)

    def _backward(self, ctx: _Step, a: Action, b: int, i: int) -> None:
        if self._chores:
            self._housekeeping()
        s, k, st = a.stage, (a.stage, b, i), ctx.state
        out = st.outputs[k]
        grad = None if s == ctx.sched.n_stages - 1 else st.out_grads[k]
        inp = st.inputs.get(k)
        if a.kind == Kind.FULL_BACKWARD:
            def run():
                torch.autograd.backward(out, grad)
        elif a.kind == Kind.BACKWARD_INPUT:
            def run():
                if inp is not None and inp.requires_grad:  # stage 0's input is token ids: nothing to do until W
                    torch.autograd.backward(out, grad, inputs=[inp], retain_graph=True)
        else:
            def run():
                torch.autograd.backward(out, grad, inputs=[p for p in self.stages[s].module.parameters()
                                                           if p.requires_grad])

        timed = lambda: self.clock.compute(run, self.planned(a))  # noqa: E731
        if self.stash is not None and ctx.sched.asynchronous:
            _, t0, t1 = self.stash.backward(s, b, i, ctx.step, timed)
        else:
            _, t0, t1 = timed()
        ctx.record(self.me, _BACKWARD_EVENT[a.kind], t0, t1, a)
        prev_local = s > 0 and (s - 1) in self.stages
        if a.kind != Kind.BACKWARD_WEIGHT and prev_local:  # hand the input's gradient to the stage below
            st.out_grads[(s - 1, b, i)] = st.inputs.pop(k).grad
        if a.kind != Kind.BACKWARD_INPUT:
            self._spent.append(st.outputs.pop(k))
            if len(self._spent) > 2 * ctx.sched.n_microbatches:  # never waited for long: free them now
                self._spent.clear()
            st.out_grads.pop(k, None)
            if s == 0:
                st.inputs.pop(k, None)

    def _send(self, ctx: _Step, a: Action, b: int, i: int) -> None:
        """SEND_F / SEND_B: encode (busy), hand the payload to the link, count its bytes.

        What the message does not need -- its events, the codec's statistics, the error measurement -- comes
        after it is on the link: a send follows a compute, with the caches cold, where each few lines of Python
        cost tens of microseconds (scripts/bench_cold_calls.py) while the receiver may be waiting for it."""
        s, k, st = a.stage, (a.stage, b, i), ctx.state
        if a.kind == Kind.SEND_F:
            x, key = st.outputs[k].detach(), (ctx.phase, b, s + 1, i)
            if not ctx.train:
                del st.outputs[k]
        else:
            x, key = st.inputs.pop(k).grad, (ctx.phase, b, s - 1, i)
        codec = self.stages[s].codecs.for_action(a.kind, ctx.train)
        ids = ctx.batches[b][2][i]
        tokens = st.tokens.pop(k, None) if a.kind == Kind.SEND_F else None  # boundary method's ids (see _forward)

        def encode():
            if tokens is None:
                return None, codec.encode_parts(x, ids)
            inner = codec.encode(x, ids)  # with the boundary method's ids: one payload holding both
            return inner, (attach_tokens(inner, tokens),)

        (inner, parts), t0, t1 = self.clock.compute(encode, self.planned(a))
        length = sum(part_nbytes(p) for p in parts)
        nbytes = (self._agreed_length(a, codec, x, length, ctx.batches[b][0][i].shape)
                  if self.stages[s].sized(a.kind) else None)
        dst = peer_of(a, ctx.sched) + self.base
        ch = _CHANNEL[a.kind]
        self.transport.send(dst, ch, key, parts, ctx.emulate, sized=nbytes is not None, nbytes=length)
        now = self.clock.now()
        ctx.record(self.me, "encode", t0, t1, a)
        boundary = f"{s}.fwd" if a.kind == Kind.SEND_F else f"{s - 1}.bwd"
        self._count_encoded(ctx, codec, x, ids, inner, parts, length, t1 - t0,
                            ctx.res.codecs.setdefault(boundary, CodecStats()))
        charged = self.transport.charged_bytes(ch, length)  # a target regime's, if any
        ctx.res.bytes_sent[dst] = ctx.res.bytes_sent.get(dst, 0) + charged
        ctx.record(self.me, "send", now, now, a, charged, dst)

    def _receive(self, ctx: _Step, a: Action, b: int, i: int) -> None:
        """RECV_F / RECV_B: wait for delivery on this rank's clock, then decode (busy)."""
        s, k, st = a.stage, (a.stage, b, i), ctx.state
        src = peer_of(a, ctx.sched) + self.base
        t0 = self.clock.now()
        if (self._spent or self._chores) and not self.transport.arrived(src, _CHANNEL[a.kind], (ctx.phase, b, s, i)):
            self._housekeeping()  # about to wait anyway
        ch, key = _CHANNEL[a.kind], (ctx.phase, b, s, i)
        msg = self.transport.recv(src, ch, key)
        self.clock.wait_until(self.transport.delivery_time(msg, ctx.emulate))
        now = self.clock.now()
        ctx.record(self.me, "recv_wait", t0, now, a, msg.nbytes, src)
        tensor = ctx.decoded.pop((ch, key), None)
        if tensor is not None:  # decoded already: a view of the message's buffer, made when it was posted
            ctx.record(self.me, "decode", now, now, a)
        else:
            boundary = f"{s - 1}.fwd" if a.kind == Kind.RECV_F else f"{s}.bwd"
            codec = self.stages[s].codecs.for_action(a.kind, ctx.train)
            payload = msg.payload
            if a.kind == Kind.RECV_F and self.stages[s].sends_tokens:  # boundary method's ids (see _forward)
                payload, st.tokens[k] = split_tokens(payload)
            tensor = self._decode(ctx, codec, payload, ctx.batches[b][2][i], a,
                                  ctx.res.codecs.setdefault(boundary, CodecStats()))
            if a.kind == Kind.RECV_F:
                tensor.requires_grad_(ctx.train)
        if a.kind == Kind.RECV_F:
            st.inputs[k] = tensor
        else:
            st.out_grads[k] = tensor

    # ---- pieces -----------------------------------------------------------------------------

    def _agreed_length(self, a: Action, codec: Codec, x: torch.Tensor, length: int,
                       tokens: torch.Size) -> Optional[int]:
        """The payload length the receiver posted for (None: unsized); raises if the tensor or the
        codec disagree with what the receiver computed, instead of letting the link abort."""
        shape, dtype, nbytes = self._spec(codec, a.stage, tokens)
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise RuntimeError(f"rank {self.rank} action {a}: sends a {x.dtype} tensor of shape {tuple(x.shape)}, "
                               f"but its receiver expects {dtype} {shape} (the stage's boundary spec)")
        if nbytes is not None and nbytes != length:
            raise RuntimeError(f"codec {codec.name!r}: encode gave {length} bytes for {dtype} {shape}, "
                               f"payload_nbytes says {nbytes}")
        return nbytes

    def _spec(self, codec: Codec, stage: int,
              tokens: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype, Optional[int]]:
        """Shape and dtype of what crosses a boundary of ``stage`` for microbatch tokens ``tokens``, and
        ``codec``'s payload length for it: worked out once (a length depends on shape and dtype alone)."""
        key = (id(codec), stage, tuple(tokens))
        if key not in self._specs:
            shape, dtype = self.stages[stage].boundary(tokens)
            self._specs[key] = (codec, shape, dtype, codec.payload_nbytes(shape, dtype))  # the codec kept: its id
        return self._specs[key][1:]

    def scaled_loss(self, logits: torch.Tensor, targets: torch.Tensor, m: int, res: StepResult) -> torch.Tensor:
        """Last stage: record the microbatch's loss, return it divided by m (gradients of the batch mean)."""
        loss = GPTStage.loss(logits, targets.to(self.device))
        res.loss_sum += float(loss.detach())
        res.n_loss += 1
        return loss / m

    def _count_encoded(self, ctx: _Step, codec: Codec, x: torch.Tensor, ids, inner: Optional[torch.Tensor],
                       parts: tuple[Part, ...], length: int, seconds: float, stats: CodecStats) -> None:
        """Add a sent message to its boundary's statistics; on a measured step, its reconstruction error too
        (``x`` decoded from its payload, outside the clock). ``inner``: the codec's payload when the message
        also carries token ids (lowbw.boundary), else None."""
        stats.messages += 1
        stats.raw_bytes += x.numel() * x.element_size()
        stats.wire_bytes += length
        stats.encode_s += seconds
        if ctx.measure_error:
            if codec.name != "none":  # lossless: the error is 0 without a pass over x
                whole = len(parts) == 1 and isinstance(parts[0], torch.Tensor)
                payload = (inner if inner is not None else parts[0] if whole
                           else torch.cat([part_tensor(p) for p in parts]))
                with self.clock.paused(), torch.no_grad():
                    x_hat = codec.reconstruction(payload, ids).to(x.dtype)
                    stats.err_sq += float((x_hat - x).float().pow(2).sum())
                    stats.norm_sq += float(x.float().pow(2).sum())
            stats.measured += 1

    def _decode(self, ctx: _Step, codec: Codec, payload: torch.Tensor, ids, a: Action,
                stats: CodecStats) -> torch.Tensor:
        payload = payload.to(self.device)

        def decode():
            x = codec.decode(payload, ids)
            # A view of the message's own buffer (codec none) is the receiver's alone: kept as it is.
            # Anything else may be a codec's buffer it reuses for the next message: copied.
            own = payload.data_ptr() <= x.data_ptr() < payload.data_ptr() + payload.numel()
            return x if own else x.clone()

        x, t0, t1 = self.clock.compute(decode, self.planned(a))
        ctx.record(self.me, "decode", t0, t1, a)
        stats.decode_s += t1 - t0
        return x
