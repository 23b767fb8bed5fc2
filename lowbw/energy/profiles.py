"""Hardware profiles: what a node can compute and what it draws, each number with its source.

A :class:`HardwareProfile` gives the simulator a compute rate (``peak_flops * mfu``) and the energy
model two powers: ``busy_power_w`` while the rank computes (forward, backward, codec work,
optimizer) and ``idle_power_w`` for the rest of the run (bubbles, waiting on links). Every number
carries a source string in ``sources``; figures not checked against a primary source say
"(unverified)".

Built-in profiles are keyed by the Hydra group value (``hardware=h100`` loads
``configs/hardware/h100.yaml``, which holds the same numbers as :data:`PROFILES`). Heterogeneous
nodes: ``hardware.per_rank`` is ``null`` (every rank gets the selected profile, with any command-line
overrides) or a list with one profile name per rank, e.g. ``hardware.per_rank=[h100,h100,rtx4090,t4]``;
see :func:`profiles_for_ranks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from lowbw.config import plain
from lowbw.errors import ConfigError

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class HardwareProfile:
    """One node's compute rate and power draw.

    ``peak_flops`` is the datasheet peak in FLOP/s at the precision named in ``precision`` (dense,
    no sparsity). ``mfu`` is the fraction of that peak a training step achieves (model FLOPs
    utilisation); the simulator's effective rate is ``peak_flops * mfu``.
    """

    name: str
    peak_flops: float  # FLOP/s, dense, at `precision`
    mfu: float  # achieved fraction of peak_flops, 0 < mfu <= 1
    busy_power_w: float  # W while computing
    idle_power_w: float  # W while not computing (still powered, part of the run)
    memory_bytes: int  # device memory (bytes)
    precision: str = "bf16"  # what peak_flops refers to: "bf16", "fp16", "fp32", ...
    kind: str = "gpu"  # "gpu" | "cpu"
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.peak_flops <= 0:
            raise ConfigError(f"hardware {self.name!r}: peak_flops must be > 0, got {self.peak_flops}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"hardware {self.name!r}: mfu must be in (0, 1], got {self.mfu}")
        if self.busy_power_w < 0 or self.idle_power_w < 0:
            raise ConfigError(f"hardware {self.name!r}: powers must be >= 0 W")
        if self.idle_power_w > self.busy_power_w:
            raise ConfigError(
                f"hardware {self.name!r}: idle_power_w ({self.idle_power_w}) exceeds busy_power_w "
                f"({self.busy_power_w}); check the profile"
            )

    @property
    def effective_flops(self) -> float:
        """FLOP/s a training step achieves: ``peak_flops * mfu``."""
        return self.peak_flops * self.mfu

    def compute_seconds(self, flops: float) -> float:
        """Simulated duration of ``flops`` of work on this node."""
        return float(flops) / self.effective_flops

    def energy_j(self, busy_s: float, idle_s: float) -> float:
        """``P_busy * t_busy + P_idle * t_idle`` in joules."""
        return self.busy_power_w * busy_s + self.idle_power_w * idle_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> "HardwareProfile":
        """Build from a mapping (a Hydra ``hardware`` node or a plain dict); unknown keys are an error,
        except ``per_rank`` which belongs to the group, not the profile."""
        cfg = plain(cfg)
        names = {f.name for f in fields(HardwareProfile)}
        extra = set(cfg) - names - {"per_rank"}
        if extra:
            raise ConfigError(f"hardware: unknown keys {sorted(extra)}; known: {sorted(names | {'per_rank'})}")
        missing = {"name", "peak_flops", "mfu", "busy_power_w", "idle_power_w", "memory_bytes"} - set(cfg)
        if missing:
            raise ConfigError(f"hardware: missing keys {sorted(missing)}")
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["sources"] = dict(kwargs.get("sources") or {})
        for k in ("peak_flops", "mfu", "busy_power_w", "idle_power_w"):
            kwargs[k] = float(kwargs[k])
        kwargs["memory_bytes"] = int(kwargs["memory_bytes"])
        builtin = PROFILES.get(kwargs["name"])
        if builtin is not None:  # a number changed on the command line no longer has the file's source
            for k in ("peak_flops", "mfu", "busy_power_w", "idle_power_w", "memory_bytes"):
                if kwargs[k] != getattr(builtin, k):
                    kwargs["sources"][k] = f"override (built-in {builtin.name}: {getattr(builtin, k):g})"
        return HardwareProfile(**kwargs)


_ASSUMED_MFU = "assumption: ~40% MFU is typical of well-tuned LLM training on large GPUs (unverified)"

#: Built-in profiles keyed by the Hydra group value. Keep in sync with configs/hardware/*.yaml
#: (tests/test_energy.py checks that they agree).
PROFILES: dict[str, HardwareProfile] = {}


def register_profile(profile: HardwareProfile, *, overwrite: bool = False) -> HardwareProfile:
    if profile.name in PROFILES and not overwrite:
        raise ConfigError(f"hardware profile {profile.name!r} already registered")
    PROFILES[profile.name] = profile
    return profile


register_profile(HardwareProfile(
    name="h100", peak_flops=989e12, mfu=0.40, busy_power_w=700.0, idle_power_w=80.0,
    memory_bytes=80 * GB, precision="bf16", kind="gpu",
    sources={
        "peak_flops": "NVIDIA H100 SXM5 datasheet: 1,979 TFLOPS bf16 with sparsity -> 989 TFLOPS dense",
        "mfu": _ASSUMED_MFU,
        "busy_power_w": "NVIDIA H100 SXM5 datasheet: max TDP 700 W (PCIe card: 350 W)",
        "idle_power_w": "idle roughly 70-100 W in public nvidia-smi logs (unverified); 80 W taken",
        "memory_bytes": "NVIDIA H100 SXM5 datasheet: 80 GB HBM3",
    },
))
register_profile(HardwareProfile(
    name="a100", peak_flops=312e12, mfu=0.40, busy_power_w=400.0, idle_power_w=55.0,
    memory_bytes=80 * GB, precision="bf16", kind="gpu",
    sources={
        "peak_flops": "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)",
        "mfu": _ASSUMED_MFU,
        "busy_power_w": "NVIDIA A100 80GB SXM datasheet: max TDP 400 W",
        "idle_power_w": "idle ~50-60 W reported in public nvidia-smi logs (unverified); 55 W taken",
        "memory_bytes": "NVIDIA A100 80GB SXM datasheet: 80 GB HBM2e",
    },
))
register_profile(HardwareProfile(
    name="rtx4090", peak_flops=165.2e12, mfu=0.35, busy_power_w=450.0, idle_power_w=25.0,
    memory_bytes=24 * GB, precision="bf16", kind="gpu",
    sources={
        "peak_flops": "NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 bf16 tensor, fp32 accumulate, "
                      "165.2 TFLOPS dense (unverified)",
        "mfu": "assumption: consumer card, smaller batches (unverified)",
        "busy_power_w": "NVIDIA RTX 4090 specifications: total graphics power 450 W",
        "idle_power_w": "desktop idle ~20-30 W in press reviews (unverified); 25 W taken",
        "memory_bytes": "NVIDIA RTX 4090 specifications: 24 GB GDDR6X",
    },
))
register_profile(HardwareProfile(
    name="t4", peak_flops=65e12, mfu=0.30, busy_power_w=70.0, idle_power_w=10.0,
    memory_bytes=16 * GB, precision="fp16", kind="gpu",
    sources={
        "peak_flops": "NVIDIA T4 datasheet: 65 TFLOPS fp16/fp32 mixed precision (tensor cores)",
        "mfu": "assumption: older card, as in SWARM's T4 pipelines (unverified)",
        "busy_power_w": "NVIDIA T4 datasheet: 70 W max power",
        "idle_power_w": "~9-10 W in P8 state in public nvidia-smi logs (unverified); 10 W taken",
        "memory_bytes": "NVIDIA T4 datasheet: 16 GB GDDR6",
    },
))
register_profile(HardwareProfile(
    name="cpu_local", peak_flops=256e9, mfu=0.20, busy_power_w=7.0, idle_power_w=1.5,
    memory_bytes=24 * GB, precision="fp32", kind="cpu",
    sources={
        "peak_flops": "derived: 2 vCPUs x 2.0 GHz x 64 fp32 FLOP/cycle (2 AVX-512 FMA units), lscpu of the VM "
                      "the profile was written on (unverified peak; turbo not counted; other VMs of the class "
                      "differ: docs/energy.md, cpu_local)",
        "mfu": "rough: a 6-block GPT (d=128, T=128, batch 8) step ~150 ms on one thread of that VM ~ 50 GFLOP/s "
               "(unverified); scripts/cpu_rate.py measures it: docs/energy.md, cpu_local",
        "busy_power_w": "Cloud Carbon Footprint methodology, AWS average max 3.5 W per vCPU x 2 vCPUs "
                        "(excludes memory, disks, host overhead)",
        "idle_power_w": "Cloud Carbon Footprint methodology, AWS average min 0.74 W per vCPU x 2 vCPUs",
        "memory_bytes": "dev VM MemTotal ~24 GB",
    },
))


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"hardware={name!r} is not a known profile; choose one of {sorted(PROFILES)} "
            "or give the numbers in a configs/hardware/<name>.yaml"
        ) from None


def profiles_for_ranks(cfg: Any, n_ranks: int) -> list[HardwareProfile]:
    """One profile per rank from a ``hardware`` config node, a profile, or a name.

    ``cfg`` may be a profile name (``"h100"``), a :class:`HardwareProfile`, a list of names or
    profiles (one per rank), or a mapping shaped like ``configs/hardware/*.yaml``::

        hardware: {name: h100, peak_flops: ..., ..., per_rank: null | [h100, h100, rtx4090, t4]}

    With ``per_rank: null`` every rank gets the profile the mapping describes (command-line
    overrides such as ``hardware.idle_power_w=60`` apply). With a list, entry ``i`` names rank ``i``'s
    profile; an entry equal to ``name`` uses the mapping's (possibly overridden) numbers, any other
    entry is looked up in :data:`PROFILES`, and an entry may also be a mapping of full numbers.
    """
    if n_ranks < 1:
        raise ConfigError(f"n_ranks must be >= 1, got {n_ranks}")
    if isinstance(cfg, HardwareProfile):
        return [cfg] * n_ranks
    if isinstance(cfg, str):
        return [get_profile(cfg)] * n_ranks
    cfg = plain(cfg)
    if isinstance(cfg, Sequence):
        return _per_rank_list(list(cfg), n_ranks, base=None)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"hardware: expected a name, a mapping or a list, got {type(cfg).__name__}")
    if set(cfg) <= {"name", "per_rank"}:  # name only: take the registered numbers
        base = get_profile(cfg["name"])
    else:
        base = HardwareProfile.from_config(cfg)
    per_rank = cfg.get("per_rank")
    if per_rank is None:
        return [base] * n_ranks
    return _per_rank_list(list(plain(per_rank)), n_ranks, base=base)


def _per_rank_list(entries: list, n_ranks: int, base: HardwareProfile | None) -> list[HardwareProfile]:
    if len(entries) != n_ranks:
        raise ConfigError(
            f"hardware.per_rank has {len(entries)} entries but the run has {n_ranks} ranks; "
            "give one profile name per rank or set hardware.per_rank=null"
        )
    out = []
    for e in entries:
        if isinstance(e, HardwareProfile):
            out.append(e)
        elif isinstance(e, str):
            out.append(base if base is not None and e == base.name else get_profile(e))
        elif isinstance(e, Mapping):
            out.append(HardwareProfile.from_config(e))
        else:
            raise ConfigError(f"hardware.per_rank: cannot read entry {e!r}")
    return out


def with_overrides(profile: HardwareProfile, **changes: Any) -> HardwareProfile:
    """A copy with some numbers changed; their sources become "override"."""
    sources = dict(profile.sources)
    for k in changes:
        sources[k] = "override"
    return replace(profile, sources=sources, **changes)
