"""Sweeps and their report: a small real sweep (with a failing cell), resume, the report's pieces, and its figures
inspected as figure objects (series, legends, axes, labels)."""

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest

from lowbw.report import KEYS, PLOTS, collect_runs, pareto_front, write_report
from lowbw.report.collect import rank_by_target

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "pipeline.stages=2",
        "train.steps=2", "train.eval_batches=1", "clock=virtual", "progress=false", "net=lan",
        "train.warmup_steps=0"]  # summary energy then covers every step, as the loss-vs-joules curves do
# 2 bandwidths x 2 codecs complete; bandwidth 0 is invalid, so its two cells fail (in validation, quickly).
GRID = ["net.uplink_mbps=0,10,1000", "compress/fwd=none,int8"]
JOBLIB = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
LAUNCHER = ["hydra/launcher=lowbw_joblib"] if JOBLIB else []
# Always empty for these runs: nothing is metered on this machine, completed runs have no error, and no run
# has a target loss.
EMPTY_OK = {"measured_j_per_token", "error", "target_loss", "target_reached", "target_step", "target_tokens",
            "target_time_s", "target_wall_s", "target_energy_j", "target_time_interp_s", "target_energy_interp_j",
            "best_val_loss"}
# Codec time on the clock: none under the sweep's planned durations (they charge codec work 0 s), so blank
CODEC_TIME = {"fwd_encode_ms", "fwd_decode_ms", "bwd_encode_ms", "bwd_decode_ms"}


def sweep(sweep_dir, launcher=LAUNCHER):
    return subprocess.run([sys.executable, "-m", "lowbw.train", "-m", *launcher, f"hydra.sweep.dir={sweep_dir}",
                           *TINY, *GRID], capture_output=True, text=True, timeout=600, cwd=sweep_dir.parent)


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "s"
    out = sweep(d)
    return d, out


def test_sweep_with_a_failing_cell_completes_the_others_and_reports_every_column_and_plot(swept):
    d, out = swept
    assert out.returncode == 0, out.stderr[-3000:]  # a failed run does not stop (or fail) the sweep
    s = summaries(d)
    assert len(s) == 6
    assert sorted(x["status"] for x in s.values()) == ["completed"] * 4 + ["failed"] * 2

    rep = subprocess.run([sys.executable, "-m", "lowbw.report", str(d)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    with open(d / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == KEYS and len(rows) == 6
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == 4 and len(failed) == 2
    for r in done:
        missing = [k for k in KEYS if r[k] == "" and k not in EMPTY_OK | CODEC_TIME]
        assert not missing, (r["run"], missing)
        assert all(r[k] == "" for k in CODEC_TIME), r  # not a cost of 0
        assert r["clock"] == "virtual" and r["network"] == "lan" and r["schedule"] == "1f1b"
        assert r["energy_source"] in ("modelled", "measured")
        assert float(r["tokens_per_s"]) > 0 and float(r["bytes_per_token"]) > 0
    assert sorted(float(r["bandwidth_mbps"]) for r in done) == [10.0, 10.0, 1000.0, 1000.0]
    assert sorted(r["codec"] for r in done) == ["int8/none", "int8/none", "none/none", "none/none"]
    for r in done:  # each pairs with the uncompressed run at the same bandwidth
        twin = next(b for b in done if b["run"] == r["baseline_run"])
        assert twin["codec"] == "none/none" and twin["bandwidth_mbps"] == r["bandwidth_mbps"]
        if r["codec"] == "none/none":
            assert float(r["val_loss_gap"]) == 0.0
    int8 = [r for r in done if r["codec_fwd"] == "int8"]
    assert all(float(r["bytes_per_token"]) < float(next(b for b in done if b["run"] == r["baseline_run"])
                                                    ["bytes_per_token"]) for r in int8)
    assert all(float(r["fwd_ratio"]) > 2 for r in int8)
    for r in failed:
        assert r["error"].startswith("net.uplink_mbps=0.0 must be a number in")  # the sentence, no type name
        assert r["codec_fwd"] in ("none", "int8") and r["tokens_per_s"] == ""

    for name in PLOTS.values():
        png = d / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-", name  # the vector copy for a paper
    md = (d / "report.md").read_text()
    assert "4 completed, 2 failed" in md and "uplink_mbps" in md
    assert "Encode and decode times are blank for runs whose clock charges codec work 0 s" in md
    assert all(f"]({name})" in md for name in PLOTS.values())


def test_rerun_into_the_same_sweep_dir_completes_only_the_missing_runs(swept, tmp_path):
    d0, out = swept
    assert out.returncode == 0
    d = tmp_path / "s"
    shutil.copytree(d0, d)
    done = {k: v for k, v in summaries(d).items() if v["status"] == "completed"}
    victim = sorted(done)[-1]
    (d / victim / "summary.json").unlink()  # as if the sweep had been interrupted during this run
    kept = {k: (d / k / "summary.json").stat().st_mtime_ns for k in done if k != victim}

    again = sweep(d, launcher=[])  # Hydra's basic launcher (in-process): resume does not depend on the launcher
    assert again.returncode == 0, again.stderr[-3000:]
    after = summaries(d)
    assert after[victim]["status"] == "completed"
    assert {k: (d / k / "summary.json").stat().st_mtime_ns for k in kept} == kept  # untouched
    assert again.stderr.count("already holds a completed run") == len(kept)
    assert f"6/6 runs done ({len(kept)} skipped: already completed, 2 failed)" in again.stderr  # the progress line
    assert sum(v["status"] == "failed" for v in after.values()) == 2  # still failing, still recorded


def test_a_completed_folder_holding_another_config_is_run_again(compose, tmp_path):
    from omegaconf import OmegaConf

    from lowbw.train import _completed_summary

    cfg = compose(TINY)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert _completed_summary(cfg, tmp_path) == {"status": "completed"}
    assert _completed_summary(compose(TINY + ["compress/fwd=int8"]), tmp_path) is None
    assert _completed_summary(compose(TINY + ["resume=true", "timeout_s=99"]), tmp_path) is not None  # same results
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert _completed_summary(cfg, tmp_path) is None


def test_pareto_front_keeps_runs_no_other_run_beats_on_both_throughput_and_loss():
    pts = [(100.0, 2.0), (200.0, 2.5), (150.0, 3.0), (50.0, 1.9), (200.0, 2.4)]
    assert pareto_front(pts) == [3, 0, 4]


def _fake_run(d, summary, cfg=None, metrics=()):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    if cfg is not None:
        (d / "config.yaml").write_text(cfg)
    if metrics:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_simulator_like_sweep_without_loss_has_no_loss_columns_or_loss_plots(tmp_path):
    net = "net: {name: home, semantics: pipelined, latency_ms: 25.0, jitter_ms: 0.0, uplink_mbps: %s, " \
          "downlink_mbps: 100.0, regions: [], pairs: {}, random: null}\n"
    for i, (bw, codec, tps) in enumerate([(20, "none", 100.0), (20, "int8", 180.0), (200, "none", 400.0)]):
        cfg = net % bw + f"pipeline: {{stages: 4}}\nschedule: {{name: 1f1b}}\ncompress: {{fwd: {{name: {codec}}}, " \
                         "bwd: {name: none}}\n"
        _fake_run(tmp_path / str(i), {"status": "completed", "kind": "simulation", "schedule": "1f1b", "net": "home",
                                      "stages": 4, "tokens_per_s": tps, "bubble_fraction": 0.2,
                                      "bytes_per_token": 10.0}, cfg)
    rep = write_report(tmp_path)
    assert not {"train_loss", "val_loss", "val_loss_gap"} & set(rep["columns"])
    assert set(rep["plots"]) == {"throughput_vs_bandwidth"}
    assert set(rep["skipped_plots"]) == set(PLOTS) - {"throughput_vs_bandwidth"}
    rows = rep["rows"]
    assert [r["bandwidth_mbps"] for r in rows] == [20.0, 20.0, 100.0]  # bottleneck = min(uplink, downlink)
    assert {r["clock"] for r in rows} == {"simulated"} and rows[0]["stages"] == 4
    assert "not drawn" in rep["md"].read_text()


def test_runs_without_energy_or_compression_leave_those_cells_empty_and_interrupted_runs_are_listed(tmp_path):
    _fake_run(tmp_path / "0", {"status": "completed", "clock": "wall", "tokens_per_s": 50.0, "train_loss": 3.0,
                               "val_loss": 3.1, "net": "lan", "compress_fwd": "none", "compress_bwd": "none"},
              metrics=[{"step": 0, "loss": 3.2}, {"step": 1, "loss": 3.0, "val_loss": 3.1}])
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 3.3}) + "\n{\"step\": 1, \"lo")
    _fake_run(tmp_path / "1" / "attempt1", {"status": "failed", "error": "an earlier attempt, set aside"})
    rows = collect_runs(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "incomplete"]  # attempt1/ is history, not a run
    assert rows[0]["j_per_token"] is None and rows[0]["fwd_ratio"] is None and rows[0]["val_loss_gap"] == 0.0
    assert rows[1]["train_loss"] == 3.3 and rows[1]["steps_completed"] == 1


def _target(loss, step, time_s, energy_j, best):
    first = None if step is None else {"step": step, "tokens": 100 * (step + 1), "time_s": time_s, "wall_s": 1.0,
                                       "energy_j": energy_j, "val_loss": loss - 0.1}
    return {"loss": loss, "reached": first is not None, "first_crossing": first, "interpolated": None,
            "best_val_loss": best, "best_step": 3, "evaluations": 2}


def test_runs_are_ranked_by_time_to_the_target_then_by_best_loss_and_plotted_against_time_and_joules(tmp_path):
    from lowbw.report.plots import CROSSING_GID, FIGURES, TARGET_GID

    metrics = [{"step": 0, "loss": 3.2, "step_time_s": 1.0}, {"step": 1, "loss": 3.0, "val_loss": 2.5, "step_time_s": 1.0},
               {"step": 2, "loss": 2.4, "step_time_s": 1.0}, {"step": 3, "loss": 2.0, "val_loss": 1.9, "step_time_s": 1.0}]
    runs = {"slow": _target(2.0, 3, 40.0, 400.0, 1.9), "fast": _target(2.0, 3, 4.0, 40.0, 1.9),
            "missed_close": _target(2.0, None, None, None, 2.05), "missed_far": _target(2.0, None, None, None, 2.6),
            "no_target": None}
    for name, target in runs.items():
        _fake_run(tmp_path / name, {"status": "completed", "clock": "virtual", "val_loss": 1.9, "target": target,
                                    "compress_fwd": "none", "compress_bwd": "none",
                                    "energy": {"total_j": 40.0, "label": "modelled"}}, metrics=metrics)
    rep = write_report(tmp_path)
    ranked = rank_by_target(rep["rows"])
    assert [r["run"] for r in ranked] == ["fast", "slow", "missed_close", "missed_far"]
    assert ranked[0]["target_time_s"] == 4.0 and ranked[0]["target_energy_j"] == 40.0
    assert ranked[2]["target_reached"] == "no" and ranked[2]["best_val_loss"] == 2.05
    md = rep["md"].read_text()
    section = md[md.index("## Time to target loss"):]
    assert section.index("| fast |") < section.index("| slow |") < section.index("| missed_far |")
    for name in ("loss_vs_time", "loss_vs_energy"):
        fig = FIGURES[name](rep["rows"])
        targets = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == TARGET_GID]
        assert {ln.get_ydata()[0] for ln in targets} == {2.0}
        rings = [c for ax in fig.axes for c in ax.collections if c.get_gid() == CROSSING_GID]
        # the two runs that reached the target, each ringed at its step-3 evaluation (4 s, 40 J from the start)
        assert len(rings) == 2
        assert all(tuple(c.get_offsets()[0]) == ((4.0 if name == "loss_vs_time" else 40.0), 1.9) for c in rings)


def test_search_objective_prefers_throughput_within_the_loss_bound():
    from lowbw.report.search import FAILED_VALUE, objective

    base = {"status": "completed", "val_loss": 2.00, "tokens_per_s": 100.0}
    ok = {"status": "completed", "val_loss": 2.01, "tokens_per_s": 300.0}
    too_lossy = {"status": "completed", "val_loss": 2.30, "tokens_per_s": 900.0}
    value, gap = objective(ok, base, max_gap=0.05)
    assert value == 300.0 and gap == pytest.approx(0.01)
    value, gap = objective(too_lossy, base, max_gap=0.05)
    assert value == pytest.approx(-0.30) and value < objective(ok, base, 0.05)[0]
    assert objective({"status": "failed"}, base, 0.05)[0] == FAILED_VALUE


# ---- figures: what they show, inspected on the figure objects -------------------------------------------------

def _run_with_config(d, overrides, summary, metrics, compose):
    """A run folder holding the real config ``lowbw-train <overrides>`` would run, a summary and metrics."""
    from omegaconf import OmegaConf

    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(compose(overrides), resolve=True))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "clock": "virtual", **summary}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def _metrics(step_s, base_loss, steps=6, every=2):
    return [{"step": s, "loss": base_loss - 0.1 * s, "tokens": 512, "step_time_s": step_s, "busy_s": [0.01, 0.02],
             "bytes_per_link": {"0->1": 1000, "1->0": 1000},
             **({"val_loss": base_loss + 0.05 - 0.1 * s} if s % every == every - 1 else {})} for s in range(steps)]


@pytest.fixture
def preset_sweep(tmp_path, compose):
    """3 network presets x 2 schedules x 2 codecs, as `-m net=datacenter,home,transatlantic ...` makes."""
    i = 0
    for net, speed in (("datacenter", 3.0), ("home", 1.0), ("transatlantic", 1.5)):
        for sched, f in (("gpipe", 1.0), ("1f1b", 0.8)):
            for codec, g, dl in (("none", 1.0, 0.0), ("int8", 1.2, 0.002)):
                tps = 1000 * speed * f * g
                _run_with_config(tmp_path / str(i), [f"net={net}", f"schedule={sched}", f"compress/fwd={codec}",
                                                     "pipeline.stages=2"],
                                 {"tokens_per_s": tps, "val_loss": 3.0 + dl, "train_loss": 2.9 + dl,
                                  "energy": {"total_j": 50.0 / g, "j_per_token": 0.333 + 0.0045 * (g - 1) * 2,
                                             "tokens": 3072, "label": "modelled"}},
                                 _metrics(512 / tps, 3.4 + dl), compose)
                i += 1
    return collect_runs(tmp_path)


def _series(fig):
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "series"]


def _legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_figures_group_by_every_varied_setting_and_average_nothing(preset_sweep):
    from lowbw.report.plots import FIGURES

    fig = FIGURES["throughput_vs_bandwidth"](preset_sweep)
    ax = fig.axes[0]
    assert "varied: codec (fwd/bwd), schedule, network" in fig._suptitle.get_text()
    series = _series(fig)
    # one point per run: the presets differ in latency too, so no line joins two of them
    assert len(series) == 12 and all(len(ln.get_xdata()) == 1 and ln.get_linestyle() == "None" for ln in series)
    assert sorted(y for ln in series for y in ln.get_ydata()) == sorted(r["tokens_per_s"] for r in preset_sweep)
    texts = _legend_texts(fig)
    assert {"codec (fwd/bwd)", "none/none", "int8/none", "schedule", "gpipe", "1f1b"} <= set(texts)
    assert {t.get_text() for t in ax.texts} == {"datacenter", "home", "transatlantic"}  # named above their x
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()  # 20 .. 400,000 Mbit/s
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0.0 and "tokens/s" in ax.get_ylabel()


def test_a_bandwidth_sweep_draws_one_line_per_codec_and_a_one_percent_difference_looks_small(tmp_path, compose):
    for i, (bw, codec) in enumerate((b, c) for b in (10, 100, 1000, 10000) for c in ("none", "int8")):
        _run_with_config(tmp_path / str(i), [f"net.uplink_mbps={bw}", f"net.downlink_mbps={bw}", "net.name=wan",
                                             f"compress/fwd={codec}", "pipeline.stages=2"],
                         {"tokens_per_s": 100.0 * math.log10(bw) + (50 if codec == "int8" else 0),
                          "energy": {"total_j": 1.0, "j_per_token": 0.333 + (0.0045 if codec == "int8" else 0),
                                     "tokens": 512, "label": "modelled"}}, _metrics(0.1, 3.0), compose)
    rows = collect_runs(tmp_path)
    from lowbw.report.plots import FIGURES

    fig = FIGURES["throughput_vs_bandwidth"](rows)
    series = _series(fig)
    assert len(series) == 2 and all(list(ln.get_xdata()) == [10, 100, 1000, 10000] for ln in series)
    assert all(ln.get_linestyle() == "-" for ln in series)  # 4 bandwidths: joined
    assert "varied: codec (fwd/bwd)" in fig._suptitle.get_text() and "net." not in fig._suptitle.get_text()
    energy = FIGURES["energy_vs_bandwidth"](rows).axes[0]
    assert energy.get_ylim()[0] == 0.0 and energy.get_yscale() == "linear"  # 0.333 vs 0.3375: from zero


def test_runs_differing_only_in_seed_stay_apart(tmp_path, compose):
    for i, seed in enumerate((1, 2)):
        _run_with_config(tmp_path / str(i), [f"seed={seed}", "pipeline.stages=2"],
                         {"tokens_per_s": 100.0 + seed, "val_loss": 3.0 + seed / 10}, _metrics(0.1, 3.0 + seed / 10),
                         compose)
    from lowbw.report.plots import FIGURES

    rows = collect_runs(tmp_path)
    fig = FIGURES["pareto_loss_vs_throughput"](rows)
    assert "varied: seed" in fig._suptitle.get_text()
    assert len(_series(fig)) == 2 and {"1", "2"} <= set(_legend_texts(fig))
    assert len(_series(FIGURES["loss_vs_time"](rows))) == 2


def test_pareto_front_is_drawn_and_labelled_inside_the_plot(preset_sweep):
    from lowbw.report.plots import FIGURES
    from lowbw.report.style import BREAK_GID

    fig = FIGURES["pareto_loss_vs_throughput"](preset_sweep)
    assert "Pareto front: no run both\nfaster and lower-loss" in _legend_texts(fig)
    fig.canvas.draw()
    for ax in fig.axes:
        front = [ln for ln in ax.get_lines() if ln.get_gid() == "pareto-front"]
        assert len(front) == 1 and front[0].get_marker() == "o" and len(front[0].get_xdata()) >= 1
        inside = ax.get_window_extent()
        labels = [t for t in ax.texts]
        assert len(labels) == len(front[0].get_xdata())
        for t in labels:  # every label within the axes, none on top of another
            bb = t.get_window_extent()
            assert inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1, t
        boxes = [t.get_window_extent() for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert ax.get_ylim()[0] > 0 and any(ln.get_gid() == BREAK_GID for ln in ax.get_lines())  # loss: marked break
    assert [ax.get_title() for ax in fig.axes] == ["network datacenter", "network home", "network transatlantic"]


def test_loss_curves_one_per_run_against_the_runs_clock_and_joules(swept):
    from lowbw.report.plots import FIGURES

    d, out = swept
    assert out.returncode == 0
    rows = collect_runs(d)
    done = [r for r in rows if r["status"] == "completed"]
    time_fig, energy_fig = FIGURES["loss_vs_time"](rows), FIGURES["loss_vs_energy"](rows)
    assert len(_series(time_fig)) == len(_series(energy_fig)) == len(done) == 4
    assert "virtual clock" in time_fig.axes[0].get_xlabel() and "J, modelled" in energy_fig.axes[0].get_xlabel()
    for ln_t, ln_e in zip(_series(time_fig), _series(energy_fig)):
        # the last point of every curve: the run's whole clock time and its modelled joules from summary.json
        x_t, x_e = ln_t.get_xdata()[-1], ln_e.get_xdata()[-1]
        run = next(r for r in done if abs(sum(m["step_time_s"] for m in r["_metrics"]) - x_t) < 1e-9)
        assert x_e == pytest.approx(run["_energy_total_j"], rel=1e-9)
        assert list(ln_t.get_ydata()) == [m["val_loss"] for m in run["_metrics"] if "val_loss" in m]


def test_malformed_metrics_lines_and_summaries_are_left_out_not_tracebacks(tmp_path, capsys):
    from lowbw.report import main

    _fake_run(tmp_path / "0", {"status": "diverged", "clock": "virtual", "net": "lan", "diverged_step": 2},
              metrics=[{"step": 0, "loss": 3.2}, {"step": 1, "loss": 3.0}])
    with open(tmp_path / "0" / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n42\n{"step": "x", "loss": "abc"}\n{"step": 3, "loss": "abc", "val_loss": [1]}\n{"st')
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text("{not json")
    (tmp_path / "1" / "metrics.jsonl").write_bytes(b"\x00\xff\xfe binary")
    assert main([str(tmp_path)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = collect_runs(tmp_path)
    assert rows[0]["status"] == "diverged"
    assert "1 diverged" in (tmp_path / "report.md").read_text()


def test_the_report_knows_which_clocks_charge_codec_work_nothing_without_importing_torch():
    code = ("import sys, lowbw.report.collect as c; light = 'torch' not in sys.modules; "
            "import lowbw.timing as t; print(light, c.PLANNED == t.PLANNED)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_a_search_without_the_optuna_sweeper_installed_says_what_to_install(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        pytest.skip("the Optuna sweeper is installed here")
    out = subprocess.run([sys.executable, "-m", "lowbw.report.search", "+experiment=codec_search"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "pip install hydra-optuna-sweeper" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())  # nothing ran
