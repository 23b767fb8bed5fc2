"""The byte mover under the transport: non-blocking sends and receives of uint8 buffers between ranks.

A :class:`Wire` posts sends and receives and returns handles to wait on. It follows one matching
rule, gloo's: a rank's receives from one peer on one tag take that peer's sends on that tag in
the order both were posted -- nothing else (no size, no key) decides which receive gets which
message. :mod:`lowbw.net.transport` builds keyed, emulated messages on top.

- :class:`GlooWire`: ``torch.distributed`` point-to-point over gloo. Which process group carries a
  message is one method, :meth:`GlooWire.group_for`. Real runs use :meth:`GlooWire.per_direction`:
  one group for messages from a lower rank to a higher one and one for the other way, so that the
  two directions between a pair of ranks travel on two TCP connections. On one connection gloo
  point-to-point is effectively half duplex once bandwidth is the limit (measured across a veth
  pair shaped to 20 Mbit/s each way: 4 messages of 512 KB each way at once took 1.85 s on one
  group, 1.06 s on a group per direction; docs/networks.md, "Real links"): activations and
  gradients between two stages would take turns.
- :class:`lowbw.net.shm.ShmWire`: pipeline messages between ranks of one host through shared
  memory, the rest on the gloo wire it wraps (``net.wire=auto``).
- :class:`MemoryWire`: ranks as threads of one process sharing a :class:`Switchboard`; the same
  matching rule, buffers copied in memory. Stricter than gloo in one respect: a receive must have
  exactly the size of the message it takes (gloo accepts a shorter message into a longer buffer,
  and aborts the process on a longer one), so a wrong size prediction fails loudly in tests.

A handle's ``wait(timeout)`` returns once the operation is complete and raises ``RuntimeError``
when it fails or the timeout passes. On gloo a timed-out wait closes the connection to that peer
for good, so a wait must never be used to poll; and gloo reports completion only through
``wait`` (``is_completed()`` stays False until someone waited).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from datetime import timedelta
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from lowbw.compress.payload import Part, part_nbytes


#: gloo's own timeout: beyond any run. A receive posted early on an idle channel would
#: otherwise break the connection after it; every wait lowbw does has timeout_s of its own instead
#: (receives in the transport, collectives through their work handles, lowbw.net.liveness).
GLOO_TIMEOUT = timedelta(days=7)


class Handle(Protocol):
    def wait(self, timeout: timedelta) -> Any: ...


class _Done:
    """The handle of a send that was complete when it returned (its bytes were copied: ShmWire)."""

    __slots__ = ()

    def wait(self, timeout: timedelta) -> None:
        return None


#: Returned by a wire's send that completed before returning; the transport keeps no record of it.
DONE: Handle = _Done()


class Wire(ABC):
    @abstractmethod
    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Handle:
        """Start sending ``buf`` (uint8, CPU) to ``dst``; the buffer must stay untouched until the handle completes."""

    @abstractmethod
    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Handle:
        """Post a receive into ``buf`` (uint8, CPU) of the next message ``src`` sends on ``tag``."""

    def isend_parts(self, parts: tuple[Part, ...], dst: int, tag: int) -> tuple[Handle, tuple]:
        """Send the concatenation of ``parts`` (1-D uint8 tensors, or bytes-like objects on the CPU:
        lowbw.compress.payload.Part) as one message; returns the handle and what must stay untouched until it
        completes. Here: one buffer, copied into (a wire that can write the parts where they go without it
        overrides this)."""
        buf = torch.empty(sum(part_nbytes(p) for p in parts), dtype=torch.uint8)
        at = 0
        for p in parts:
            n = part_nbytes(p)
            if isinstance(p, torch.Tensor):
                buf[at:at + n].copy_(p)
            else:
                buf.numpy()[at:at + n] = np.frombuffer(p, dtype=np.uint8)
            at += n
        return self.isend(buf, dst, tag), (buf,)

    def poll(self) -> None:
        """Fill the posted receives whose messages are in. Wires that move bytes on threads of their own
        (gloo, :class:`MemoryWire`) do it without being asked; :class:`lowbw.net.shm.ShmWire` needs it."""


class GlooWire(Wire):
    """Point-to-point over gloo: on ``group`` (None: the default group), or, for a rank made with
    :meth:`per_direction`, on a group per direction, except for the ``shared_tags`` (run control),
    which stay on ``group``."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, rank: int = 0,
                 upward: Optional[dist.ProcessGroup] = None, downward: Optional[dist.ProcessGroup] = None,
                 shared_tags: frozenset[int] = frozenset()):
        self.group, self.rank, self.shared_tags = group, rank, shared_tags
        self.upward, self.downward = upward, downward

    @classmethod
    def per_direction(cls, rank: int, world: int, timeout: timedelta,
                      shared_tags: frozenset[int] = frozenset()) -> "GlooWire":
        """Make the two direction groups (a collective call: every rank of the default group makes them,
        in the same order) and return this rank's wire over them."""
        ranks = list(range(world))
        upward = dist.new_group(ranks, timeout=timeout, backend="gloo")
        downward = dist.new_group(ranks, timeout=timeout, backend="gloo")
        return cls(None, rank, upward, downward, shared_tags)

    def group_for(self, src: int, dst: int, tag: int) -> Optional[dist.ProcessGroup]:
        """The process group that carries a message from rank ``src`` to rank ``dst`` on ``tag``."""
        if self.upward is None or tag in self.shared_tags:
            return self.group
        return self.upward if src < dst else self.downward

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Handle:
        return dist.isend(buf, dst, group=self.group_for(self.rank, dst, tag), tag=tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Handle:
        return dist.irecv(buf, src, group=self.group_for(src, self.rank, tag), tag=tag)


# ---- ranks as threads of one process ------------------------------------------------------------


class _MemoryOp:
    __slots__ = ("buf", "peer", "done", "error")

    def __init__(self, buf: torch.Tensor, peer: int):
        self.buf, self.peer, self.done, self.error = buf, peer, False, None


class Switchboard:
    """What the ranks of one process share: per (src, dst, tag), the sends and receives not yet matched."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._sends: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self._recvs: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self._failed: dict[int, str] = {}  # rank -> why: every operation with it fails

    def post(self, op: _MemoryOp, link: tuple[int, int, int], sending: bool) -> "_MemoryHandle":
        src, dst, _ = link
        with self._cv:
            dead = src if src in self._failed else dst if dst in self._failed else None
            if dead is not None:
                op.error = f"Connection closed by peer rank {dead} ({self._failed[dead]})"
            else:
                mine, theirs = (self._sends, self._recvs) if sending else (self._recvs, self._sends)
                if theirs[link]:
                    other = theirs[link].popleft()
                    send, recv = (op, other) if sending else (other, op)
                    self._match(send, recv, link)
                else:
                    mine[link].append(op)
            self._cv.notify_all()
        return _MemoryHandle(self, op)

    @staticmethod
    def _match(send: _MemoryOp, recv: _MemoryOp, link: tuple[int, int, int]) -> None:
        if send.buf.numel() != recv.buf.numel():
            why = (f"message of {send.buf.numel()} bytes from rank {link[0]} met a receive of "
                   f"{recv.buf.numel()} bytes on rank {link[1]} (tag {link[2]})")
            send.error = recv.error = why
            return
        recv.buf.copy_(send.buf)
        send.done = recv.done = True

    def fail(self, rank: int, why: str) -> None:
        """``rank`` is gone: its pending operations and those of its peers with it fail."""
        with self._cv:
            self._failed[rank] = why
            for table in (self._sends, self._recvs):
                for (src, dst, _), ops in table.items():
                    if rank in (src, dst):
                        for op in ops:
                            op.error = f"Connection closed by peer rank {rank} ({why})"
                        ops.clear()
            self._cv.notify_all()

    def wait(self, op: _MemoryOp, timeout: timedelta) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: op.done or op.error is not None, timeout.total_seconds()):
                raise RuntimeError(f"Timed out waiting {timeout.total_seconds():.0f} s for an operation with "
                                   f"rank {op.peer} to complete")
        if op.error is not None:
            raise RuntimeError(op.error)


class _MemoryHandle:
    __slots__ = ("board", "op")

    def __init__(self, board: Switchboard, op: _MemoryOp):
        self.board, self.op = board, op

    def wait(self, timeout: timedelta) -> None:
        self.board.wait(self.op, timeout)


class MemoryWire(Wire):
    """Rank ``rank``'s end of a :class:`Switchboard`."""

    def __init__(self, board: Switchboard, rank: int):
        self.board, self.rank = board, rank

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Handle:
        return self.board.post(_MemoryOp(buf, dst), (self.rank, dst, tag), sending=True)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Handle:
        return self.board.post(_MemoryOp(buf, src), (src, self.rank, tag), sending=False)
