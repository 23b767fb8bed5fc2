"""Timeline pictures of many ranks: the first N drawn and said so, never a file listed that is not there."""

import subprocess
import sys

from lowbw.metrics.gantt import MAX_RANKS_DRAWN, plot_gantt, select_ranks
from lowbw.metrics.timeline import Event, Timeline


def _timeline(n_ranks):
    return Timeline("virtual", n_ranks, [Event(r, "forward", r * 0.1, r * 0.1 + 0.5, 0, f"{r}F0")
                                          for r in range(n_ranks)])


def test_select_ranks_keeps_the_first_ranks_and_the_title_says_of_how_many(tmp_path, monkeypatch):
    tl = _timeline(40)
    first = select_ranks(tl, MAX_RANKS_DRAWN)
    assert first.n_ranks == 32 and {e.rank for e in first.events} == set(range(32))
    titles = []
    monkeypatch.setattr("matplotlib.axes.Axes.set_title", lambda ax, t, **kw: titles.append(t))
    plot_gantt(first, tmp_path / "t.png", "run", of_ranks=tl.n_ranks)
    assert titles == ["run  (step 0, ranks 0-31 of 40)"]
    assert select_ranks(tl, 100).n_ranks == 40  # asking for more than there are: all of them


def _simulate(tmp_path, *overrides):
    out = tmp_path / "sim"
    proc = subprocess.run([sys.executable, "-m", "lowbw.simulate", f"out_dir={out}", "model=tiny",
                           "model.n_layer=40", "pipeline.stages=40", "pipeline.microbatches=40", "sim.steps=2",
                           "net=datacenter", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_simulate_above_32_stages_draws_the_first_ranks_and_says_so(tmp_path):
    out, stdout = _simulate(tmp_path)
    assert (out / "timeline.png").stat().st_size > 0 and (out / "trace.json").is_file()
    assert "(summary.json, trace.json, timeline.png)" in stdout
    assert "timeline.png shows ranks 0-31 of 40 (sim.picture_ranks=32); trace.json has every rank" in stdout


def test_simulate_without_a_picture_lists_no_picture(tmp_path):
    out, stdout = _simulate(tmp_path, "sim.picture_ranks=0")
    assert not (out / "timeline.png").exists()
    assert "(summary.json, trace.json)" in stdout and "no timeline.png (sim.picture_ranks=0)" in stdout


def test_a_negative_picture_ranks_is_refused_naming_the_setting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbw.simulate", f"out_dir={tmp_path}", "model=tiny",
                           "pipeline.stages=2", "pipeline.microbatches=2", "sim.steps=1", "sim.picture_ranks=-1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "sim.picture_ranks=-1" in proc.stderr
