"""Spawn a small gloo group for a check and build its ranks the way real runs do.

:func:`scenario_config` turns a :class:`Scenario` into the same config ``lowbw-train`` would run
(composed by Hydra from configs/), :func:`lowbw.validation.validate` gives its plan, and each
spawned worker builds its rank with :func:`lowbw.rank.build.build_rank`: the harnesses test the
builders, executor and transport of real runs, not copies of them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.config import ModelConfig
from lowbw.launch import free_port, rank_context, stop_processes
from lowbw.rank.build import Rank, build_rank
from lowbw.rank.process import adopt_environment
from lowbw.train import compose
from lowbw.validation import Plan, validate


@dataclass
class Scenario:
    """A small pipeline to check: schedule, ranks, microbatches, layers, partition, seed."""

    schedule: str
    stages: int  # ranks taking part
    microbatches: int = 4
    n_layer: int = 4
    partition: Optional[list[int]] = None
    params: dict = field(default_factory=dict)  # extra schedule parameters, e.g. virtual_stages
    batch_size: int = 8
    seed: int = 7
    model_args: dict = field(default_factory=dict)  # ModelConfig fields over the shape below, e.g. {"arch": "gpt2"}
    boundary: dict = field(default_factory=dict)  # boundary method and its fields, e.g. {"name": "subspace", "rank": 4}
    extra: list = field(default_factory=list)  # further overrides, e.g. ["compress/fwd=int8"]

    def model(self) -> ModelConfig:
        """A small model (width 32, 2 heads, context 16, n_layer blocks); ModelConfig's defaults otherwise."""
        return ModelConfig(**{"n_layer": self.n_layer, "n_embd": 32, "n_head": 2, "block_size": 16, **self.model_args})

    def overrides(self) -> list[str]:
        m = self.model()
        out = [f"schedule={self.schedule}", f"pipeline.stages={self.stages}",
               f"pipeline.microbatches={self.microbatches}", f"train.batch_size={self.batch_size}",
               f"model.n_layer={m.n_layer}", f"model.n_embd={m.n_embd}", f"model.n_head={m.n_head}",
               f"model.block_size={m.block_size}", f"seed={self.seed}", "clock=virtual", "net.emulate=false",
               "progress=false", "energy.meter=none"]
        out += [f"model.{k}={_override_value(v)}" for k, v in self.model_args.items()
                if k not in ("n_layer", "n_embd", "n_head", "block_size")]
        if self.partition is not None:
            out.append(f"pipeline.partition=[{','.join(map(str, self.partition))}]")
        if self.boundary:
            out.append(f"boundary={self.boundary['name']}")
            out += [f"boundary.{k}={_override_value(v)}" for k, v in self.boundary.items() if k != "name"]
        return out + [f"schedule.{k}={v}" for k, v in self.params.items()] + list(self.extra)


def _override_value(v: Any) -> str:
    """A value as Hydra's override grammar spells it."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def scenario_config(sc: Scenario, extra: Optional[list[str]] = None) -> tuple[dict, Plan]:
    """The plain config and validated plan of ``sc`` (plus ``extra`` overrides)."""
    cfg = compose(sc.overrides() + list(extra or []))
    return OmegaConf.to_container(cfg, resolve=True), validate(cfg)


def join(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def open_rank(cfg_dict: dict, plan: Plan, rank: int) -> Rank:
    """Build ``rank`` as a run does (no reports to rank 0: nothing records)."""
    return build_rank(OmegaConf.create(cfg_dict), plan, rank, plan.schedule.n_ranks)


def in_environment(env: dict[str, str], target: Any, *args: Any) -> None:
    """Run ``target(*args)`` in the starting process's environment (a fork server's child has the server's)."""
    adopt_environment(env)
    target(*args)


@contextlib.contextmanager
def spawned_group(target, world: int, args: tuple, timeout_s: float, what: str) -> Iterator[Path]:
    """Run ``target(rank, world, port, *args, out_dir)`` in ``world`` spawned processes (a gloo group on a
    free loopback port); yield the temporary ``out_dir`` they wrote into once all exited cleanly."""
    with tempfile.TemporaryDirectory() as out:
        ctx = rank_context()
        port = free_port()
        env = dict(os.environ)
        procs = [ctx.Process(target=in_environment, args=(env, target, r, world, port, *args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in procs]
        stop_processes(procs, 1.0)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"{what} processes exited with codes {codes}")
        yield Path(out)


def pair_results(target, expected: int, timeout_s: float = 120.0) -> tuple[list, list[int]]:
    """Run ``target(rank, port, queue)`` in two spawned processes (ranks 0 and 1, a free loopback port for their
    group); return the ``expected`` items they put on the queue, in arrival order, and their exit codes."""
    ctx = rank_context()
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, q)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        items = [q.get(timeout=timeout_s) for _ in range(expected)]
        for p in procs:
            p.join(60)
        return items, [p.exitcode for p in procs]
    finally:
        stop_processes(procs, 1.0)
