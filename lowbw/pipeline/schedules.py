"""Schedule generators: small functions that return per-rank action lists.

Each generator writes compute actions only (F, B, I, W); :func:`add_communication` lowers them by
placing a receive right before the compute that needs a remote input and a send right after the
compute that produces a remote output (the same lowering torch.distributed.pipelining applies to
its "compute_only" CSVs). :func:`build_schedule` then validates the result by running it on the
schedule model (lowbw.pipeline.player) before anything is spawned.
"""

from __future__ import annotations

from typing import Any, Callable

from lowbw.errors import ConfigError, ScheduleError
from lowbw.pipeline.actions import Action, Kind, Schedule

Rows = dict[int, list[Action]]
Generator = Callable[[int, int], tuple[Rows, tuple[int, ...]]]

SCHEDULES: dict[str, Generator] = {}


def register_schedule(name: str) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        SCHEDULES[name] = fn
        return fn

    return deco


@register_schedule("gpipe")
def gpipe(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """GPipe (Huang et al. 2019): all forwards, then all backwards; m microbatches of activations held."""
    rows = {r: [Action(r, Kind.FORWARD, i) for i in range(m)] + [Action(r, Kind.FULL_BACKWARD, i) for i in range(m)]
            for r in range(p)}
    return rows, tuple(range(p))


@register_schedule("1f1b")
def one_f_one_b(p: int, m: int) -> tuple[Rows, tuple[int, ...]]:
    """1F1B / PipeDream-flush (Narayanan et al. 2021): warm up with p-1-r forwards, then alternate.

    Same bubble as GPipe, (p-1)/(m+p-1), but stage r holds at most p-r microbatches of activations.
    """
    rows: Rows = {}
    for r in range(p):
        warmup = min(m, p - 1 - r)
        acts = [Action(r, Kind.FORWARD, i) for i in range(warmup)]
        for i in range(m - warmup):
            acts.append(Action(r, Kind.FORWARD, warmup + i))
            acts.append(Action(r, Kind.FULL_BACKWARD, i))
        acts += [Action(r, Kind.FULL_BACKWARD, i) for i in range(m - warmup, m)]
        rows[r] = acts
    return rows, tuple(range(p))


def forward_only(p: int, m: int, stage_to_rank: tuple[int, ...] | None = None) -> Schedule:
    """Evaluation: forwards only, no gradients; p stages placed as the training schedule places them."""
    stage_to_rank = tuple(stage_to_rank) if stage_to_rank is not None else tuple(range(p))
    rows = {r: [Action(s, Kind.FORWARD, i) for s in range(p) if stage_to_rank[s] == r for i in range(m)]
            for r in range(1 + max(stage_to_rank))}
    return Schedule("forward_only", p, m, stage_to_rank, add_communication(rows, stage_to_rank))


def infer_stage_to_rank(rows: Rows) -> tuple[int, ...]:
    owner: dict[int, int] = {}
    for rank, acts in rows.items():
        for a in acts:
            if owner.setdefault(a.stage, rank) != rank:
                raise ScheduleError(f"rank {rank} action {a}: stage {a.stage} also appears on rank {owner[a.stage]}")
    n = 1 + max(owner) if owner else 0
    missing = [s for s in range(n) if s not in owner]
    if missing:
        raise ScheduleError(f"no rank runs stage(s) {missing}")
    return tuple(owner[s] for s in range(n))


def add_communication(rows: Rows, stage_to_rank: tuple[int, ...]) -> Rows:
    """Insert RECV_* before and SEND_* after compute actions whose neighbour stage is on another rank."""
    last = len(stage_to_rank) - 1
    out: Rows = {}
    for rank, acts in rows.items():
        lowered: list[Action] = []
        for a in acts:
            s, mb = a.stage, a.microbatch
            prev_remote = s > 0 and stage_to_rank[s - 1] != rank
            next_remote = s < last and stage_to_rank[s + 1] != rank
            if a.kind == Kind.FORWARD:
                if prev_remote:
                    lowered.append(Action(s, Kind.RECV_F, mb))
                lowered.append(a)
                if next_remote:
                    lowered.append(Action(s, Kind.SEND_F, mb))
            elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                if next_remote:
                    lowered.append(Action(s, Kind.RECV_B, mb))
                lowered.append(a)
                if prev_remote:
                    lowered.append(Action(s, Kind.SEND_B, mb))
            else:
                lowered.append(a)
        out[rank] = lowered
    return out


def place_receives(rows: Rows, stage_to_rank: tuple[int, ...]) -> Rows:
    """Move each RECV_* to just before the first compute on its rank that needs it.

    torch.distributed.pipelining posts receives early (irecv) and waits for them at the compute; in
    lowbw a receive blocks where it stands. Placing it right before its consumer gives the same
    timing. Sends and computes keep their order; a receive with no consumer stays where it was.
    """
    out: Rows = {}
    for rank, acts in rows.items():
        pending: dict[tuple, Action] = {}
        lowered: list[Action] = []
        for a in acts:
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                pending[(a.kind, a.stage, a.microbatch)] = a
                continue
            if a.kind == Kind.FORWARD:
                need = (Kind.RECV_F, a.stage, a.microbatch)
            elif a.kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT):
                need = (Kind.RECV_B, a.stage, a.microbatch)
            else:
                need = None
            if need in pending:
                lowered.append(pending.pop(need))
            lowered.append(a)
        lowered += pending.values()
        out[rank] = lowered
    return out


def build_schedule(cfg: Any, p: int, m: int) -> Schedule:
    """Generate (or read from CSV), lower and validate the training schedule named by ``cfg.name``."""
    from lowbw.pipeline.player import validate_schedule

    name = cfg.name
    if name == "csv":
        if not getattr(cfg, "csv", None):
            raise ConfigError("schedule=csv needs schedule.csv=<path of a per-rank action CSV>")
        try:
            sched = Schedule.from_csv(cfg.csv)
        except (OSError, ValueError) as e:
            raise ConfigError(f"schedule.csv={cfg.csv!r}: {e}") from None
        if sched.n_ranks != p or sched.n_microbatches != m:
            raise ConfigError(
                f"schedule.csv={cfg.csv!r} is for {sched.n_ranks} ranks and {sched.n_microbatches} microbatches, "
                f"the run has pipeline.stages={p} and pipeline.microbatches={m}"
            )
    else:
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}, csv")
        extra = {k: v for k, v in _params(cfg).items() if k not in ("name", "csv")}
        built = SCHEDULES[name](p, m, **_accepted(SCHEDULES[name], extra))
        if isinstance(built, Schedule):  # a generator that lowers and validates its own (pipedream_2bw)
            return built
        rows, stage_to_rank = built
        sched = Schedule(name, len(stage_to_rank), m, stage_to_rank, add_communication(rows, stage_to_rank))
    validate_schedule(sched)
    return sched


def _params(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}


def _accepted(fn: Callable, params: dict) -> dict:
    """The schedule fields a generator takes (e.g. virtual_stages is only for interleaved_1f1b)."""
    import inspect

    sig = inspect.signature(fn)
    if any(q.kind == q.VAR_KEYWORD for q in sig.parameters.values()):
        return params
    return {k: v for k, v in params.items() if k in sig.parameters}


# More generators register themselves on import.
from lowbw.pipeline import interleaved as _interleaved, zero_bubble as _zero_bubble  # noqa: E402,F401
from lowbw.pipeline import pipedream_2bw as _pipedream_2bw  # noqa: E402,F401
