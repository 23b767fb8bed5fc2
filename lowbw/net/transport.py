"""Keyed, emulated messages between ranks: receives posted early, sends issued from the compute thread.

A message is a codec payload with a key ``(phase, batch, stage, microbatch)`` and the times the link
model needs. It travels one of two ways, by whether its length is known before it exists:

* **sized** (every codec whose ``payload_nbytes`` gives the length): one buffer -- an 80-byte meta
  block, then the payload -- on the channel's message tag. The receiver posts it with
  :meth:`Transport.expect` before the step starts, into a buffer of exactly that size, in the order
  the sender will send, so it moves as soon as it is sent and the compute thread takes it without a
  hand-over between threads;
* **unsized** (AQ-SGD, whose length follows its cache; the JSON reports to rank 0): the meta block
  alone on the channel's header tag, then the payload on its payload tag. Headers are posted early
  like sized messages; a payload's receive is posted once its header is in (:meth:`progress`,
  between actions, or when the message is wanted).

Three tags a channel because a gloo receive takes the next message its peer sent *on that tag*,
whatever its size: a receive posted early for a header would take a payload sent before it (and
gloo aborts the process when a message is longer than the buffer). docs/architecture.md,
"Messages", tells that story and a second trap: a send whose handle is dropped is cancelled, so
every send handle is kept until it is waited for -- a round later (:meth:`start_round`), when its
receiver has certainly posted the receive.

Emulation is arithmetic. The sender's link model charges its uplink and writes into the meta block
the arrival time (virtual clock) or, for the wall clock, when the last bit would have left the
emulated uplink (``release``, on this host's CLOCK_MONOTONIC) and how long after the send that is
(``hold``). The receiver charges its downlink and waits until delivery: on the wall clock, latency
and jitter count from ``release`` when both ranks share a host (all processes of a host share
``perf_counter``) and from the message's real arrival plus ``hold`` when they do not, so no clock
synchronisation between machines is needed. The real arrival is noticed between actions (before each
but a send, :meth:`progress` reads the meta block's first word, which the sender writes non-zero).

A receive waits at most ``timeout_s`` (wall) for its message; a dead or silent peer becomes a
:class:`PeerError` naming its rank. Which rank, and whether it died, hangs or sits behind a dead
link, is the verdict of the :class:`~lowbw.net.liveness.LinkWatch` hook (heartbeats), which this
module tells when a message is handed to the link (``sent``), when one is taken off it (``arrived``:
in, and on the wall clock past the emulated uplink's ``release``, as if the sender had held it till
then), around every blocking wait (``waiting``), and asks for the error when a wait times out or a
link fails. On the wall clock a message whose emulated uplink would not release it within
``timeout_s`` of the receive is such a timeout too (:meth:`delivery_time`). Only the compute thread
uses the pipeline channels; the control channel's receives (:meth:`recv_json`) may run on another
thread (rank 0's collector).

A regime (lowbw/regime.py) makes the link model charge a target deployment's message length instead
of the payload's (``charge``, :meth:`charged_bytes`); what moves on the wire is the payload.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import numpy as np
import torch

from lowbw.compress.payload import Part, part_nbytes, part_tensor
from lowbw.net.clock import Clock
from lowbw.net.link import LinkModel
from lowbw.net.liveness import LinkWatch
from lowbw.net.wire import DONE, GlooWire, Handle, Wire

# Channels: activations forward, gradients backward, run control (reports to rank 0, never emulated),
# and the synchronisation of a stage's replicas (lowbw.replicas: emulated on the same links as the pipeline).
CH_FWD, CH_BWD, CH_CTRL, CH_SYNC = 1, 2, 3, 4
# Tags of a channel: sized messages; headers of unsized ones; payloads of unsized ones.
_MESSAGE, _HEADER, _PAYLOAD = 0, 1, 2
_META = 80  # int64 x 10: magic, nbytes, phase, batch, stage, microbatch, arrival, release, hold, host
_MAGIC = 0x6C6F7762_6D736721  # written last by the sender: non-zero once a message is in
_HOST = zlib.crc32(socket.gethostname().encode())  # same host: perf_counter (CLOCK_MONOTONIC) is shared
_CTRL_WINDOW = 16  # control sends kept in flight before the oldest is waited for (rank 0 reads them late)


def tag(channel: int, part: int) -> int:
    return 4 * channel + part


#: The control channel's tags: on the default group, apart from the pipeline's per-direction ones.
CONTROL_TAGS = frozenset(tag(CH_CTRL, part) for part in (_MESSAGE, _HEADER, _PAYLOAD))
#: The pipeline's tags (activations and gradients): only the compute thread sends and receives on them.
PIPELINE_TAGS = frozenset(tag(ch, part) for ch in (CH_FWD, CH_BWD) for part in (_MESSAGE, _HEADER, _PAYLOAD))


@dataclass
class Message:
    src: int
    channel: int
    key: tuple[int, int, int, int]  # (phase, batch, stage, microbatch)
    payload: torch.Tensor  # uint8, CPU
    sent_arrival: float  # virtual: arrival time computed by the sender
    received_wall: float  # time.perf_counter() when this rank saw the message in (at the latest)
    sent_host: int = 0  # the sender's host id
    sent_wall: float = 0.0  # sender's perf_counter when the last bit left its emulated uplink ("release")
    hold: float = 0.0  # seconds from the send to that moment
    deadline: float = float("inf")  # perf_counter by which the receive wanted it (timeout_s after it began)
    # the payload's bytes, from the meta block: asking the payload is a torch call, tens of us right after a
    # compute (scripts/bench_cold_calls.py), and a receive's events and charge need it; None: ask the payload
    length: Optional[int] = None

    @property
    def nbytes(self) -> int:
        return self.length if self.length is not None else int(self.payload.numel())


class _Incoming:
    """A receive posted for one expected message (and, unsized, its payload's receive once known)."""

    __slots__ = ("src", "ch", "key", "buf", "meta", "handle", "sized", "payload", "body", "body_handle", "received")

    def __init__(self, src: int, ch: int, key: tuple, buf: torch.Tensor, meta: memoryview, handle: Handle,
                 sized: bool):
        self.src, self.ch, self.key, self.buf, self.meta = src, ch, key, buf, meta
        self.handle, self.sized = handle, sized
        # A sized message's payload, sliced now, when posting, rather than when it is taken: there it would be
        # one more torch call with the caches cold, on the critical path.
        self.payload: Optional[torch.Tensor] = buf[_META:] if sized else None
        self.body: Optional[torch.Tensor] = None
        self.body_handle: Optional[Handle] = None
        self.received: Optional[float] = None

    def arrived(self) -> bool:
        return self.meta[0] == _MAGIC

    def released(self, now: float) -> bool:
        """In, and past the moment its last bit left the sender's emulated uplink (wall clock)."""
        if not self.arrived():
            return False
        _, _, _, _, _, _, _, release, hold, host = _META_FORMAT.unpack_from(self.meta)
        return now >= (release if host == _HOST else (self.received if self.received is not None else now) + hold)


_META_FORMAT = struct.Struct("<6q3dq")  # the meta block's ten words, as _META describes
assert _META_FORMAT.size == _META


def _meta_words(nbytes: int, key: tuple, arrival: float, hold: float) -> bytes:
    """A message's meta block: the arrival time the sender's link model gave, and when the last bit leaves
    its emulated uplink on this host's clock (``release``, now + ``hold``)."""
    return _META_FORMAT.pack(_MAGIC, nbytes, *key, arrival, time.perf_counter() + hold, hold, _HOST)


def _meta_block(nbytes: int, key: tuple, arrival: float, hold: float) -> torch.Tensor:
    """:func:`_meta_words` as a tensor, for a message sent on its own (an unsized message's header)."""
    return torch.frombuffer(bytearray(_meta_words(nbytes, key, arrival, hold)), dtype=torch.uint8)


def _empty_meta_buffer(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A receive buffer for a meta block and ``nbytes`` of payload, and the meta block's words, the first zeroed
    (nothing in yet). Made in numpy and shared with torch: one torch call where torch alone needs four, a few
    us each, and a step posts a receive for every message it takes."""
    arr = np.empty(_META + nbytes, dtype=np.uint8)
    meta = memoryview(arr)[:_META].cast("q")  # a memoryview: cheaper than numpy's scalars with the caches cold
    meta[0] = 0
    return torch.from_numpy(arr), meta


class Transport:
    def __init__(self, rank: int, link: Optional[LinkModel], clock: Clock, timeout_s: float,
                 wire: Optional[Wire] = None, charge: Optional[dict[int, tuple[int, int]]] = None,
                 watch: Optional[LinkWatch] = None):
        """``charge``: channel -> (target, run) bytes: the link model charges a payload of n bytes on that
        channel round(n * target / run) bytes -- a target deployment's messages (lowbw/regime.py); None or a
        missing channel: its length. ``watch``: the liveness hook (None: plain verdicts)."""
        self.rank, self.link, self.timeout_s = rank, link, timeout_s
        self._charge = dict(charge or {})
        self.watch = watch or LinkWatch()  # liveness hook: counts, waits, verdicts on timeouts and failures
        self.virtual = clock.virtual
        self.now = clock.now  # the run clock (seconds), read only from the compute thread
        self.wire = wire if wire is not None else GlooWire()
        self._timeout = timedelta(seconds=timeout_s)
        self._expected: dict[tuple[int, int, tuple], _Incoming] = {}
        self._unsized: dict[tuple[int, int], deque[_Incoming]] = {}  # payload receive not posted yet, in order
        # Per (source, tag), in the order they will arrive (a tag's messages fill its receives in posting order):
        # the expected messages not yet seen in, and those not yet reported to the watch as arrived. Each check
        # looks at the head of a lane only, not at every message of the step.
        self._unstamped: dict[tuple[int, int], deque[_Incoming]] = {}
        self._uncounted: dict[tuple[int, int], deque[_Incoming]] = {}
        self._round = 0
        self._sends: deque[tuple[int, int, Handle, tuple]] = deque()  # (round, dst, handle, buffers kept alive)
        self._ctrl_sends: deque[tuple[int, int, Handle, tuple]] = deque()
        self._ctrl_lock = threading.Lock()
        self._ctrl_inbox: dict[tuple[int, tuple], bytes] = {}

    # ---- waiting, with failures named ------------------------------------------------------------

    def _wait(self, handle: Handle, peer: int, key: Optional[object]) -> None:
        """Wait for a posted operation; ``key``: the message received (None: a send). A receive that takes
        timeout_s, or any failure, becomes the watch's verdict."""
        t0 = time.monotonic()
        try:
            handle.wait(self._timeout)
        except RuntimeError as e:
            if threading.current_thread() is threading.main_thread():  # the compute thread owns the list
                self._count_arrivals()  # the verdict compares what was sent with what got here
            if key is not None and time.monotonic() - t0 >= 0.99 * self.timeout_s:
                raise self.watch.receive_timed_out(self.rank, peer, key, self.timeout_s) from None
            raise self.watch.link_failed(self.rank, peer, e) from None

    def _post(self, sending: bool, buf: torch.Tensor, peer: int, t: int) -> Handle:
        try:
            return (self.wire.isend if sending else self.wire.irecv)(buf, peer, t)
        except RuntimeError as e:  # the connection is already closed: the peer is gone
            raise self.watch.link_failed(self.rank, peer, e) from None

    def _count_arrivals(self) -> None:
        """Tell the watch of each message taken off its link since the last call (see the module's docstring)."""
        now = time.perf_counter()
        for lane in self._uncounted.values():
            while lane and (lane[0].arrived() if self.virtual else lane[0].released(now)):
                self.watch.arrived(lane.popleft().src)

    # ---- rounds: send handles live until their receivers have certainly posted -----------------

    def start_round(self) -> None:
        """A new executor run begins: wait for the sends of two runs ago (long complete in practice).

        Every receiver posts the messages of a run at the start of its own run, and no rank starts
        run N+1 before each of its peers has started run N-1 (a run's messages need their peers'
        runs), so these waits return at once; they free the buffers and surface errors."""
        self._round += 1
        while self._sends and self._sends[0][0] <= self._round - 2:
            _, dst, handle, _ = self._sends.popleft()
            self._wait(handle, dst, None)

    def flush(self, control_only: bool = False) -> None:
        """Wait until every message sent so far (``control_only``: every report) has left this process: a gloo
        send moves its bytes only once the receiver has posted its receive, so a process that exits first
        loses it."""
        for q in (self._ctrl_sends,) if control_only else (self._sends, self._ctrl_sends):
            while q:
                _, dst, handle, _ = q.popleft()
                self._wait(handle, dst, None)

    def close(self) -> None:
        """The run is over on this rank: every send completed, every expected message taken."""
        self.flush()
        left = sorted(str(k) for k in self._expected)
        if left:
            raise RuntimeError(f"rank {self.rank}: {len(left)} expected message(s) never taken: {', '.join(left[:5])}")

    # ---- pipeline messages (compute thread) ------------------------------------------------------

    def expect(self, src: int, ch: int, key: tuple[int, int, int, int],
               nbytes: Optional[int]) -> Optional[torch.Tensor]:
        """Post the receive of message ``key`` from ``src`` (``nbytes``: its payload length, None if unknown);
        returns the buffer its payload will be in (sized messages), which :meth:`recv` hands out as it is.

        Calls for one (src, channel) must follow the order in which ``src`` sends."""
        if (src, ch, key) in self._expected:
            raise RuntimeError(f"rank {self.rank}: message {key} from rank {src} expected twice")
        buf, meta = _empty_meta_buffer(nbytes if nbytes is not None else 0)
        sized = nbytes is not None
        t = tag(ch, _MESSAGE if sized else _HEADER)
        inc = _Incoming(src, ch, key, buf, meta, self._post(False, buf, src, t), sized)
        self._expected[(src, ch, key)] = inc
        if (src, t) not in self._unstamped:
            self._unstamped[(src, t)], self._uncounted[(src, t)] = deque(), deque()
        self._unstamped[(src, t)].append(inc)
        self._uncounted[(src, t)].append(inc)
        if not sized:
            self._unsized.setdefault((src, ch), deque()).append(inc)
        return inc.payload

    def send(self, dst: int, ch: int, key: tuple[int, int, int, int],
             payload: Union[torch.Tensor, tuple[Part, ...]], emulate: bool = True,
             sized: bool = True, charge: Optional[int] = None, nbytes: Optional[int] = None) -> float:
        """Send a payload -- a uint8 tensor, or pieces whose concatenation it is (Codec.encode_parts: pieces are
        copied into the message before this returns, so they may be views of a live tensor) -- and return its
        emulated arrival time (run clock), or now when not emulated.

        ``sized``: the receiver expects exactly this length (the codec's ``payload_nbytes``). ``charge``: bytes
        the link model charges instead of :meth:`charged_bytes` (a regime's replica messages, lowbw.replicas).
        ``nbytes``: the payload's length, when the caller knows it."""
        parts = (payload.detach().reshape(-1),) if isinstance(payload, torch.Tensor) else tuple(payload)
        n = nbytes if nbytes is not None else sum(part_nbytes(p) for p in parts)
        t = self.now()
        arrival, hold = t, 0.0
        if emulate and self.link is not None:
            timing = self.link.send(dst, self.charged_bytes(ch, n) if charge is None else charge, t)
            arrival, hold = timing.arrival, timing.tx_done - t
        if sized:
            try:
                handle, keep = self.wire.isend_parts((_meta_words(n, key, arrival, hold),) + parts, dst,
                                                     tag(ch, _MESSAGE))
            except RuntimeError as e:  # the connection is already closed: the peer is gone
                raise self.watch.link_failed(self.rank, dst, e) from None
            if handle is not DONE:  # a shared-memory send is complete when it returns: nothing to wait for
                self._sends.append((self._round, dst, handle, keep))
        else:
            body = part_tensor(parts[0]) if len(parts) == 1 else torch.cat([part_tensor(p).cpu() for p in parts])
            self._send_unsized(self._sends, dst, ch, _meta_block(n, key, arrival, hold),
                               body.to("cpu", torch.uint8).contiguous())
        self.watch.sent(dst)
        return arrival

    def charged_bytes(self, ch: int, nbytes: int) -> int:
        """Bytes the link model charges for a payload of ``nbytes`` on channel ``ch``."""
        if ch not in self._charge:
            return nbytes
        target, run = self._charge[ch]
        return (2 * nbytes * target + run) // (2 * run)  # round(n * target / run) in integers

    def _send_unsized(self, q: deque, dst: int, ch: int, head: torch.Tensor, body: torch.Tensor) -> None:
        q.append((self._round, dst, self._post(True, head, dst, tag(ch, _HEADER)), (head,)))
        if body.numel():
            q.append((self._round, dst, self._post(True, body, dst, tag(ch, _PAYLOAD)), (body,)))

    def progress(self) -> None:
        """Between actions: note messages that came in, post the payload receives of unsized ones.

        Leaves a wire that moves messages only when polled (lowbw.net.shm) alone: its messages are taken when
        their receive comes (:meth:`arrived`, :meth:`recv`) or while the rank waits, not copied in here, where
        the copy of a message needed later delayed the compute that comes next."""
        now = time.perf_counter()
        for lane in self._unstamped.values():
            while lane and lane[0].arrived():
                inc = lane.popleft()
                if inc.received is None:  # not taken by recv already
                    inc.received = now
        self._count_arrivals()
        for q in self._unsized.values():
            while q and q[0].arrived():
                self._post_payload(q.popleft())

    def _post_payload(self, inc: _Incoming) -> None:
        self._wait(inc.handle, inc.src, inc.key)  # the header is in already: returns at once
        inc.body = torch.empty(int(inc.meta[1]), dtype=torch.uint8)
        if inc.body.numel():
            inc.body_handle = self._post(False, inc.body, inc.src, tag(inc.ch, _PAYLOAD))

    def arrived(self, src: int, ch: int, key: tuple[int, int, int, int]) -> bool:
        """Whether the expected message ``key`` (its header, if unsized) is in."""
        self.wire.poll()
        inc = self._expected.get((src, ch, key))
        return inc is not None and inc.arrived()

    def recv(self, src: int, ch: int, key: tuple[int, int, int, int]) -> Message:
        """Wait (at most timeout_s of wall time) for the expected message ``key`` from ``src`` on ``ch``."""
        inc = self._expected.pop((src, ch, key), None)
        if inc is None:
            raise RuntimeError(f"rank {self.rank}: message {key} from rank {src} was never expected")
        deadline = time.perf_counter() + self.timeout_s
        self._count_arrivals()
        self.watch.waiting(src)
        try:
            if inc.sized:
                self._wait(inc.handle, src, key)
            else:
                q = self._unsized[(src, ch)]
                while inc.body is None:  # payload receives go out in the sender's order
                    self._post_payload(q.popleft())
                if inc.body_handle is not None:
                    self._wait(inc.body_handle, src, key)
        finally:
            self.watch.waiting(None)
        if inc.received is None:
            inc.received = time.perf_counter()
        self._count_arrivals()
        magic, n, *got, arrival, release, hold, host = _META_FORMAT.unpack_from(inc.meta)
        if magic != _MAGIC or tuple(got) != tuple(key):
            raise RuntimeError(f"rank {self.rank}: expected message {key} from rank {src}, got {tuple(got)}: "
                               "the two ranks disagree on the order of their messages")
        payload = inc.payload if inc.sized else inc.body  # a sized message's length is the receive's (the wire checks)
        return Message(src, ch, key, payload, arrival, inc.received, host, release, hold, deadline, n)

    def delivery_time(self, msg: Message, emulate: bool = True, charge: Optional[int] = None) -> float:
        """When the message is usable on this rank's clock, charging this rank's downlink.

        Wall clock: a message the sender's emulated uplink releases later than ``timeout_s`` after its
        receive began (an outage, a link far too slow) is waited for until then and becomes the watch's
        verdict, as if it had never come."""
        if not emulate or self.link is None:
            return self.now() if not self.virtual else msg.sent_arrival
        if self.virtual:
            arrival = msg.sent_arrival
        else:  # from when it left the sender's emulated uplink (same host) or really arrived here, plus hold
            left = msg.sent_wall if msg.sent_host == _HOST else msg.received_wall + msg.hold
            if left > msg.deadline:
                self._held_past_deadline(msg)
            arrival = self.link.arrival_after_receipt(msg.src, self.now() - (time.perf_counter() - left))
        return self.link.deliver(msg.src, self.charged_bytes(msg.channel, msg.nbytes) if charge is None else charge,
                                 arrival)

    def _held_past_deadline(self, msg: Message) -> None:
        """Wait out the receive's timeout on a message still on the sender's emulated uplink, then fail."""
        self.watch.waiting(msg.src)
        try:
            while (left := msg.deadline - time.perf_counter()) > 0:
                time.sleep(min(left, 0.1))
                self._count_arrivals()  # other messages keep arriving meanwhile: the verdict counts them
        finally:
            self.watch.waiting(None)
        raise self.watch.receive_timed_out(self.rank, msg.src, msg.key, self.timeout_s)

    # ---- control messages (reports to rank 0), never emulated ------------------------------------

    def send_json(self, dst: int, key: tuple[int, int, int, int], obj: dict) -> None:
        body = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        head = _meta_block(body.numel(), key, 0.0, 0.0)
        self._send_unsized(self._ctrl_sends, dst, CH_CTRL, head, body)
        self.watch.sent(dst)
        while len(self._ctrl_sends) > _CTRL_WINDOW:
            _, peer, handle, _ = self._ctrl_sends.popleft()
            self._wait(handle, peer, None)

    def recv_json(self, src: int, key: tuple[int, int, int, int]) -> dict:
        """The report ``key`` from ``src``; reports that come first are kept for their turn."""
        what = f"report {key}"
        with self._ctrl_lock:
            self.watch.waiting(src)
            try:
                while (src, key) not in self._ctrl_inbox:
                    head, m = _empty_meta_buffer(0)
                    self._wait(self._post(False, head, src, tag(CH_CTRL, _HEADER)), src, what)
                    body = torch.empty(int(m[1]), dtype=torch.uint8)
                    if body.numel():
                        self._wait(self._post(False, body, src, tag(CH_CTRL, _PAYLOAD)), src, what)
                    self.watch.arrived(src)
                    self._ctrl_inbox[(src, tuple(int(v) for v in m[2:6]))] = body.numpy().tobytes()
            finally:
                self.watch.waiting(None)
            return json.loads(self._ctrl_inbox.pop((src, key)).decode())
