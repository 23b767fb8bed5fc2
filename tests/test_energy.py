"""Energy accounting: arithmetic, bubbles, network models, meter selection (no GPU / RAPL needed).

The timelines accounted here are the program's own: schedules from ``build_schedule`` played by the
player (``lowbw.pipeline.player.play``) with planned durations, message sizes and link models, as
lowbw-simulate plays them -- sends are instants on the sender, the time on the link is the receiver's
``recv_wait``. The expected joules are derived from the schedule and the link formula by hand."""

from __future__ import annotations

import glob
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from lowbw.energy import (
    MEASURED, MODELLED, PROFILES, HardwareProfile, IntensityModel, Measurement, NullMeter, PowerModel,
    RaplMeter, ZeusMeter, account, account_timeline, get_profile, make_network_model, profiles_for_ranks,
    select_meter,
)
from lowbw.energy.account import timeline_usage, union_length
from lowbw.compress import build_codec
from lowbw.config import NetConfig
from lowbw.energy.meters import find_rapl_zones, rapl_source
from lowbw.errors import ConfigError
from lowbw.metrics.timeline import Timeline
from lowbw.net.link import LinkModel
from lowbw.net.topology import Topology
from lowbw.pipeline.actions import Kind
from lowbw.pipeline.durations import action_seconds
from lowbw.pipeline.schedules import build_schedule
from lowbw.pipeline.player import play

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# A profile with round numbers so the expected joules are obvious.
TOY = HardwareProfile(name="toy", peak_flops=1e12, mfu=0.5, busy_power_w=100.0, idle_power_w=10.0,
                      memory_bytes=10**9, sources={"all": "test numbers"})
JOULES_PER_BYTE = 0.06 * 3.6e6 / 1e9  # the intensity model's default: 0.06 kWh/GB = 2.16e-4 J/B

IDEAL = NetConfig(name="ideal", latency_ms=0.0, uplink_mbps=math.inf, downlink_mbps=math.inf)
# 100 ms one way; 8 Mbit/s up puts 1 MB on the wire in exactly 1 s; a downlink 10x faster never queues
SLOW = NetConfig(name="slow", latency_ms=100.0, uplink_mbps=8.0, downlink_mbps=80.0)


def played(name: str, p: int, m: int, net: NetConfig = IDEAL, forward_s: float = 1.0, backward_s: float = 2.0,
           fwd_bytes: int = 0, bwd_bytes: int = 0, steps: int = 1) -> Timeline:
    """What lowbw-simulate plays: the registered schedule, each step through the player with planned
    durations, fixed message sizes per direction and one LinkModel per rank carried from step to step."""
    sched = build_schedule(SimpleNamespace(name=name, csv=None), p, m)
    topo = Topology.from_config(net, p)
    links = {r: LinkModel(topo, r) for r in range(p)}
    size = {Kind.SEND_F: fwd_bytes, Kind.SEND_B: bwd_bytes}
    tl = Timeline("virtual", p)
    start = {r: 0.0 for r in range(p)}
    for step in range(steps):
        play(sched, lambda r, a: action_seconds(a.kind, forward_s, backward_s), lambda a: size[a.kind], links,
             start, step, tl)
        start = {r: max(e.end for e in tl.events if e.rank == r) for r in range(p)}
    return tl


def two_rank_step(t_f: float = 2.0, t_b: float = 3.0, fwd: int = 1_000_000, bwd: int = 500_000) -> Timeline:
    """GPipe, 2 stages, 1 microbatch over SLOW links: rank 0 sends ``fwd`` bytes of activations, rank 1
    sends ``bwd`` bytes of gradients back."""
    return played("gpipe", 2, 1, SLOW, t_f, t_b, fwd, bwd)


def two_rank_span(t_f: float = 2.0, t_b: float = 3.0, fwd: int = 1_000_000, bwd: int = 500_000) -> float:
    """The step by hand: F on rank 0, the activations cross (8 b / uplink + latency), F and B on rank 1,
    the gradients cross back, B on rank 0; the downlink is fast enough to add nothing."""
    up, lat = SLOW.uplink_mbps * 1e6, SLOW.latency_ms / 1e3
    return t_f + (8 * fwd / up + lat) + t_f + t_b + (8 * bwd / up + lat) + t_b


# ------------------------------------------------------------------------------------ arithmetic
def test_accounting_a_played_step_gives_the_joules_of_its_arithmetic():
    t_f, t_b = 2.0, 3.0
    tl = two_rank_step(t_f, t_b)
    # what the player records: sends are instants on the sender, the link's time is the receiver's wait
    assert all(e.duration == 0 for e in tl.events if e.kind == "send")
    assert max(e.duration for e in tl.events if e.kind == "recv_wait") > 0
    rep = account_timeline(tl, TOY, network={"name": "intensity", "kwh_per_gb": 0.06}, tokens=1000)
    span, busy = two_rank_span(t_f, t_b), t_f + t_b
    assert rep.span_s == pytest.approx(span)
    for node in rep.nodes:
        assert (node.busy_s, node.idle_s) == pytest.approx((busy, span - busy))
        assert node.compute_j == pytest.approx(100.0 * busy) and node.idle_j == pytest.approx(10.0 * (span - busy))
    r0, r1 = rep.nodes
    assert r0.network_j == pytest.approx(1_000_000 * JOULES_PER_BYTE)  # charged to the sender
    assert r1.network_j == pytest.approx(500_000 * JOULES_PER_BYTE)
    assert rep.network_j == pytest.approx(1_500_000 * JOULES_PER_BYTE)
    expected = 2 * (100.0 * busy + 10.0 * (span - busy)) + 1_500_000 * JOULES_PER_BYTE
    assert rep.total_j == pytest.approx(expected)
    assert rep.j_per_token == pytest.approx(expected / 1000)
    assert rep.idle_fraction == pytest.approx((span - busy) / span)
    assert set(rep.source.values()) == {MODELLED} and rep.label == MODELLED
    assert rep.measured_j is None
    d = json.loads(json.dumps(rep.to_dict()))  # JSON-ready for summary.json
    assert d["total_j"] == pytest.approx(expected) and d["label"] == MODELLED
    assert "modelled" in rep.summary() and "measured: none" in rep.summary()
    assert rep.scalars()["energy/total_j_modelled"] == pytest.approx(expected)
    assert not any(k.endswith("_measured") for k in rep.scalars())


def test_account_from_plain_numbers_matches_account_timeline():
    tl = two_rank_step()
    span, busy = two_rank_span(), 5.0
    u = timeline_usage(tl)
    assert u.busy_s == pytest.approx([busy, busy])
    assert u.link_bytes == {(0, 1): 1_000_000, (1, 0): 500_000}
    a = account([busy, busy], span, "h100", "intensity", 1000, link_bytes=u.link_bytes)
    b = account_timeline(tl, "h100", "intensity", 1000)
    assert a.total_j == pytest.approx(b.total_j)
    h = PROFILES["h100"]
    assert a.device_j == pytest.approx(h.busy_power_w * 2 * busy + h.idle_power_w * 2 * (span - busy))


def test_explicit_span_charges_setup_and_tail_as_idle():
    span = two_rank_span()
    rep = account_timeline(two_rank_step(), TOY, tokens=1, span=(-2.0, span + 1.0))
    assert rep.span_s == pytest.approx(span + 3.0)
    assert rep.nodes[0].idle_s == pytest.approx(span + 3.0 - 5.0)


def test_power_model_busy_mode_is_refused_rather_than_charging_nothing():
    # sends are instants on the played timeline: a busy mode would find no wire time and charge 0 s
    tl = two_rank_step()
    assert all(e.duration == 0 for e in tl.events if e.kind == "send")
    with pytest.raises(ConfigError, match="energy.power.mode=busy is not available: lowbw records a send as an instant"):
        PowerModel(mode="busy", capacity_mbps=None, marginal_j_per_bit=0.0)
    with pytest.raises(ConfigError, match="energy.power.mode=busy"):
        make_network_model({"network": "power", "power": {"mode": "busy"}})


def test_heterogeneous_nodes_use_their_own_powers():
    rep = account([1.0, 1.0, 1.0], 2.0, {"name": "h100", "per_rank": ["h100", "rtx4090", "t4"]}, tokens=10)
    assert [n.hardware for n in rep.nodes] == ["h100", "rtx4090", "t4"]
    assert rep.nodes[1].compute_j == pytest.approx(450.0) and rep.nodes[2].idle_j == pytest.approx(10.0)
    with pytest.raises(ConfigError, match="per_rank"):
        profiles_for_ranks({"name": "h100", "per_rank": ["h100"]}, 3)


def test_busy_longer_than_span_is_rejected():
    with pytest.raises(ValueError, match="busy"):
        account([11.0], 10.0, TOY)


def test_union_length_counts_overlaps_once():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert union_length([(0, 2), (1, 3)], lo=1.5, hi=2.5) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- bubbles
def bubble(p: int, m: int) -> float:
    """GPipe's and 1F1B's idle fraction with equal stage times and free links (Huang et al. 2019;
    Narayanan et al. 2021): (p - 1) / (m + p - 1)."""
    return (p - 1) / (m + p - 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 4])
def test_idle_fraction_of_a_played_schedule_matches_the_bubble_formula(name, p):
    for m in (1, 2, 16):
        rep = account_timeline(played(name, p, m), TOY, tokens=m * 128)
        assert rep.span_s == pytest.approx((m + p - 1) * (1.0 + 2.0))
        assert rep.idle_fraction == pytest.approx(bubble(p, m))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 4, 8])
def test_idle_energy_grows_with_bubble_by_the_formula_ratio(name, p):
    tokens_per_mb = 1024

    def per_token(m):
        rep = account_timeline(played(name, p, m), "h100", tokens=m * tokens_per_mb)
        return rep.idle_j / rep.tokens, rep.compute_j / rep.tokens

    def predicted(m):  # idle fraction x span per token; span = (m + p - 1)(t_f + t_b)
        return bubble(p, m) * (m + p - 1) / m

    few, compute_few = per_token(2)
    many, compute_many = per_token(16)
    assert few > many
    assert few / many == pytest.approx(predicted(2) / predicted(16))  # = 8 for any p
    assert compute_few == pytest.approx(compute_many)  # busy energy per token does not depend on m


# --------------------------------------------------------------------------------------- network
def test_network_energy_is_proportional_to_the_bytes_the_codecs_put_on_the_wire():
    x = torch.randn(8, 128, 256, generator=torch.Generator().manual_seed(0))  # one microbatch's activation
    wire = {name: build_codec(name).encode(x).numel() for name in ("none", "int8")}
    p, m = 4, 8
    messages = 2 * (p - 1) * m  # every boundary, every microbatch, activations forward and gradients back

    def run(codec, net):
        tl = played("1f1b", p, m, net, 0.05, 0.1, wire[codec], wire[codec], steps=2)
        return account_timeline(tl, TOY, "intensity", tokens=2 * m * 128)

    full, int8 = run("none", IDEAL), run("int8", IDEAL)
    assert full.network_j == pytest.approx(2 * messages * wire["none"] * JOULES_PER_BYTE)
    assert int8.network_j / full.network_j == pytest.approx(wire["int8"] / wire["none"])
    assert int8.device_j == pytest.approx(full.device_j)  # free links: the same timeline, only bytes differ
    # on slow links fewer bytes also shorten the waits: the same compute, less idle energy
    full, int8 = run("none", SLOW), run("int8", SLOW)
    assert int8.network_j / full.network_j == pytest.approx(wire["int8"] / wire["none"])
    assert int8.compute_j == pytest.approx(full.compute_j)
    assert int8.span_s < full.span_s and int8.idle_j < full.idle_j


def test_published_example_2kb_per_token_is_044_joules_under_intensity():
    m = IntensityModel()  # 0.06 kWh/GB (2015)
    assert m.bytes_energy_j(2048) == pytest.approx(0.44, abs=0.005)
    assert IntensityModel(at_year=2025).effective_kwh_per_gb() == pytest.approx(0.06 / 32)


def test_power_model_charges_fixed_power_per_active_link_plus_marginal_bits():
    links = {(0, 1): 10**9, (1, 0): 10**9, (1, 2): 0}  # (1, 2) carried nothing: not active
    span = 100.0
    pm = PowerModel(link_power_w=36.0, capacity_w_per_mbps=0.06, capacity_mbps=100.0, marginal_j_per_bit=2e-8)
    (lk,) = pm.energy(links, span)
    assert lk.fixed_j == pytest.approx(42.0 * span)
    assert lk.marginal_j == pytest.approx(2 * 8e9 * 2e-8)
    assert lk.per_rank_j[0] == pytest.approx(42.0 * span / 2 + 8e9 * 2e-8)
    # twice the bytes: intensity doubles, power model barely moves (the models disagree)
    double = {k: 2 * v for k, v in links.items()}
    im = IntensityModel()
    ratio_i = sum(x.total_j for x in im.energy(double, span)) / sum(x.total_j for x in im.energy(links, span))
    ratio_p = sum(x.total_j for x in pm.energy(double, span)) / sum(x.total_j for x in pm.energy(links, span))
    assert ratio_i == pytest.approx(2.0)
    assert 1.0 < ratio_p < 1.1


def test_network_model_selection_by_name_and_config():
    assert isinstance(make_network_model("power"), PowerModel)
    energy_cfg = {"network": "power", "power": {"link_power_w": 5.0, "capacity_mbps": None}, "intensity": {}}
    m = make_network_model(energy_cfg)
    assert m.link_power_w() == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="intensity"):
        make_network_model("nope")
    with pytest.raises(ConfigError):
        make_network_model({"name": "power", "watts": 3})


# ------------------------------------------------------------------------------------- profiles
def test_hardware_yaml_files_match_builtin_profiles_and_cite_every_number():
    yaml = pytest.importorskip("yaml")
    files = sorted(glob.glob(os.path.join(CONFIGS, "hardware", "*.yaml")))
    assert {os.path.basename(f)[:-5] for f in files} >= {"h100", "a100", "rtx4090", "t4", "cpu_local"}
    for f in files:
        text = open(f).read()
        assert text.startswith("# @package hardware")
        prof = HardwareProfile.from_config(yaml.safe_load(text))
        assert prof == get_profile(prof.name)
        for key in ("peak_flops", "mfu", "busy_power_w", "idle_power_w", "memory_bytes"):
            assert prof.sources.get(key), f"{f}: {key} has no source"
    h = get_profile("h100")
    assert h.compute_seconds(h.effective_flops) == pytest.approx(1.0)


def test_overridden_number_loses_its_datasheet_source():
    cfg = dict(PROFILES["h100"].to_dict(), idle_power_w=60.0)
    prof = HardwareProfile.from_config(cfg)
    assert prof.idle_power_w == 60.0 and prof.sources["idle_power_w"].startswith("override")
    with pytest.raises(ConfigError, match="known profile"):
        get_profile("h200x")


# ---------------------------------------------------------------------------------------- meters
class FakeZeusMonitor:
    """Stands in for zeus.monitor.ZeusMonitor backed by NVML: a fixed energy per window."""

    def __init__(self, joules_per_window: float, gpu_index: int = 0):
        self.j, self.idx, self.open = joules_per_window, gpu_index, set()

    def begin_window(self, key, sync_execution=True):
        self.open.add(key)

    def end_window(self, key, sync_execution=True):
        self.open.remove(key)

        class M:
            gpu_energy = {self.idx: self.j}
        return M()


def fake_rapl(root, energy_uj: int, max_uj: int = 1_000_000_000):
    z = root / "intel-rapl:0"
    z.mkdir(parents=True)
    (z / "name").write_text("package-0\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    sub = root / "intel-rapl:0:0"  # a sub-zone: must not be counted again
    sub.mkdir()
    (sub / "energy_uj").write_text("0\n")
    (sub / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z / "energy_uj"


def test_meter_selection_without_gpu_or_rapl_is_modelled(tmp_path):
    sources = {"zeus": lambda dev: None, "rapl": lambda dev: rapl_source(dev, root=str(tmp_path))}
    for device in ("cpu", "cuda:0"):
        m = select_meter(device, sources=sources)
        assert isinstance(m, NullMeter) and m.source == MODELLED
        m.begin()
        assert m.end() is None
        assert m.measurement().source == MODELLED
    # the default sources on a machine like this one (no NVIDIA GPU, no readable RAPL) behave the same
    if not find_rapl_zones():
        assert select_meter("cpu").source == MODELLED
    # a run with nothing measured labels everything modelled, even if a null meter's reading is passed
    rep = account([1.0], 2.0, TOY, tokens=1, measured=[m.measurement()])
    assert rep.label == MODELLED and rep.measured_j is None and rep.nodes[0].meter == "none"


def test_meter_selection_reads_injected_fake_nvml_and_labels_measured():
    fake = FakeZeusMonitor(123.5, gpu_index=1)
    sources = {"zeus": lambda dev: ZeusMeter(1, monitor=fake) if dev.startswith("cuda") else None,
               "rapl": lambda dev: None}
    m = select_meter("cuda:1", sources=sources)
    assert isinstance(m, ZeusMeter) and m.source == MEASURED
    m.begin()
    assert m.end() == pytest.approx(123.5)
    reading = m.measurement()
    assert reading.source == MEASURED and reading.meter == "zeus"
    rep = account([1.0], 2.0, "h100", tokens=100, measured=[reading])
    assert rep.label == MEASURED and rep.measured_j == pytest.approx(123.5)
    assert rep.source["measured_j"] == MEASURED and rep.source["total_j"] == MODELLED
    assert rep.measured_j_per_token == pytest.approx(1.235)
    assert rep.scalars()["energy/device_j_measured"] == pytest.approx(123.5)
    assert "123.5 J (measured" in rep.summary()
    assert select_meter("cpu", sources=sources).source == MODELLED  # no NVML for a CPU device


def test_meter_selection_reads_injected_fake_rapl_with_wraparound(tmp_path):
    counter = fake_rapl(tmp_path, energy_uj=900_000_000, max_uj=1_000_000_000)
    m = select_meter("cpu", sources={"rapl": lambda dev: rapl_source(dev, root=str(tmp_path))})
    assert isinstance(m, RaplMeter) and m.source == MEASURED and len(m.zones) == 1
    m.begin()
    counter.write_text("950000000\n")  # +50 J
    m.poll()
    counter.write_text("20000000\n")  # wrapped: +50 J to the top, +20 J after
    assert m.end() == pytest.approx(120.0)
    assert m.measurement().source == MEASURED and m.measurement().meter == "rapl"


def test_ranks_sharing_one_counter_are_counted_once():
    a = Measurement(50.0, 1.0, "rapl", "rapl:package-0@host")
    b = Measurement(52.0, 1.0, "rapl", "rapl:package-0@host")
    rep = account([0.5, 0.5], 1.0, TOY, tokens=1, measured=[a, b])
    assert rep.measured_j == pytest.approx(52.0)
    partial = account([0.5, 0.5], 1.0, TOY, tokens=1, measured={0: a})
    assert partial.measured_j is None and partial.label == MODELLED and partial.nodes[0].measured_j == 50.0


def test_demanding_an_unavailable_meter_says_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigError, match="energy.meter=auto"):
        select_meter("cpu", meter="rapl", sources={"rapl": lambda dev: rapl_source(dev, root=str(tmp_path))})
    try:
        import zeus  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install"):
            select_meter("cuda:0", meter="zeus")
    assert select_meter("cpu", meter="none").source == MODELLED
