"""Liveness: tell a dead process, a hung process and a dead link apart, and name the rank.

A receive that times out says only "nothing came from rank s". Rank s may be dead, stopped (SIGSTOP,
a debugger, a machine swapping), alive but itself waiting for someone else, alive and sending into a
link that delivers nothing, or just slow. Each rank therefore publishes a small record on the run's
c10d store (the rendezvous store every rank has already: a private file under lowbw's own launcher,
torchrun's TCP store otherwise) every ``interval_s`` of wall time, from a thread of its own:

    {"beat": n, "wait": src or -1, "sent": {dst: messages handed to the link}, "got": {src: messages
     taken off it}}

and reads everyone else's. A peer whose ``beat`` has not moved for ``stale_s`` has stopped answering
(its threads do not run: hung or dead). The transport calls this module's hook (:class:`LinkWatch`)
when a message is handed over, when one arrives, around a blocking receive, and when a receive
times out or a link fails; the verdict is a :class:`~lowbw.errors.PeerError` whose ``kind`` is:

- ``hung``: the rank waited on (or the rank it waits on, followed down the chain) has no heartbeat;
- ``dead``: the connection to it closed and its heartbeat stopped;
- ``link``: both ends beat, the sender handed over messages the receiver never got: the link is down;
- ``slow``: it beats, waits for nobody and sent nothing: it computes for longer than ``timeout_s``.

Heartbeats are control traffic, never emulated, and plain JSON: nothing from a peer is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

from lowbw.errors import PeerError

_KEY = "lowbw/live/{rank}"
#: How long ranks may take to start and build (import torch, build the model, open files) before they
#: meet: start-up on a loaded machine is not a peer failing, so it is not bound by timeout_s.
STARTUP_S = 600.0
#: How long a rank that ends its run waits for its heartbeat thread to leave the store (:meth:`Heartbeat.close`).
CLOSE_WAIT_S = 5.0


def intervals(timeout_s: float) -> tuple[float, float]:
    """(beat interval, staleness threshold) in wall seconds for a run's ``timeout_s``: twenty beats per
    timeout at most one a second, and silence for a third of the timeout (at least five beats, at most
    10 s) counts as stopped -- short enough that a rank stopped after a receive began is found stale
    when that receive times out."""
    interval = min(1.0, max(0.05, timeout_s / 20))
    stale = min(10.0, max(5 * interval, timeout_s / 3))
    return interval, stale


class LinkWatch:
    """The hook the transport calls. This base class knows nothing of the peers: its verdicts are the
    plain ones (used when no heartbeat runs, e.g. in single-process checks)."""

    def sent(self, dst: int) -> None:
        """A message for ``dst`` was handed to the link (main thread)."""

    def arrived(self, src: int) -> None:
        """A whole message from ``src`` was taken off the link (the compute thread; rank 0's collector for reports)."""

    def waiting(self, src: Optional[int]) -> None:
        """The calling thread blocks on a message from ``src`` (None: it stopped waiting)."""

    def receive_timed_out(self, me: int, src: int, key: Any, waited_s: float) -> PeerError:
        return PeerError(src, f"rank {me}: no message from rank {src} for {waited_s:g} s (waiting for {key}); "
                              f"rank {src} has died or hangs")

    def link_failed(self, me: int, peer: int, error: BaseException) -> PeerError:
        return PeerError(peer, f"rank {me}: link to rank {peer} failed ({type(error).__name__}: "
                               f"{_first_line(error)}); rank {peer} has probably died", kind="dead")

    def collective_failed(self, me: int, what: str, error: BaseException) -> PeerError | RuntimeError:
        return RuntimeError(f"rank {me}: {what} failed: {_first_line(error)}")

    def await_all(self, tag: str) -> None:
        """Wait until every rank got here (no-op without a store): start-up work may take longer than
        timeout_s on a loaded machine without any rank failing."""

    def collective(self, me: int, what: str, start: Callable[[], Any], timeout_s: float) -> None:
        """Start a collective (``start`` returns its work handle: ``async_op=True``) and wait for it at most
        ``timeout_s``; its failure or timeout becomes this watch's verdict. (gloo's own timeout is set
        beyond any run, so that an idle channel never breaks: every wait has a timeout of lowbw's.)"""
        self.finish_collective(me, what, self.start_collective(me, what, start), timeout_s)

    def start_collective(self, me: int, what: str, start: Callable[[], Any]) -> Any:
        """:meth:`collective`'s first half: start it and return its work handle, to wait for later."""
        try:
            return start()
        except RuntimeError as e:
            raise self.collective_failed(me, what, e) from None

    def finish_collective(self, me: int, what: str, work: Any, timeout_s: float) -> None:
        """:meth:`collective`'s second half: wait at most ``timeout_s`` for a started collective."""
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise self.collective_failed(me, what, e) from None


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")  # gloo's "[.../pair.cc:553] "


def _first_line(e: BaseException) -> str:
    """The first line of an error, without the C++ source location gloo puts in front."""
    text = str(e).strip().splitlines()
    return _SOURCE_PREFIX.sub("", text[0])[:160] if text else type(e).__name__


class Heartbeat(LinkWatch):
    """Publish this rank's record and watch the others' (see the module's docstring)."""

    def __init__(self, store: Any, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s = timeout_s
        self.interval_s, self.stale_s = intervals(timeout_s)
        self._lock = threading.Lock()
        self._beat = 0
        self._wait = -1
        self._main = threading.main_thread().ident  # the compute thread's: its waits are the rank's
        self._sent: dict[int, int] = {}
        self._got: dict[int, int] = {}
        self._peers: dict[int, dict] = {}  # rank -> its last record
        self._changed: dict[int, float] = {}  # rank -> time.monotonic() its beat last moved (here)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lowbw-heartbeat")

    # ---- the thread ------------------------------------------------------------------------

    def start(self) -> "Heartbeat":
        now = time.monotonic()
        self._changed = {r: now for r in range(self.world) if r != self.rank}
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop, and wait (at most CLOSE_WAIT_S) until the thread is out of the store: the run ended and the
        interpreter is about to exit. A daemon thread that returns from a store call (C++, GIL released)
        during the interpreter's finalization is unwound through frames that cannot be, and the process
        aborts ("terminate called without an active exception"): a completed run under torchrun exited
        with SIGABRT in ~1 of 35 runs on a loaded 2-core machine. A rank that fails leaves with os._exit,
        which does not finalize: :meth:`stop` is enough there."""
        self.stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_WAIT_S)

    def _publish(self) -> None:
        with self._lock:
            self._beat += 1
            record = {"beat": self._beat, "wait": self._wait, "sent": dict(self._sent), "got": dict(self._got),
                      "pid": os.getpid()}
        self.store.set(_KEY.format(rank=self.rank), json.dumps(record))

    def _read(self) -> None:
        for r in range(self.world):
            if r == self.rank:
                continue
            key = _KEY.format(rank=r)
            if not self.store.check([key]):
                continue
            try:
                rec = json.loads(self.store.get(key).decode())
            except (ValueError, UnicodeDecodeError):
                continue
            with self._lock:
                old = self._peers.get(r)
                if old is None or rec.get("beat") != old.get("beat"):
                    self._changed[r] = time.monotonic()
                self._peers[r] = rec

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                self._read()
            except Exception:  # noqa: BLE001 -- the store is gone (run ending): stop beating
                return

    # ---- the hook --------------------------------------------------------------------------

    def sent(self, dst: int) -> None:
        with self._lock:
            self._sent[dst] = self._sent.get(dst, 0) + 1

    def arrived(self, src: int) -> None:
        with self._lock:
            self._got[src] = self._got.get(src, 0) + 1

    def waiting(self, src: Optional[int]) -> None:
        if threading.get_ident() == self._main:  # the collector's waits are not the rank's
            self._wait = -1 if src is None else src

    def silence_s(self, peer: int) -> float:
        if peer == self.rank:
            return 0.0
        with self._lock:
            return time.monotonic() - self._changed.get(peer, time.monotonic())

    def _record(self, peer: int) -> Optional[dict]:
        """A rank's last record (this rank's own: its live state, keys as in the store's JSON)."""
        with self._lock:
            if peer == self.rank:
                return {"wait": self._wait, "sent": {str(k): v for k, v in self._sent.items()},
                        "got": {str(k): v for k, v in self._got.items()}}
            return self._peers.get(peer)

    def _in_flight(self, sender: int, receiver: int) -> int:
        """Messages ``sender`` handed to its link to ``receiver`` that ``receiver`` has not taken off it."""
        sent = int((self._record(sender) or {}).get("sent", {}).get(str(receiver), 0))
        return sent - int((self._record(receiver) or {}).get("got", {}).get(str(sender), 0))

    def receive_timed_out(self, me: int, src: int, key: Any, waited_s: float) -> PeerError:
        """Follow who waits for whom from ``src`` until a rank that is silent, a link that swallows
        messages, or a rank that waits for nobody."""
        prev, cur, seen = me, src, [me]
        while True:
            rec = self._record(cur)
            silent = self.silence_s(cur)
            if rec is None or silent > self.stale_s:
                since = "never sent a heartbeat" if rec is None else f"sent no heartbeat for {silent:.1f} s"
                return PeerError(cur, f"rank {me}: rank {cur} stopped answering: it {since} and rank {prev} "
                                      f"received nothing from it for {waited_s:.0f} s (it hangs, was stopped, "
                                      "or its machine is gone)", kind="hung")
            in_flight = self._in_flight(cur, prev)
            if in_flight > 0:
                return PeerError(cur, f"rank {me}: the link {cur}->{prev} delivered nothing for {waited_s:.0f} s "
                                      f"though ranks {cur} and {prev} are alive ({in_flight} message(s) handed to "
                                      "it and not received): the link is down", kind="link", link=f"{cur}->{prev}")
            if cur in seen:
                ring = " -> ".join(map(str, seen[seen.index(cur):] + [cur]))
                return PeerError(cur, f"rank {me}: ranks {ring} wait for each other with nothing in flight "
                                      f"for {waited_s:.0f} s: a message was lost", kind="link")
            nxt = int(rec.get("wait", -1))
            if nxt < 0:
                return PeerError(cur, f"rank {me}: rank {cur} is alive but sent rank {prev} nothing for "
                                      f"{waited_s:.0f} s while waiting for nobody (it computes, or is blocked "
                                      "outside the network); raise timeout_s if its steps take longer", kind="slow")
            seen.append(cur)
            prev, cur = cur, nxt

    def link_failed(self, me: int, peer: int, error: BaseException) -> PeerError:
        """The connection to ``peer`` broke: dead if its heartbeat stops within a few beats, else the link.
        gloo's own timeout on a blocked send or receive is a timeout, judged as one."""
        if "timeout" in str(error).lower() or "timed out" in str(error).lower():
            return self.receive_timed_out(me, peer, "a message", self.timeout_s)
        deadline = time.monotonic() + 3 * self.interval_s + 0.5
        while time.monotonic() < deadline and self.silence_s(peer) <= 2 * self.interval_s + 0.25:
            time.sleep(self.interval_s / 2)
        if self.silence_s(peer) > 2 * self.interval_s + 0.25:
            return PeerError(peer, f"rank {me}: rank {peer} died: its connection closed "
                                   f"({_first_line(error)}) and its heartbeat stopped", kind="dead")
        return PeerError(peer, f"rank {me}: the link to rank {peer} broke ({_first_line(error)}) though rank "
                               f"{peer} is alive", kind="link", link=f"{peer}->{me}")

    def await_all(self, tag: str) -> None:
        self.store.set(f"lowbw/{tag}/{self.rank}", "1")
        self.store.wait([f"lowbw/{tag}/{r}" for r in range(self.world)], timedelta(seconds=STARTUP_S))

    def collective_failed(self, me: int, what: str, error: BaseException) -> PeerError | RuntimeError:
        """A collective (barrier, all-reduce) failed or timed out: name a silent rank if there is one."""
        silent = sorted((self.silence_s(r), r) for r in range(self.world) if r != me)
        if silent and silent[-1][0] > self.stale_s:
            s, r = silent[-1]
            return PeerError(r, f"rank {me}: {what} failed: rank {r} stopped answering (no heartbeat for "
                                f"{s:.1f} s)", kind="hung")
        return super().collective_failed(me, what, error)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux: /proc; elsewhere a signal-0 probe). For a
    rank watching its launcher, and for leftovers of a launcher that is gone (lowbw.net.kernel)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
