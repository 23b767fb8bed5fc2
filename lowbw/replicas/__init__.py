"""Replicas of the pipeline: data parallelism across pipelines, over the same emulated links.

``layout``: which global rank is which replica's which pipeline rank. ``collective``: ring all-reduce
and all-gather of a replica group on the transport. ``sync``: the methods (``replicas/sync=``
allreduce, diloco, sparta) and their registry. docs/replicas.md tells the whole story.
"""

from lowbw.replicas.layout import Layout
from lowbw.replicas.sync import SYNCS, SyncMethod, build_sync, register_sync

__all__ = ["Layout", "SYNCS", "SyncMethod", "build_sync", "register_sync"]
