"""The launcher's log: what lowbw-train says on the console is also kept in the run's ``train.log``.

Hydra's job logging (``configs/hydra/job_logging/lowbw.yaml``) sends the ``lowbw`` loggers to three
places: information (progress of the launch, the end-of-run summary) to stdout as plain text,
warnings and errors to stderr, and everything, time-stamped, to ``<run folder>/train.log``. Stage
processes do not log through it: their failures reach the launcher, which logs them.
"""

from __future__ import annotations

import logging

#: the launcher's logger (lowbw-train, its sweep jobs and rank 0 under torchrun)
log = logging.getLogger("lowbw")


class BelowWarning(logging.Filter):
    """Passes records below WARNING: stdout gets information, stderr the rest (no line twice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class RunLogFile(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) is dropped without a traceback: the same
    words are already on the console, and the run's own outputs say what failed."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 -- logging's name
        pass
