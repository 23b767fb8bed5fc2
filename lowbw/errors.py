"""Errors a user is meant to read: one sentence naming the setting and the fix."""


class ConfigError(ValueError):
    """A configuration that cannot run. Raised before any process is spawned where possible."""


class ScheduleError(ValueError):
    """A schedule that would deadlock or leave a message unmatched; names the rank and the action."""


class PeerError(RuntimeError):
    """A peer rank died, hung past the timeout, or sent something unexpected; names the rank."""

    def __init__(self, peer: int, message: str):
        super().__init__(message)
        self.peer = peer
