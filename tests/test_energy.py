"""Energy accounting: arithmetic, bubbles, network models, meter selection (no GPU / RAPL needed)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from lowbw.energy import (
    MEASURED, MODELLED, PROFILES, HardwareProfile, IntensityModel, Measurement, NullMeter, PowerModel,
    RaplMeter, ZeusMeter, account, account_timeline, get_profile, make_network_model, profiles_for_ranks,
    select_meter,
)
from lowbw.energy.account import timeline_usage, union_length
from lowbw.energy.meters import find_rapl_zones, rapl_source
from lowbw.errors import ConfigError
from lowbw.metrics.timeline import Event, Timeline

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# A profile with round numbers so the expected joules are obvious.
TOY = HardwareProfile(name="toy", peak_flops=1e12, mfu=0.5, busy_power_w=100.0, idle_power_w=10.0,
                      memory_bytes=10**9, sources={"all": "test numbers"})


def two_rank_timeline() -> Timeline:
    """Rank 0 busy 3 s of a 10 s span (one overlap that must count once), rank 1 busy 5 s; rank 0 sends
    1e6 bytes to rank 1 and rank 1 sends 5e5 back."""
    tl = Timeline("virtual", 2)
    tl.add(Event(0, "forward", 0.0, 2.0, 0))
    tl.add(Event(0, "encode", 1.5, 3.0, 0))  # overlaps the forward by 0.5 s
    tl.add(Event(0, "send", 3.0, 4.0, 0, nbytes=1_000_000, peer=1))
    tl.add(Event(1, "recv_wait", 0.0, 4.0, 0, peer=0))
    tl.add(Event(1, "forward", 4.0, 6.0, 0))
    tl.add(Event(1, "backward", 6.0, 9.0, 0))
    tl.add(Event(1, "send", 9.0, 10.0, 0, nbytes=500_000, peer=0))
    return tl


# ------------------------------------------------------------------------------------ arithmetic
def test_accounting_arithmetic_on_hand_built_timeline_gives_known_joules():
    tl = two_rank_timeline()
    rep = account_timeline(tl, TOY, network={"name": "intensity", "kwh_per_gb": 0.06}, tokens=1000)
    assert rep.span_s == pytest.approx(10.0)
    r0, r1 = rep.nodes
    assert (r0.busy_s, r0.idle_s) == pytest.approx((3.0, 7.0))
    assert (r1.busy_s, r1.idle_s) == pytest.approx((5.0, 5.0))
    assert r0.compute_j == pytest.approx(300.0) and r0.idle_j == pytest.approx(70.0)
    assert r1.compute_j == pytest.approx(500.0) and r1.idle_j == pytest.approx(50.0)
    jpb = 0.06 * 3.6e6 / 1e9  # 2.16e-4 J/B
    assert r0.network_j == pytest.approx(1_000_000 * jpb)  # charged to the sender
    assert r1.network_j == pytest.approx(500_000 * jpb)
    assert rep.network_j == pytest.approx(1_500_000 * jpb)
    expected = 300 + 70 + 500 + 50 + 1_500_000 * jpb
    assert rep.total_j == pytest.approx(expected)
    assert rep.j_per_token == pytest.approx(expected / 1000)
    assert rep.idle_fraction == pytest.approx(12 / 20)
    assert set(rep.source.values()) == {MODELLED} and rep.label == MODELLED
    assert rep.measured_j is None
    d = json.loads(json.dumps(rep.to_dict()))  # JSON-ready for summary.json
    assert d["total_j"] == pytest.approx(expected) and d["label"] == MODELLED
    assert "modelled" in rep.summary() and "measured: none" in rep.summary()
    assert rep.scalars()["energy/total_j_modelled"] == pytest.approx(expected)
    assert not any(k.endswith("_measured") for k in rep.scalars())


def test_account_from_plain_numbers_matches_account_timeline():
    tl = two_rank_timeline()
    u = timeline_usage(tl)
    assert u.busy_s == pytest.approx([3.0, 5.0])
    assert u.link_bytes == {(0, 1): 1_000_000, (1, 0): 500_000}
    assert u.link_busy_s == {(0, 1): pytest.approx(2.0)}
    a = account([3.0, 5.0], 10.0, "h100", "intensity", 1000, link_bytes=u.link_bytes)
    b = account_timeline(tl, "h100", "intensity", 1000)
    assert a.total_j == pytest.approx(b.total_j)
    h = PROFILES["h100"]
    assert a.device_j == pytest.approx(h.busy_power_w * 8 + h.idle_power_w * 12)


def test_explicit_span_charges_setup_and_tail_as_idle():
    rep = account_timeline(two_rank_timeline(), TOY, tokens=1, span=(-2.0, 12.0))
    assert rep.span_s == pytest.approx(14.0)
    assert rep.nodes[0].idle_s == pytest.approx(11.0)


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
def gpipe_timeline(p: int, m: int, t_f: float = 1.0, t_b: float = 2.0, nbytes: int = 0) -> Timeline:
    """GPipe in the virtual clock with fixed durations: all forwards, then all backwards (flush)."""
    tl = Timeline("virtual", p)
    f_end = np.zeros((p, m))
    for s in range(p):
        for j in range(m):
            start = max(f_end[s - 1, j] if s else 0.0, f_end[s, j - 1] if j else 0.0)
            f_end[s, j] = start + t_f
            tl.add(Event(s, "forward", start, f_end[s, j], 0, label=f"{j}F{s}"))
            if s + 1 < p and nbytes:
                tl.add(Event(s, "send", f_end[s, j], f_end[s, j], 0, nbytes=nbytes, peer=s + 1))
    b_end = np.zeros((p, m))
    for s in reversed(range(p)):
        for j in range(m):
            start = max(b_end[s + 1, j] if s + 1 < p else 0.0, b_end[s, j - 1] if j else 0.0, f_end[s, m - 1])
            b_end[s, j] = start + t_b
            tl.add(Event(s, "backward", start, b_end[s, j], 0, label=f"{j}B{s}"))
    return tl


@pytest.mark.parametrize("p", [2, 4])
def test_gpipe_idle_fraction_matches_bubble_formula(p):
    for m in (1, 2, 16):
        rep = account_timeline(gpipe_timeline(p, m), TOY, tokens=m * 128)
        assert rep.span_s == pytest.approx((m + p - 1) * 3.0)
        assert rep.idle_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p", [2, 4, 8])
def test_idle_energy_grows_with_bubble_by_the_formula_ratio(p):
    tokens_per_mb = 1024

    def idle_j_per_token(m):
        rep = account_timeline(gpipe_timeline(p, m), "h100", tokens=m * tokens_per_mb)
        return rep.idle_j / rep.tokens, rep.compute_j / rep.tokens

    def predicted(m):  # idle fraction x span per token; span = (m + p - 1)(t_f + t_b)
        return (p - 1) / (m + p - 1) * (m + p - 1) / m

    few, compute_few = idle_j_per_token(2)
    many, compute_many = idle_j_per_token(16)
    assert few > many
    assert few / many == pytest.approx(predicted(2) / predicted(16))  # = 8 for any p
    assert compute_few == pytest.approx(compute_many)  # busy energy per token does not depend on m


# --------------------------------------------------------------------------------------- network
def test_network_energy_is_proportional_to_bytes_under_intensity_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 128, 256)).astype(np.float32)  # an activation, float32 on the wire
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    q = np.round(x / scale).astype(np.int8)  # int8 payload + one float32 scale per row
    fp32_bytes = x.nbytes
    int8_bytes = q.nbytes + scale.astype(np.float32).nbytes
    p = 4
    rep32 = account_timeline(gpipe_timeline(p, 8, nbytes=fp32_bytes), TOY, "intensity", tokens=8 * 128)
    rep8 = account_timeline(gpipe_timeline(p, 8, nbytes=int8_bytes), TOY, "intensity", tokens=8 * 128)
    assert rep32.network_j == pytest.approx(3 * 8 * fp32_bytes * 0.06 * 3.6e-3)
    assert rep8.network_j / rep32.network_j == pytest.approx(int8_bytes / fp32_bytes)
    assert rep8.network_j / rep32.network_j == pytest.approx(0.25, abs=0.01)
    assert rep8.device_j == pytest.approx(rep32.device_j)  # same timeline, only bytes differ


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
    busy = PowerModel(mode="busy").energy(links, span, {(1, 0): 5.0})
    assert busy[0].fixed_j == pytest.approx(42.0 * 5.0)
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
