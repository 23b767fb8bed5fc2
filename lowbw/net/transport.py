"""Real point-to-point messages between ranks over torch.distributed, with the link model on top.

Every message is a fixed 10-int64 header followed by a uint8 body -- the codec's payload, whose
length is what the link model charges. One sender thread per (destination, channel) and one
receiver thread per (source, channel) make sends never block compute and keep a receive posted at
all times, so a message is taken off the wire as soon as it is sent. Only the main thread touches
the link model and the clock.

Emulation: in virtual time the sender computes the arrival time and ships it in the header; in
wall time the sender thread holds the message until its last bit would have left the uplink, and
the receiver adds latency and jitter from the moment it really got it -- no clock synchronisation
between machines is needed.

On one host the sender stamps when the message left (CLOCK_MONOTONIC, which all processes share),
so the receiver counts the emulated latency from then and the real loopback transfer does not add
to it; between hosts the latency counts from the real arrival.

A receive waits at most ``timeout_s`` (wall) for its message; a dead or silent peer becomes a
:class:`PeerError` naming its rank. Which rank, and whether it died, hangs or sits behind a dead
link, is the verdict of the :class:`~lowbw.net.liveness.LinkWatch` hook (heartbeats). This module
assumes nothing about work handles of ``batch_isend_irecv`` (which once hung on gloo): it uses plain
blocking send/recv in its threads.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from lowbw.errors import PeerError
from lowbw.net.clock import Clock
from lowbw.net.link import LinkModel
from lowbw.net.liveness import LinkWatch

# Channels (gloo tags): activations forward, gradients backward, run control (metrics to rank 0).
CH_FWD, CH_BWD, CH_CTRL = 1, 2, 3
_CLOSE = -1
_HEADER = 10  # ch, nbytes, phase, step, stage, microbatch, arrival (f64 bits), host id, sent at (f64 bits), 0
_HOST = zlib.crc32(socket.gethostname().encode())  # same host: perf_counter (CLOCK_MONOTONIC) is shared


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


@dataclass
class Message:
    src: int
    channel: int
    key: tuple[int, int, int, int]  # (phase, step, stage, microbatch)
    payload: torch.Tensor  # uint8, CPU
    sent_arrival: float  # virtual: arrival time computed by the sender; wall: unused
    received_wall: float  # time.perf_counter() when the receiver thread had the whole message
    sent_host: int = 0  # the sender's host id
    sent_wall: float = 0.0  # the sender's time.perf_counter() when the message left it

    @property
    def nbytes(self) -> int:
        return int(self.payload.numel())


class Transport:
    def __init__(
        self,
        rank: int,
        link: Optional[LinkModel],
        clock: Clock,
        timeout_s: float,
        group: Optional[dist.ProcessGroup] = None,
        charge: Optional[dict[int, tuple[int, int]]] = None,
        watch: Optional[LinkWatch] = None,
    ):
        """``charge``: channel -> (target, run) bytes: the link model charges a payload of n bytes on that
        channel round(n * target / run) bytes -- a target deployment's messages (lowbw/regime.py); None or a
        missing channel: its length."""
        self.rank, self.link, self.timeout_s = rank, link, timeout_s
        self._charge = dict(charge or {})
        self.virtual = clock.virtual
        self.now = clock.now  # the run clock (seconds), read only from the main thread
        self.group = group
        self.watch = watch or LinkWatch()  # liveness hook: counts, waits, verdicts on timeouts and failures
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, int, tuple], Message] = {}
        self._errors: dict[int, BaseException] = {}
        self._senders: dict[tuple[int, int], tuple[queue.Queue, threading.Thread]] = {}
        self._receivers: dict[tuple[int, int], threading.Thread] = {}

    # ---- set-up and tear-down -----------------------------------------------------------

    def open(self, outgoing: set[tuple[int, int]], incoming: set[tuple[int, int]]) -> None:
        """Start a thread per (peer, channel) this rank sends to and receives from."""
        for dst, ch in sorted(outgoing):
            q: queue.Queue = queue.Queue()
            t = threading.Thread(target=self._send_loop, args=(dst, ch, q), daemon=True, name=f"send-{dst}-{ch}")
            t.start()
            self._senders[(dst, ch)] = (q, t)
        for src, ch in sorted(incoming):
            t = threading.Thread(target=self._recv_loop, args=(src, ch), daemon=True, name=f"recv-{src}-{ch}")
            t.start()
            self._receivers[(src, ch)] = t

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every message handed over so far has left this process."""
        deadline = time.monotonic() + timeout_s
        for q, _ in self._senders.values():
            while q.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.005)

    def close(self) -> None:
        """Tell every receiver this rank is done, then wait for the peers to say the same."""
        for q, _ in self._senders.values():
            q.put(None)
        deadline = time.monotonic() + self.timeout_s
        for (dst, _), (_, t) in self._senders.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise PeerError(dst, f"rank {self.rank}: could not finish sending to rank {dst} within {self.timeout_s:.0f} s")
        for (src, _), t in self._receivers.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise PeerError(src, f"rank {self.rank}: rank {src} did not close its channel within {self.timeout_s:.0f} s")
        self._raise_errors()

    # ---- threads ------------------------------------------------------------------------

    def _send_loop(self, dst: int, ch: int, q: queue.Queue) -> None:
        try:
            while True:
                item = q.get()
                if item is None:
                    dist.send(torch.tensor([_CLOSE] + [0] * (_HEADER - 1), dtype=torch.int64), dst, self.group, tag=ch)
                    return
                header, body, release_at = item
                if release_at is not None:  # wall clock: hold until the last bit has left the uplink
                    delay = release_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                header[8] = _f2i(time.perf_counter())
                dist.send(header, dst, self.group, tag=ch)
                if body.numel():
                    dist.send(body, dst, self.group, tag=ch)
                q.task_done()
        except BaseException as e:  # noqa: BLE001 -- reported to the main thread, naming the peer
            with self._cond:
                self._errors.setdefault(dst, e)
                self._cond.notify_all()

    def _recv_loop(self, src: int, ch: int) -> None:
        try:
            while True:
                header = torch.empty(_HEADER, dtype=torch.int64)
                dist.recv(header, src, self.group, tag=ch)
                h = header.tolist()
                if h[0] == _CLOSE:
                    return
                nbytes = h[1]
                body = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes:
                    dist.recv(body, src, self.group, tag=ch)
                key = (h[2], h[3], h[4], h[5])
                msg = Message(src, ch, key, body, _i2f(h[6]), time.perf_counter(), h[7], _i2f(h[8]))
                with self._cond:
                    self._inbox[(src, ch, key)] = msg
                    self._cond.notify_all()
                self.watch.arrived(src)
        except BaseException as e:  # noqa: BLE001
            with self._cond:
                self._errors.setdefault(src, e)
                self._cond.notify_all()

    # ---- main-thread API ----------------------------------------------------------------

    def _raise_errors(self, peer: Optional[int] = None) -> None:
        with self._cond:
            items = [(p, e) for p, e in self._errors.items() if peer is None or p == peer]
        if items:
            p, e = items[0]
            raise self.watch.link_failed(self.rank, p, e)

    def charged_bytes(self, ch: int, nbytes: int) -> int:
        """Bytes the link model charges for a payload of ``nbytes`` on channel ``ch``."""
        if ch not in self._charge:
            return nbytes
        target, run = self._charge[ch]
        return (2 * nbytes * target + run) // (2 * run)  # round(n * target / run) in integers

    def send(self, dst: int, ch: int, key: tuple[int, int, int, int], payload: torch.Tensor, emulate: bool = True) -> float:
        """Hand a payload to the link; returns the emulated arrival time (run clock) or now for unemulated sends."""
        self._raise_errors(dst)
        payload = payload.detach().to("cpu", torch.uint8).contiguous()
        t = self.now()
        arrival, release_at = t, None
        if emulate and self.link is not None:
            timing = self.link.send(dst, self.charged_bytes(ch, payload.numel()), t)
            arrival = timing.arrival
            if not self.virtual:
                release_at = time.perf_counter() + (timing.tx_done - t)
        header = torch.tensor([ch, payload.numel(), *key, _f2i(arrival), _HOST, _f2i(time.perf_counter()), 0],
                              dtype=torch.int64)
        self._senders[(dst, ch)][0].put((header, payload, release_at))
        self.watch.sent(dst)
        return arrival

    def recv(self, src: int, ch: int, key: tuple[int, int, int, int]) -> Message:
        """Wait (at most timeout_s of wall time) for the message ``key`` from ``src`` on channel ``ch``."""
        deadline = time.monotonic() + self.timeout_s
        self.watch.waiting(src)
        with self._cond:
            while (src, ch, key) not in self._inbox:
                if src in self._errors:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self.watch.waiting(None)
                    raise self.watch.receive_timed_out(self.rank, src, key, self.timeout_s)
                self._cond.wait(min(left, 1.0))
            msg = self._inbox.pop((src, ch, key), None)
        self.watch.waiting(None)
        if msg is None:
            self._raise_errors(src)
        return msg

    def delivery_time(self, msg: Message, emulate: bool = True) -> float:
        """When the message is usable on this rank's clock, charging this rank's downlink."""
        if not emulate or self.link is None:
            return self.now() if not self.virtual else msg.sent_arrival
        if self.virtual:
            arrival = msg.sent_arrival
        else:  # from when it left the sender (same host) or when it really arrived here (another host)
            left = msg.sent_wall if msg.sent_host == _HOST else msg.received_wall
            arrival = self.link.arrival_after_receipt(msg.src, self.now() - (time.perf_counter() - left))
        return self.link.deliver(msg.src, self.charged_bytes(msg.channel, msg.nbytes), arrival)

    # ---- control messages (metrics), never emulated ----------------------------------------

    def send_json(self, dst: int, key: tuple[int, int, int, int], obj: dict) -> None:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        self.send(dst, CH_CTRL, key, data, emulate=False)

    def recv_json(self, src: int, key: tuple[int, int, int, int]) -> dict:
        return json.loads(bytes(self.recv(src, CH_CTRL, key).payload.numpy()).decode())
