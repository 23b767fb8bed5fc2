"""One rank of a run: build its stages, links and clock, train, report to rank 0.

Called in every process, whoever started it (lowbw's own launcher or torchrun); the process group
is already set up by :func:`run_rank`'s caller environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE).
Rank 0 also writes the run's files (lowbw.metrics.recorder). A failure anywhere ends this process
with an error naming the rank; the launcher (or torchrun) ends the others.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lowbw.checkpoint import checkpoint_dir
from lowbw.errors import PeerError
from lowbw.models.flops import count_stage_flops
from lowbw.pipeline.durations import action_seconds

_CTRL_STATS = 2  # phase id of per-step reports on the control channel
_CTRL_DONE = 3  # phase id of the end-of-run report (measured energy)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def make_planner(cfg: Any, flops: dict[int, tuple[float, float]], rate: Optional[float] = None) -> Callable:
    """Planned durations for the virtual clock: None (measure), FLOPs / rate, or fixed seconds."""
    from lowbw.pipeline.actions import Kind

    mode = cfg.clock.durations if cfg.clock.name == "virtual" else "measured"
    if mode == "measured":
        return lambda a: None
    if mode == "fixed":
        per_stage = lambda s: (cfg.clock.forward_s, cfg.clock.backward_s)  # noqa: E731
    else:
        rate = cfg.clock.flops_per_s or rate
        per_stage = lambda s: (flops[s][0] / rate, flops[s][1] / rate)  # noqa: E731
    compute = (Kind.FORWARD, Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)
    # Codec work and the optimizer get 0 s under planned durations (documented in docs/architecture.md).
    return lambda a: action_seconds(a.kind, *per_stage(a.stage)) if a.kind in compute else 0.0


def channels(sched_list: list, rank: int) -> tuple[set, set]:
    from lowbw.net.transport import CH_BWD, CH_FWD
    from lowbw.pipeline.actions import Kind
    from lowbw.pipeline.validate import peer_of

    out, inc = set(), set()
    for sched in sched_list:
        for a in sched.actions[rank]:
            if a.kind == Kind.SEND_F:
                out.add((peer_of(a, sched), CH_FWD))
            elif a.kind == Kind.SEND_B:
                out.add((peer_of(a, sched), CH_BWD))
            elif a.kind == Kind.RECV_F:
                inc.add((peer_of(a, sched), CH_FWD))
            elif a.kind == Kind.RECV_B:
                inc.add((peer_of(a, sched), CH_BWD))
    return out, inc


def train_rank(cfg: Any, rank: int, world: int, run_dir: Optional[Path], local_rank: int, meta: dict) -> Optional[dict]:
    from lowbw.compress import build_codec
    from lowbw.config import _plain
    from lowbw.energy import profiles_for_ranks, select_meter
    from lowbw.data.corpus import Corpus
    from lowbw.metrics.collector import StepCollector
    from lowbw.metrics.recorder import Recorder, format_summary
    from lowbw.metrics.timeline import COMPUTE
    from lowbw.models.gpt import GPTStage
    from lowbw.net.clock import make_clock
    from lowbw.net.conditions import conditions_from_config
    from lowbw.net.link import LinkModel
    from lowbw.net.topology import Topology
    from lowbw.net.transport import CH_CTRL, Transport
    from lowbw.pipeline.executor import PHASE_TRAIN, Executor, StageRuntime
    from lowbw.pipeline.partition import partition_layers
    from lowbw.pipeline.schedules import build_schedule, forward_only

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, local_rank)
    p, m, T = cfg.pipeline.stages, cfg.pipeline.microbatches, cfg.model.block_size
    sched = build_schedule(cfg.schedule, p, m)
    eval_sched = forward_only(sched.n_stages, m, sched.stage_to_rank)
    ranges = partition_layers(cfg.model.n_layer, sched.n_stages, cfg.pipeline.partition)
    topo = Topology.from_config(cfg.net, world, seed=cfg.seed)
    clock = make_clock(cfg.clock.name, device)
    conditions = conditions_from_config(cfg.faults, cfg.net, world)
    link = LinkModel(topo, rank, seed=cfg.seed, conditions=conditions) if topo.emulate else None
    transport = Transport(rank, link, cfg.clock.name == "virtual", cfg.timeout_s, clock.now)

    stages: dict[int, StageRuntime] = {}
    last = sched.n_stages - 1
    for s in sched.stages_of(rank):
        module = GPTStage(cfg.model, *ranges[s], is_first=(s == 0), is_last=(s == last), seed=cfg.seed).to(device)
        codec = lambda d: build_codec(_plain(cfg.compress[d]))  # noqa: E731 -- one instance per end and direction
        stages[s] = StageRuntime(s, module, send_fwd=codec("fwd"), recv_fwd=codec("fwd"),
                                 send_bwd=codec("bwd"), recv_bwd=codec("bwd"),
                                 eval_send_fwd=codec("fwd"), eval_recv_fwd=codec("fwd"))
    params = [q for st in stages.values() for q in st.module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    corpus = Corpus(cfg.data.path, T, cfg.data.val_fraction, cfg.seed)

    flops: dict[int, tuple[float, float]] = {}
    if cfg.clock.name == "virtual" and cfg.clock.durations == "flops":
        mb = cfg.train.batch_size // m
        for s, st in stages.items():
            x = torch.zeros(mb, T, dtype=torch.long, device=device) if s == 0 else torch.zeros(mb, T, cfg.model.n_embd, device=device)
            y = torch.zeros(mb, T, dtype=torch.long, device=device) if s == last else None
            flops[s] = count_stage_flops(st.module, x, y)
    profile = profiles_for_ranks(cfg.hardware, world)[rank]
    executor = Executor(rank, stages, transport, clock, device,
                        make_planner(cfg, flops, profile.effective_flops))
    if getattr(sched, "asynchronous", False):  # pipedream_2bw: microbatches and weight versions outlive a step
        from lowbw.pipeline.async_executor import AsyncExecutor

        executor = AsyncExecutor.from_executor(executor, last_step=cfg.train.steps - 1, cfg=cfg)
    meter = select_meter(str(device), cfg.energy.meter)

    out, inc = channels([sched, eval_sched], rank)
    if rank != 0:
        out.add((0, CH_CTRL))
    else:
        inc |= {(r, CH_CTRL) for r in range(1, world)}
    transport.open(out, inc)

    recorder = None
    if rank == 0:
        recorder = Recorder(run_dir, cfg.clock.name, world, cfg.train.batch_size * T, cfg.train.steps,
                            cfg.train.warmup_steps, cfg.progress, meta)
    collector = None
    if rank == 0:
        collector = StepCollector(world, lambda r, step: transport.recv_json(r, (_CTRL_STATS, step, r, 0)),
                                  recorder.log_step)
    ckpt_root = checkpoint_dir(cfg, run_dir)
    first_step, resumed_at = 0, 0.0
    try:
        if cfg.resume:
            first_step, resumed_at = _restore(cfg, ckpt_root, rank, world, stages, opt, clock, link, recorder)
        dist.barrier()  # every rank's clock starts together (at 0, or where the checkpoint left it)
        clock.start(resumed_at)
        meter.begin()
        for step in range(first_step, cfg.train.steps):
            f = cfg.faults
            in_burst = f.straggler_every == 0 or step % f.straggler_every < f.straggler_burst
            clock.slowdown = f.straggler_factor if rank == f.straggler_rank and in_burst else 1.0
            if rank == cfg.faults.crash_rank and step == cfg.faults.crash_step:
                transport.flush()  # what earlier steps sent is on the wire; this step's work is lost
                print(f"lowbw: rank {rank} crashing at step {step} (faults.crash_rank)", file=sys.stderr, flush=True)
                os._exit(3)
            batch = corpus.train_batch(step, cfg.train.batch_size)
            opt.zero_grad(set_to_none=True)
            every = cfg.compress.error_every
            res = executor.run(sched, PHASE_TRAIN, step, batch.x, batch.y, batch.ids,
                               measure_error=bool(every) and step % every == 0)
            _, t0, t1 = clock.compute(opt.step, _opt_planned(cfg))
            res.events.append(_event(rank, "optimizer", t0, t1, step))
            report = {
                "rank": rank, "step": step, "end": clock.now(),
                "busy": sum(e.duration for e in res.events if e.kind in COMPUTE),
                "bytes_sent": {str(k): v for k, v in res.bytes_sent.items()},
                "loss_sum": res.loss_sum, "n_loss": res.n_loss,
                "events": [e.__dict__ for e in res.events],
                "codecs": {k: v.__dict__ for k, v in res.codecs.items()},
            }
            eval_wall = 0.0
            if step == cfg.train.steps - 1 or (cfg.train.eval_interval and (step + 1) % cfg.train.eval_interval == 0):
                w0 = time.perf_counter()
                with clock.paused():
                    report["val_loss"] = evaluate(executor, eval_sched, corpus, cfg, step)
                eval_wall = time.perf_counter() - w0
            if rank != 0:
                transport.send_json(0, (_CTRL_STATS, step, rank, 0), report)
            else:
                collector.submit(step, report, eval_wall)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
                with clock.paused():
                    if collector is not None:
                        collector.drain()  # the recorder's totals must include this step
                    _save_checkpoint(cfg, ckpt_root, rank, step, stages, opt, clock, link, recorder)
            meter.poll()
        meter.end()
        measurement = meter.measurement()
        mine = measurement.to_dict() if measurement is not None else None
        if rank != 0:
            transport.send_json(0, (_CTRL_DONE, 0, rank, 0), {"measurement": mine})
        else:
            collector.drain()
            measured = [mine] + [transport.recv_json(r, (_CTRL_DONE, 0, r, 0))["measurement"] for r in range(1, world)]
            recorder.set_energy_inputs(cfg.hardware, cfg.energy, measured)
        transport.close()
    except BaseException as e:
        if recorder is not None:
            collector.close(timeout_s=5.0)  # let it finish the step it is writing, if it can
            recorder.finish("failed", _describe(e, rank))
        raise
    if collector is not None:
        collector.close()
    if recorder is not None:
        summary = recorder.finish("completed")
        print("\n" + format_summary(summary), flush=True)
        return summary
    return None


def _codec_states(stages: dict) -> dict:
    roles = ("send_fwd", "recv_fwd", "send_bwd", "recv_bwd", "eval_send_fwd", "eval_recv_fwd")
    return {f"{s}.{role}": getattr(st, role) for s, st in stages.items() for role in roles}


def _save_checkpoint(cfg, root: Path, rank: int, step: int, stages: dict, opt, clock, link, recorder) -> None:
    from lowbw.checkpoint import save

    state = {
        "step": step,
        "model": {str(s): st.module.state_dict() for s, st in stages.items()},
        "optimizer": opt.state_dict(),
        "codecs": {k: c.state_dict() for k, c in _codec_states(stages).items()},
        "clock": clock.now(),
        "link": link.state_dict() if link is not None else None,
        "recorder": recorder.state_dict() if recorder is not None else None,
    }
    save(root, rank, step, state, cfg.checkpoint.keep)


def _restore(cfg, root: Path, rank: int, world: int, stages: dict, opt, clock, link, recorder) -> tuple[int, float]:
    """Load the newest checkpoint all ranks share; return (first step to run, clock time to resume at)."""
    from lowbw.checkpoint import load, steps

    mine = torch.tensor([steps(root, rank)[-1] if root is not None and steps(root, rank) else -1])
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)  # the newest step every rank has
    step = int(mine.item())
    if step < 0:
        raise RuntimeError(f"resume=true but rank {rank} finds no checkpoint every rank has under {root}")
    state = load(root, rank, step)
    for s, st in stages.items():
        st.module.load_state_dict(state["model"][str(s)])
    opt.load_state_dict(state["optimizer"])
    for k, codec in _codec_states(stages).items():
        codec.load_state_dict(state["codecs"][k])
    if link is not None and state["link"] is not None:
        link.load_state_dict(state["link"])
    if recorder is not None:
        recorder.load_state_dict(state["recorder"])
    print(f"lowbw: rank {rank} resumes after step {step} from {root}", file=sys.stderr, flush=True)
    return step + 1, float(state["clock"])


def _opt_planned(cfg: Any) -> Optional[float]:
    # Under planned durations the optimizer is charged 0 s: AdamW is O(params) per step, a
    # microbatch's forward alone is O(params x tokens).
    return None if cfg.clock.name == "wall" or cfg.clock.durations == "measured" else 0.0


def _event(rank: int, kind: str, t0: float, t1: float, step: int):
    from lowbw.metrics.timeline import Event

    return Event(rank, kind, t0, t1, step, kind)


def evaluate(executor, eval_sched, corpus, cfg, step: int) -> Optional[float]:
    from lowbw.pipeline.executor import PHASE_EVAL

    total, n = 0.0, 0
    for i in range(cfg.train.eval_batches):
        b = corpus.val_batch(i, cfg.train.batch_size)
        res = executor.run(eval_sched, PHASE_EVAL, step * cfg.train.eval_batches + i, b.x, b.y, b.ids, emulate=False)
        total += res.loss_sum
        n += res.n_loss
    return total / n if n else None


def _describe(e: BaseException, rank: int) -> str:
    if isinstance(e, PeerError):
        return str(e)
    return f"rank {rank}: {type(e).__name__}: {e}"


def run_rank(cfg_dict: dict, rank: int, world: int, run_dir: Optional[str], local_rank: int, meta: dict,
             init: Optional[dict] = None) -> None:
    """Process entry: set up the group, train, exit. Never returns on failure: exits non-zero."""
    torch.set_num_threads(1)
    cfg = OmegaConf.create(cfg_dict)
    err_dir = Path(run_dir) / "errors" if run_dir else None
    try:
        timeout = timedelta(seconds=cfg.timeout_s)
        if init is not None:  # lowbw's own launcher: rendezvous on the address it chose
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = init["addr"], str(init["port"])
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        else:  # torchrun: the group comes from its environment; rank 0's run folder is everyone's
            dist.init_process_group("gloo", timeout=timeout)
            shared = [run_dir if rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
            err_dir = Path(run_dir) / "errors" if rank == 0 else None
        train_rank(cfg, rank, world, Path(run_dir) if run_dir else None, local_rank, meta)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 -- turned into one readable line naming the rank
        msg = _describe(e, rank)
        print(f"lowbw: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("LOWBW_TRACEBACK"):
            traceback.print_exc()
        if err_dir is not None:
            try:
                import json

                err_dir.mkdir(parents=True, exist_ok=True)
                (err_dir / f"rank{rank}.json").write_text(
                    json.dumps({"rank": rank, "error": msg, "peer": getattr(e, "peer", None)}))
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(1)  # threads blocked in gloo must not keep a failed rank alive
