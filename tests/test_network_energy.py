"""Network energy that depends on the network: each preset's link class (net.energy), and the ordering
it gives between presets, with the term that moved visible in the breakdown."""

import glob
import os

import pytest
import yaml

from lowbw.energy import IntensityModel, LinkClassModel, account, make_network_model
from lowbw.errors import ConfigError
from lowbw.simulate import compose as sim_compose
from lowbw.simulate import simulate
from lowbw.train import compose as train_compose
from lowbw.train import run

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
NET_PRESETS = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(CONFIGS, "net", "*.yaml")))


def preset_energy(name: str) -> dict:
    with open(os.path.join(CONFIGS, "net", f"{name}.yaml")) as f:
        return yaml.safe_load(f)["energy"]


# --------------------------------------------------------------------------------------- presets
def test_every_net_preset_carries_its_link_class_energy_with_a_source_for_each_number():
    assert set(NET_PRESETS) >= {"ideal", "datacenter", "lan", "metro", "home", "transatlantic", "global", "random"}
    for name in NET_PRESETS:
        e = preset_energy(name)
        assert e["link_class"], name
        for key in ("access_power_w", "j_per_bit"):
            assert isinstance(e[key], float) and e[key] >= 0, (name, key)
            assert len(e["sources"].get(key, "")) > 20, f"{name}: net.energy.{key} has no source"
    # a datacenter fabric is priced per bit in the pJ range; home broadband holds its line for the run
    assert preset_energy("datacenter")["access_power_w"] == 0 and 1e-11 < preset_energy("datacenter")["j_per_bit"] < 1e-9
    assert preset_energy("home")["access_power_w"] > 0
    assert preset_energy("ideal") | {"sources": {}} == {"link_class": "ideal", "access_power_w": 0.0, "j_per_bit": 0.0,
                                                       "sources": {}}


@pytest.mark.parametrize("net", ["home", "datacenter", "transatlantic"])
def test_the_default_network_model_is_the_selected_presets_link_class(net):
    for compose in (train_compose, sim_compose):
        cfg = compose([f"net={net}"])
        model = make_network_model(cfg.energy)
        want = preset_energy(net)
        assert isinstance(model, LinkClassModel) and model.link_class == want["link_class"]
        assert model.node_power_w() == want["access_power_w"] and model.j_per_bit == want["j_per_bit"]
    # the preset's numbers are changed where they live, in net.energy
    cfg = train_compose([f"net={net}", "net.energy.access_power_w=4.5"])
    assert make_network_model(cfg.energy).node_power_w() == 4.5


def test_intensity_model_remains_selectable_and_states_its_year():
    model = make_network_model(train_compose(["net=home", "energy=intensity"]).energy)
    assert isinstance(model, IntensityModel)
    assert model.describe()["params"]["year"] == 2015 and model.describe()["params"]["kwh_per_gb"] == 0.06
    assert make_network_model(train_compose(["energy=eu2020"]).energy).describe()["params"]["year"] == 2020


def test_link_class_without_the_presets_numbers_or_with_negative_ones_is_rejected():
    with pytest.raises(ConfigError, match="net.energy"):
        make_network_model("link_class")
    with pytest.raises(ConfigError, match="net.energy.j_per_bit"):
        LinkClassModel(access_power_w=1.0, j_per_bit=-1e-9)
    from lowbw.validation import validate

    with pytest.raises(ConfigError, match="net.energy.access_power_w"):
        validate(train_compose(["net=home", "net.energy.access_power_w=-3"]))


# ------------------------------------------------------------------------------------ arithmetic
def test_access_power_is_charged_once_per_node_that_exchanged_bytes_whatever_its_links():
    # a 4-stage pipeline: ranks 1 and 2 sit on two links, ranks 0 and 3 on one; rank 4 sends nothing
    links = {(0, 1): 10**6, (1, 0): 10**6, (1, 2): 10**6, (2, 1): 10**6, (2, 3): 10**6, (3, 2): 10**6}
    span = 50.0
    model = LinkClassModel(access_power_w=18.0, j_per_bit=7e-8, link_class="home")
    rep = account([1.0] * 5, span, "cpu_local", model, tokens=100, link_bytes=links)
    assert rep.network_fixed_j == pytest.approx(4 * 18.0 * span)  # 4 active nodes, not 3 links x 2 ends
    assert rep.network_per_bit_j == pytest.approx(6e6 * 8 * 7e-8)
    for r in range(4):  # each node: its own equipment for the span + the bits it sent
        sent = sum(n for (src, _), n in links.items() if src == r)
        assert rep.nodes[r].network_j == pytest.approx(18.0 * span + sent * 8 * 7e-8)
    assert rep.nodes[4].network_j == 0.0
    d = rep.to_dict()
    assert d["network_j"] == pytest.approx(d["network_fixed_j"] + d["network_per_bit_j"])
    assert "fixed (equipment powered for the run)" in rep.summary()


def test_on_the_same_timeline_home_costs_more_than_datacenter_through_access_power():
    # identical busy time, span and bytes: only the link class differs
    busy, span, links = [2.0, 2.0, 2.0, 2.0], 10.0, {(0, 1): 10**7, (1, 2): 10**7, (2, 3): 10**7}
    bits = 3 * 8 * 10**7
    rep = {net: account(busy, span, "cpu_local", train_compose([f"net={net}"]).energy, tokens=1000, link_bytes=links)
           for net in ("home", "datacenter")}
    home, dc = rep["home"], rep["datacenter"]
    assert home.compute_j == dc.compute_j and home.idle_j == dc.idle_j  # the devices did the same
    assert home.j_per_token > dc.j_per_token
    assert home.network_fixed_j == pytest.approx(4 * 18.0 * span) and dc.network_fixed_j == 0.0
    assert home.network_per_bit_j == pytest.approx(bits * 7e-8)
    assert dc.network_per_bit_j == pytest.approx(bits * 3.3e-10)
    assert home.network_fixed_j > 10 * home.network_per_bit_j  # the line held for the run, not the bytes


# ----------------------------------------------------------------------------- the ordering, run
def _breakdown(s: dict) -> dict:
    e = s["energy"]
    return {k: e[k] for k in ("j_per_token", "compute_j", "idle_j", "network_j", "network_fixed_j",
                              "network_per_bit_j", "span_s", "tokens")}


def _assert_home_above_datacenter_for_the_right_reason(home: dict, dc: dict, stages: int) -> None:
    assert home["j_per_token"] > dc["j_per_token"]
    assert home["compute_j"] == pytest.approx(dc["compute_j"], rel=1e-9)  # FLOP-based durations: same compute
    # which terms moved: idle (the slower link stretches the run) and the access equipment held for it
    assert home["span_s"] > 5 * dc["span_s"] and home["idle_j"] > dc["idle_j"]
    assert dc["network_fixed_j"] == 0.0
    assert home["network_fixed_j"] == pytest.approx(stages * 18.0 * home["span_s"], rel=1e-9)
    assert home["network_per_bit_j"] / dc["network_per_bit_j"] == pytest.approx(7e-8 / 3.3e-10, rel=1e-9)
    moved = {k: home[k] - dc[k] for k in ("idle_j", "network_fixed_j", "network_per_bit_j")}
    total = (home["j_per_token"] - dc["j_per_token"]) * home["tokens"]
    assert sum(moved.values()) == pytest.approx(total, rel=1e-9)  # the breakdown accounts for all of it
    assert moved["network_fixed_j"] > moved["network_per_bit_j"]  # time held, not bytes, is the network cost


def test_simulated_datacenter_to_home_moves_j_per_token_up_through_idle_and_access_power():
    base = ["model=tiny", "hardware=cpu_local", "pipeline.stages=4", "pipeline.microbatches=4", "sim.steps=3",
            "sim.picture_steps=0"]
    runs = {net: _breakdown(simulate(sim_compose(base + [f"net={net}"]))) for net in ("home", "datacenter")}
    _assert_home_above_datacenter_for_the_right_reason(runs["home"], runs["datacenter"], stages=4)
    # the 2015 intensity figure prices the two links the same: the network term could not tell them apart
    flat = {net: simulate(sim_compose(base + [f"net={net}", "energy=intensity"]))["energy"]["network_j"]
            for net in ("home", "datacenter")}
    assert flat["home"] == pytest.approx(flat["datacenter"], rel=1e-12)


def test_training_runs_on_datacenter_and_home_order_j_per_token_with_the_reason_in_summary(tmp_path):
    base = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
            "clock=virtual", "clock.durations=flops", "train.steps=2", "train.eval_batches=1", "progress=false"]
    runs = {net: _breakdown(run(train_compose(base + [f"net={net}"]), tmp_path / net)) for net in ("home", "datacenter")}
    _assert_home_above_datacenter_for_the_right_reason(runs["home"], runs["datacenter"], stages=2)
