"""Cut ``n_layer`` transformer blocks into contiguous pipeline stages."""

from __future__ import annotations

from lowbw.errors import ConfigError


def partition_layers(n_layer: int, n_stages: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    """Return [start, end) block ranges per stage.

    ``partition`` gives blocks per stage explicitly (uneven splits allowed, e.g. [1, 3]); without
    it the blocks are spread as evenly as possible, the first stages taking the remainder. Every
    stage needs at least one block: a stage with none would only pass its input on.
    """
    if n_stages > n_layer:
        raise ConfigError(
            f"pipeline.stages={n_stages} is more than model.n_layer={n_layer}: every stage needs at least "
            f"one block; use at most {n_layer} stages or more layers"
        )
    if partition is None:
        base, extra = divmod(n_layer, n_stages)
        counts = [base + (1 if i < extra else 0) for i in range(n_stages)]
    else:
        counts = list(partition)
        if len(counts) != n_stages or any(c < 1 for c in counts) or sum(counts) != n_layer:
            raise ConfigError(
                f"pipeline.partition={counts} must list {n_stages} positive block counts summing to "
                f"model.n_layer={n_layer}"
            )
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges
