"""A rank started by lowbw's own launcher stops when the launcher is gone, even a launcher killed with
SIGKILL, so that no rank outlives it.

A thread polls twice a second: once the rank's parent changed (the fork server that started it exited
with the launcher) or the launcher's process ended, the rank sends itself SIGTERM and stops as for any
SIGTERM (recorded as ``interrupted``). The ranks poll out of phase, so the first to notice exits while
the others may still be in a receive from it; that receive then fails, and without a second look the
run would be recorded as ``failed`` with the first rank as the culprit. :func:`as_stop` is that second
look: a rank whose launcher is gone reports whatever stopped it as the SIGTERM it was about to get.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

from lowbw.errors import Interrupted
from lowbw.net.liveness import process_alive

POLL_S = 0.5  # wall seconds between looks: a killed launcher's ranks stop within about a second


class LauncherWatch:
    def __init__(self, launcher_pid: int):
        self.launcher_pid = launcher_pid
        self.first_parent = os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self.first_parent or not process_alive(self.launcher_pid)

    def start(self) -> "LauncherWatch":
        def loop():
            while not self.gone():
                time.sleep(POLL_S)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=loop, daemon=True, name="lowbw-launcher-watch").start()
        return self


_watch: Optional[LauncherWatch] = None


def watch_launcher(launcher_pid: int) -> None:
    """Start watching (once per process, before anything else of the run)."""
    global _watch
    _watch = LauncherWatch(launcher_pid).start()


def as_stop(error: BaseException) -> BaseException:
    """``error``, or -- when the launcher is gone and ``error`` is not already a stop -- the SIGTERM this
    rank's watch sends, so that a peer which noticed first is not blamed for the run's end."""
    if _watch is None or isinstance(error, Interrupted) or not _watch.gone():
        return error
    stop = Interrupted(signal.SIGTERM)
    stop.__cause__ = error
    return stop
