"""What a run's clock times, said plainly: which figures are the same on every machine and which are not.

A run's step time, throughput, bubble and energy are on its clock (docs/architecture.md, "The two
clocks"). How the clock charges compute decides whether they are a property of the configuration or
of the machine that ran it:

- ``clock=virtual clock.durations=flops`` (the default): FLOPs / a stated hardware profile's effective
  rate. The same command gives the same virtual-clock figures, bit for bit, on any machine.
- ``clock.durations=fixed``: fixed seconds per forward and backward; deterministic as well.
- ``clock.durations=measured``: the thread CPU time this machine took: machine-dependent.
- ``clock=wall``: real time on this machine: machine-dependent.
- a regime (``regime=gpt_1b``, lowbw/regime.py): a target model's FLOPs and messages on the stated
  profile: deterministic, and *projected* for the target, while the loss is the small model's.

The loss is always measured: the model really trains (on another CPU a matmul may round differently in
the last bits, docs/architecture.md). :func:`describe` returns the lines the console and summary.json
print.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from lowbw.energy import HardwareProfile
from lowbw.net.clock import planned_durations
from lowbw.regime import Regime


#: :func:`describe`'s ``durations`` values whose compute is planned, not measured: codec work and the optimizer
#: are charged 0 s under them (lowbw.net.clock.planned_durations)
PLANNED = frozenset({"flops", "fixed", "regime"})


def model_label(model: Any) -> str:
    """e.g. "tiny GPT (4 blocks, width 64, context 64)"."""
    return f"{model.name} GPT ({model.n_layer} blocks, width {model.n_embd}, context {model.block_size})"


def hardware_label(profiles: Sequence[HardwareProfile]) -> str:
    """e.g. "4x cpu_local" or "2x h100 + 2x t4" (one entry per rank)."""
    counts = Counter(p.name for p in profiles)
    return " + ".join(f"{n}x {name}" for name, n in counts.items())


def rate_label(flops_per_s: float) -> str:
    """e.g. "51.2 GFLOP/s", "57.8 TFLOP/s"."""
    return f"{flops_per_s / 1e12:.3g} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.3g} GFLOP/s"


def describe(cfg: Any, profiles: Sequence[HardwareProfile], regime: Optional[Regime] = None) -> dict[str, Any]:
    """``{"durations", "deterministic", "timing", "learning"}`` of a run with config ``cfg``, per-rank
    ``profiles`` and ``regime``: how compute is charged, whether the clock's figures are the same on every
    machine, and one line each for what is timed and what learns."""
    net = cfg.net.name
    mode = planned_durations(cfg.clock)
    if regime is not None:
        rate = (rate_label(cfg.clock.flops_per_s) if cfg.clock.flops_per_s
                else " / ".join(sorted({rate_label(p.effective_flops) for p in profiles})))
        target = SimpleNamespace(**regime.model)
        return {"durations": "regime", "deterministic": True,
                "timing": (f"projected: {target.name} on {hardware_label(profiles)} over {net} -- {model_label(target)}"
                           f", its FLOPs / {rate}, its {regime.activation_dtype} messages after the same codec "
                           "(deterministic: the same on every machine)"),
                "learning": (f"{model_label(cfg.model)}, measured; its loss per step stands in for "
                             f"{target.name}'s (docs/time_to_loss.md)")}
    if cfg.clock.name == "wall":
        links = (f"links of {net} shaped by the kernel (tc; a network namespace per rank)"
                 if getattr(cfg.net, "backend", "emulated") == "kernel"
                 else f"links emulated as {net} in real time" if cfg.net.emulate else "real links, not emulated")
        kind, timing = "wall", f"wall clock of this machine, {links} (machine-dependent)"
    elif mode is None:
        kind, timing = "measured", (f"virtual clock; compute = thread CPU time measured on this machine "
                                    f"(machine-dependent); links: {net}")
    elif mode == "fixed":
        kind, timing = "fixed", (f"virtual clock; fixed {cfg.clock.forward_s:g} s forward, {cfg.clock.backward_s:g} s "
                                 f"backward per microbatch and stage; links: {net} (deterministic)")
    else:
        rate = (rate_label(cfg.clock.flops_per_s) if cfg.clock.flops_per_s
                else " / ".join(sorted({rate_label(p.effective_flops) for p in profiles})))
        kind, timing = "flops", (f"virtual clock; {cfg.model.name} GPT on {hardware_label(profiles)} ({rate}: FLOPs / "
                                 f"rate) over {net} (deterministic: the same on every machine)")
    return {"durations": kind, "deterministic": kind in ("flops", "fixed"), "timing": timing,
            "learning": f"{model_label(cfg.model)}, measured"}
