"""Errors a user is meant to read (one sentence naming the setting, the rank or the file), the exit
codes they end in, and the bridge from a stop signal to an exception.

Exit codes of ``lowbw-train`` (and of each rank's process):

==========  =====================================================================================
code        meaning
==========  =====================================================================================
0           completed
1           failed (summary.json says why; also: an output file could not be written)
2           bad configuration, caught before any process started
4           diverged: a loss or gradient was not finite
130 / 143   interrupted by SIGINT / SIGTERM (128 + the signal's number, the shell's convention)
==========  =====================================================================================

(3 is the code a rank exits with when ``faults.crash_rank`` crashes it on purpose.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 4
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_of_signal(signum: int) -> int:
    return 128 + int(signum)


class ConfigError(ValueError):
    """A configuration that cannot run. Raised before any process is spawned where possible."""


class ScheduleError(ValueError):
    """A schedule that would deadlock or leave a message unmatched; names the rank and the action."""


class PeerError(RuntimeError):
    """A peer rank died, hung past the timeout, or sent something unexpected; names the rank.

    ``kind`` says what the evidence shows: "dead" (its process is gone), "hung" (alive but silent: no
    heartbeat), "slow" (alive, beating, but sent nothing in time), "link" (both ends alive, the link
    between them delivers nothing; ``link`` names it "src->dst"), or "" when nothing more is known."""

    def __init__(self, peer: int, message: str, kind: str = "", link: Optional[str] = None):
        super().__init__(message)
        self.peer, self.kind, self.link = peer, kind, link


class Diverged(RuntimeError):
    """A loss or gradient that is not finite: the run stops at ``step`` with status ``diverged``."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class Interrupted(BaseException):
    """SIGINT or SIGTERM asked this process to stop. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` (a sweep going on after a failed run) swallows it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return exit_code_of_signal(self.signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside: the first SIGINT or SIGTERM raises :class:`Interrupted` in the main thread; later
    ones are ignored, so that the stop is not itself cut short (whoever sent them escalates to SIGKILL
    if the process takes too long). Outside the main thread this does nothing (Python delivers signals
    to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        if not seen:
            seen.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_stop_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (main thread only): a process recording its failure
    finishes that record; whoever stops it escalates to SIGKILL if it takes too long."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
