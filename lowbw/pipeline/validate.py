"""Former home of the player; kept only for modules that still import it from here (executor.py,
runtime.py, scripts/_bench_common.py). Import from :mod:`lowbw.pipeline.player`; delete this file when
nothing imports it."""

from lowbw.pipeline.player import message_key, peer_of, play, validate_schedule

__all__ = ["message_key", "peer_of", "play", "validate_schedule"]
