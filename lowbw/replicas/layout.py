"""Where each process sits when the pipeline is copied: ``replicas.count`` (R) replicas of an S-rank pipeline.

Rank g of the R x S processes is rank ``g mod S`` of replica ``g div S``: replica j holds ranks
j*S .. j*S + S - 1, so replica 0 is exactly the single pipeline of R = 1 (same ranks, same files).
The schedule speaks of a replica's ranks 0..S-1 (its *pipeline* ranks); the transport, the link
model, the network topology, the hardware profiles and every file speak of the global ranks. The
ranks that hold the same pipeline rank in every replica -- the same stages, the same parameters --
form that rank's *replica group*, in which the synchronisation (lowbw.replicas.sync) runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def replica_count(cfg: Any) -> int:
    """``replicas.count`` of a composed config; 1 for a config composed without the replicas group."""
    replicas = getattr(cfg, "replicas", None)
    return int(replicas.count) if replicas is not None else 1


@dataclass(frozen=True)
class Layout:
    pipeline_ranks: int  # S: ranks of one pipeline (the schedule's n_ranks)
    replicas: int = 1  # R

    @staticmethod
    def of(cfg: Any, pipeline_ranks: int) -> "Layout":
        """The layout of a composed config (``replicas.count``; 1 when the config has no replicas)."""
        return Layout(pipeline_ranks, replica_count(cfg))

    @property
    def world(self) -> int:
        return self.pipeline_ranks * self.replicas

    def replica_of(self, rank: int) -> int:
        return rank // self.pipeline_ranks

    def pipeline_rank(self, rank: int) -> int:
        return rank % self.pipeline_ranks

    def base(self, rank: int) -> int:
        """The global rank of pipeline rank 0 of ``rank``'s replica."""
        return self.replica_of(rank) * self.pipeline_ranks

    def group(self, rank: int) -> list[int]:
        """The global ranks holding ``rank``'s pipeline rank, one per replica, in replica order."""
        p = self.pipeline_rank(rank)
        return [j * self.pipeline_ranks + p for j in range(self.replicas)]

    def describe(self, rank: int) -> str:
        """``"rank 5"``, or with replicas ``"rank 5 (replica 1, pipeline rank 1)"``: how errors name a rank."""
        if self.replicas == 1:
            return f"rank {rank}"
        return f"rank {rank} (replica {self.replica_of(rank)}, pipeline rank {self.pipeline_rank(rank)})"
