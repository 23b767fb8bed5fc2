"""Pipeline messages between ranks of one host through shared memory: a ring per directed pair.

On one host gloo moves a message through a loopback TCP connection and two of its own threads, and
the compute thread pays for waking them: about 0.3 ms inside each ``isend``, and 0.45 ms from the
send to the waiting receiver's return (measured in a 2-rank GPipe run of the benchmark model; the
call costs alone are in ``scripts/bench_gloo_calls.py``). Summed over a step's boundary crossings
that was most of the executor's overhead (``scripts/bench_overhead.py``). :class:`ShmWire` moves the
messages of chosen tags to peers on the same host through a file in ``/dev/shm`` per directed pair
instead, and every other message through the wire it wraps (gloo):

* **send**: the sender copies the buffer into the ring (a record: tag, length, bytes) and publishes
  its new write position. It never waits for the receiver: a ring without room for a record is
  replaced by one at least twice as large (a new *generation* of the lane's file, announced in
  the old one's header), so a send completes at once, as a gloo send into a socket buffer would;
* **receive**: a posted receive is filled when its rank *polls* -- when the receive comes
  (:meth:`ShmWire.poll`, from :meth:`lowbw.net.transport.Transport.arrived`) and while it waits.
  A record whose tag has no posted receive yet is copied aside and taken by the next receive
  posted for it; the matching rule is gloo's (per peer and tag, in posting order). Only the
  compute thread may use these tags;
* **wait**: polls, spinning for a moment and then sleeping 50 us at a time (the thread that makes the
  wire sleeps with a 1 us timer slack: see :func:`_tighten_timer_slack`), and checks every
  20 ms that the peer's process is alive: a dead peer is a "Connection closed by peer rank N"
  error, as on gloo, and a silent live one the timeout.

The ring is lock-free: one writer, one reader, positions that only grow. It relies on x86-64's
memory order (stores are seen in the order they were made, loads are not reordered with older
loads), since Python has no memory fences; other machines use gloo for everything.

Which peers share memory is agreed when the wire is made (:meth:`ShmWire.connect`, a collective):
same hostname, boot, network namespace (ranks in namespaces of their own, ``net.backend=kernel``,
must cross their shaped links) and pid namespace (a wait checks its peer's pid), and each sees the
other's probe file in ``/dev/shm``. Files are
named ``lowbw-shm-<creator pid>-<run token>-...``. A receiver unlinks a file once it has mapped it
(the creator never does: its peer may still need it after it has exited); what no receiver took
is removed by lowbw's launcher once its ranks have stopped, and otherwise by the next wire made on
the host a minute after its creator exited (:func:`sweep_stale`).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import secrets
import socket
import struct
import sys
import time
from collections import deque
from datetime import timedelta
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from lowbw.compress.payload import Part
from lowbw.net.liveness import process_alive
from lowbw.net.wire import DONE, Handle, Wire

SHM_DIR = "/dev/shm"
PREFIX = "lowbw-shm-"
_HEADER = 256  # write position, read position and next generation, each on a cache line of its own
_W, _R, _NEXT = 0, 8, 16  # their int64 indices
_RECORD = 16  # a record's head: tag and length, int64 each; its bytes follow, padded to 8
_WRAP = -1  # tag of a record that says "continue at the ring's start"
_RECORD_HEAD = struct.Struct("<2q")  # tag, length
FIRST_CAPACITY = 1 << 20  # bytes of a lane's first ring; it grows with the messages it carries
MIN_FREE = 64 << 20  # /dev/shm must have this much free for a rank to use shared memory (Docker's default is 64 MiB)
SPIN_S = 100e-6  # wall seconds a wait polls without sleeping
SLEEP_S = 50e-6  # then sleeps this long between polls (with TIMER_SLACK_NS: 57 us measured here, 108 us without)
TIMER_SLACK_NS = 1000  # the compute thread's: Linux lets a sleep overrun by 50 us by default (prctl(2))
LOOK_EVERY_S = 0.005  # wall seconds between polls' looks for a lane's first file (a wait looks every time)
STALE_S = 60.0  # wall seconds after which an untaken file of a process that no longer exists is removed
ALIVE_EVERY_S = 0.02  # wall seconds between checks that a waited-for peer's process exists


def supported() -> Optional[str]:
    """None when this machine can use the shared-memory wire, else why not."""
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} is not Linux"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} is not x86-64 (the rings rely on its memory order)"
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist"
    st = os.statvfs(SHM_DIR)
    if st.f_bavail * st.f_frsize < MIN_FREE:
        return f"{SHM_DIR} has less than {MIN_FREE >> 20} MiB free"
    return None


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def sweep_stale(directory: str = SHM_DIR, pids: Optional[Iterable[int]] = None, min_age_s: float = STALE_S) -> int:
    """Remove lowbw's shared-memory files no reader will take; returns how many.

    ``pids``: those made by these processes (a launcher's ranks, all exited). Otherwise those whose
    creator no longer exists and that are at least ``min_age_s`` old: a live run's reader takes its files
    within milliseconds, and the age guards against a creator that merely lives in another pid namespace
    (a container sharing this /dev/shm)."""
    mine = None if pids is None else {str(p) for p in pids}
    removed, now = 0, time.time()
    for name in os.listdir(directory):
        if not name.startswith(PREFIX):
            continue
        pid, path = name[len(PREFIX):].split("-", 1)[0], os.path.join(directory, name)
        try:
            if mine is not None:
                stale = pid in mine
            else:
                stale = pid.isdigit() and not process_alive(int(pid)) and now - os.stat(path).st_mtime >= min_age_s
            if stale:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass  # its reader, or another sweep, took it
    return removed


class _Ring:
    """One generation of a lane's file, mapped: the header's int64 words and the data area."""

    def __init__(self, path: str, capacity: Optional[int]):
        """``capacity``: create the file with this many data bytes (the sender); None: open it (the receiver)."""
        if capacity is not None:  # made whole under another name, then renamed: a reader never sees it half made
            fd = os.open(path + ".new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, _HEADER + capacity)  # no room is an error now, not a SIGBUS later
            except OSError as e:
                os.close(fd)
                os.unlink(path + ".new")
                raise RuntimeError(f"shared memory: cannot reserve {capacity >> 20} MiB in {SHM_DIR} ({e}); "
                                   "free some, or run with net.wire=gloo") from None
            os.rename(path + ".new", path)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.capacity = size - _HEADER
        # The header's int64 words and the data area as memoryviews: a send runs right after a stage's compute,
        # with the caches cold, where one numpy scalar access took ~25 us and one of a memoryview 10-16 us here
        # (scripts/bench_cold_calls.py).
        self.hv = memoryview(self.map)[:_HEADER].cast("q")
        self.dv = memoryview(self.map)[_HEADER:]


class _Outbound:
    """This rank's end of the lane to one peer: it writes records."""

    def __init__(self, name: str):
        self.name, self.gen, self.pos = name, 0, 0
        self.ring: Optional[_Ring] = None  # made with the first message: a peer that is never sent to costs nothing

    def _create(self, capacity: int) -> _Ring:
        return _Ring(os.path.join(SHM_DIR, f"{self.name}-g{self.gen}"), capacity)

    def put(self, tag: int, parts: tuple, n: int) -> None:
        """One record of the concatenated ``parts`` (bytes-like, 1-D: bytes, uint8 numpy arrays), ``n`` bytes."""
        need = _RECORD + _pad8(n)
        if self.ring is None:
            self.ring = self._create(max(FIRST_CAPACITY, 4 * need))
        ring = self.ring
        off = self.pos % ring.capacity
        tail = ring.capacity - off
        skip = tail if tail < need else 0  # a record never wraps: the rest of the ring is skipped
        if self.pos + skip + need - ring.hv[_R] > ring.capacity:
            self._grow(need)
            return self.put(tag, parts, n)
        if skip and tail >= _RECORD:
            _RECORD_HEAD.pack_into(ring.dv, off, _WRAP, 0)
        if skip:
            self.pos, off = self.pos + skip, 0
        _RECORD_HEAD.pack_into(ring.dv, off, tag, n)
        at = off + _RECORD
        dv = ring.dv
        for p in parts:
            end = at + len(p)
            dv[at:end] = p
            at = end
        self.pos += need
        ring.hv[_W] = self.pos  # published last: the reader sees the record whole (x86-64 store order)

    def _grow(self, need: int) -> None:
        old = self.ring
        self.gen += 1
        self.ring, self.pos = self._create(max(2 * old.capacity, 4 * need)), 0
        old.hv[_NEXT] = self.gen  # after the new file exists and every old record was published


class _Inbound:
    """This rank's end of the lane from one peer: it reads records, and unlinks each file it maps."""

    def __init__(self, name: str):
        self.name, self.gen, self.pos = name, 0, 0
        self.ring: Optional[_Ring] = None
        self.tried = 0.0  # perf_counter of the last look for a first file not there yet

    def _open(self) -> bool:
        path = os.path.join(SHM_DIR, f"{self.name}-g{self.gen}")
        try:
            self.ring = _Ring(path, None)
        except FileNotFoundError:  # nothing sent yet
            return False
        os.unlink(path)
        self.pos = 0
        return True

    def read(self, deliver) -> None:
        """Hand every published record to ``deliver(tag, memoryview of its bytes)``, which copies it out."""
        if self.ring is None and not self._open():
            return
        while True:
            ring = self.ring
            end = ring.hv[_W]
            while self.pos < end:
                off = self.pos % ring.capacity
                tail = ring.capacity - off
                tag, n = _RECORD_HEAD.unpack_from(ring.dv, off) if tail >= _RECORD else (_WRAP, 0)
                if tag == _WRAP:
                    self.pos += tail
                    continue
                deliver(tag, ring.dv[off + _RECORD:off + _RECORD + n])
                self.pos += _RECORD + _pad8(n)
                ring.hv[_R] = self.pos  # after the copy: the writer may reuse the bytes
            if ring.hv[_NEXT] == 0 or ring.hv[_W] != self.pos:
                return
            self.gen = ring.hv[_NEXT]  # every record of this generation is read: on to the next
            if not self._open():
                raise RuntimeError(f"shared memory: {self.name} generation {self.gen} is gone from {SHM_DIR}")


class _Op:
    __slots__ = ("buf", "peer", "done", "error")

    def __init__(self, buf: memoryview, peer: int):
        self.buf, self.peer, self.done, self.error = buf, peer, False, None


class _Handle:
    __slots__ = ("wire", "op")

    def __init__(self, wire: "ShmWire", op: _Op):
        self.wire, self.op = wire, op

    def wait(self, timeout: timedelta) -> None:
        self.wire.wait(self.op, timeout)


class ShmWire(Wire):
    """Messages on ``tags`` to and from the ``peers`` on this host through shared memory; the rest on ``fallback``."""

    def __init__(self, fallback: Wire, rank: int, token: str, peers: dict[int, int], tags: Iterable[int]):
        """``peers``: rank -> pid of each peer reached through shared memory; ``token``: the run's, the same on
        every rank."""
        self.fallback, self.rank, self.peers, self.tags = fallback, rank, dict(peers), frozenset(tags)
        me = os.getpid()
        self._out = {p: _Outbound(f"{PREFIX}{me}-{token}-{rank}to{p}") for p in self.peers}
        self._in = {p: _Inbound(f"{PREFIX}{pid}-{token}-{p}to{rank}") for p, pid in self.peers.items()}
        self._posted: dict[tuple[int, int], deque[_Op]] = {}
        self._early: dict[tuple[int, int], deque[bytes]] = {}  # records no receive was posted for yet, copied
        self._readers = {p: (lane, self._reader(p)) for p, lane in self._in.items()}
        _tighten_timer_slack()

    @classmethod
    def connect(cls, fallback: Wire, rank: int, world: int, tags: Iterable[int]) -> "ShmWire":
        """Agree with every rank of the default group which pairs share memory (a collective call; tensors
        only: nothing another process sent is unpickled)."""
        token = torch.tensor([secrets.randbits(62) if rank == 0 else 0])
        dist.broadcast(token, src=0)
        run = f"{int(token):016x}"
        why_not = supported()
        probe = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{run}-probe")
        if why_not is None:
            sweep_stale()
            open(probe, "wb").close()
        mine = torch.tensor([int(why_not is None), _host_key(), os.getpid()])
        everyone = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)  # every probe exists from here on
        sees = torch.zeros(world, dtype=torch.int64)
        for r, (ok, host, pid) in enumerate(t.tolist() for t in everyone):
            sees[r] = int(r != rank and ok and why_not is None and host == int(mine[1]) and
                          os.path.exists(os.path.join(SHM_DIR, f"{PREFIX}{pid}-{run}-probe")))
        views = [torch.zeros_like(sees) for _ in range(world)]
        dist.all_gather(views, sees)  # a pair shares memory only if both ends see each other
        if why_not is None:
            os.unlink(probe)
        peers = {r: int(everyone[r][2]) for r in range(world) if sees[r] and views[r][rank]}
        return cls(fallback, rank, run, peers, tags)

    def _mine(self, peer: int, tag: int) -> bool:
        return tag in self.tags and peer in self.peers

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Handle:
        return self.isend_parts((buf,), dst, tag)[0]

    def isend_parts(self, parts: tuple[Part, ...], dst: int, tag: int) -> tuple[Handle, tuple]:
        if not self._mine(dst, tag):
            return self.fallback.isend_parts(parts, dst, tag)
        parts = tuple(p if not isinstance(p, torch.Tensor) else _numpy(p) for p in parts)
        self._out[dst].put(tag, parts, sum(len(p) for p in parts))  # copied: nothing to keep
        return DONE, ()

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Handle:
        if not self._mine(src, tag):
            return self.fallback.irecv(buf, src, tag)
        op = _Op(memoryview(buf.numpy()), src)  # made now: the copy into it comes when the caches are cold
        early = self._early.get((src, tag))
        if early:
            self._fill(op, early.popleft(), tag)
        else:
            self._posted.setdefault((src, tag), deque()).append(op)
        return _Handle(self, op)

    def _fill(self, op: _Op, record: memoryview, tag: int) -> None:
        if len(record) != len(op.buf):
            op.error = (f"message of {len(record)} bytes from rank {op.peer} met a receive of "
                        f"{len(op.buf)} bytes on rank {self.rank} (tag {tag})")
        else:
            op.buf[:] = record
            op.done = True

    def _reader(self, src: int):
        def deliver(tag: int, record: memoryview) -> None:
            posted = self._posted.get((src, tag))
            if posted:
                self._fill(posted.popleft(), record, tag)
            else:
                self._early.setdefault((src, tag), deque()).append(bytes(record))
        return deliver

    def poll(self) -> None:
        now = time.perf_counter()
        for lane, deliver in self._readers.values():
            if lane.ring is None:  # a peer that has sent nothing yet (or never will): looked for now and then
                if now - lane.tried < LOOK_EVERY_S:
                    continue
                lane.tried = now
            lane.read(deliver)

    def wait(self, op: _Op, timeout: timedelta) -> None:
        start = last_check = time.perf_counter()
        lane, deliver = self._readers[op.peer]
        while not op.done and op.error is None:
            lane.read(deliver)
            if op.done or op.error is not None:
                break
            now = time.perf_counter()
            if now - start >= timeout.total_seconds():
                raise RuntimeError(f"Timed out waiting {timeout.total_seconds():.0f} s for an operation with "
                                   f"rank {op.peer} to complete")
            if now - last_check >= ALIVE_EVERY_S:
                last_check = now
                if not process_alive(self.peers[op.peer]):
                    lane.read(deliver)  # what it sent before it went
                    if not op.done:
                        op.error = (f"Connection closed by peer rank {op.peer} "
                                    f"(its process {self.peers[op.peer]} is gone)")
            if now - start >= SPIN_S:
                time.sleep(SLEEP_S)
        if op.error is not None:
            raise RuntimeError(op.error)


def _tighten_timer_slack() -> None:
    """Let this thread's sleeps (a wait's, and the wall clock's emulated delays) overrun by TIMER_SLACK_NS
    rather than Linux's default 50 us: a message that arrives while a wait sleeps is taken ~25 us sooner on
    average. Threads this one starts later inherit it. Nothing happens where prctl is not to be had."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_PR_SET_TIMERSLACK = 29  # linux/prctl.h


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's data as numpy; without the detach and device calls (a few us each) when they change nothing."""
    return t.numpy() if t.is_cpu and not t.requires_grad else t.detach().cpu().numpy()


def _host_key() -> int:
    """Hostname, boot, network and pid namespace, hashed: ranks that share all four may share memory (the pid
    namespace because a wait checks its peer's pid)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    spaces = []
    for ns in ("net", "pid"):
        try:
            spaces.append(os.stat(f"/proc/self/ns/{ns}").st_ino)
        except OSError:
            spaces.append(0)
    digest = hashlib.sha256(f"{socket.gethostname()}/{boot}/{spaces}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # fits an int64 tensor
